"""A bounded client for relayed streams: how many chunks per second, and how late each one arrives.

    python -m bench.stream_client --url URL [--token T] [--model M] [--streams N] [--chunks C]
        [--chunk-delay S] [--warmup-chunks W] [--timeout S] [--floor-service FILE]

It opens N streaming chat requests at once and asks each for C chunks, `[[chunk_delay=S]]` apart (the
directives of bench.fake_compute_server's function), first a warm-up round of W chunks per stream. Every
chunk carries the `time.monotonic_ns()` at which the function sent it; the client stamps each read with
the same clock (CLOCK_MONOTONIC, shared by all processes of a Linux host), so receive minus send is
what the callback POST, the gateway's relay and the client's socket added to that chunk. It prints one
JSON object: completed streams, chunks, chunks per second and the per-chunk latency percentiles.

With `--floor-service FILE` (bench.fake_compute_server's announcement) URL is a bench.relay_floor
instead of a gateway: the client opens each stream there and submits its task to the fake itself, with
the callback fields the gateway would have added, so the same function posts the same chunks to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import globus_sdk
from yarl import URL

from bench.compute_client import API_PORT, Compute, Service
from bench.loadgen import new_session, percentile_ms
from testing.loops import new_event_loop

DONE: Final = b"[DONE]"
MAX_STREAMS: Final = 1000
MAX_CHUNKS: Final = 10_000
MAX_SECONDS: Final = 300.0
FLOOR_TOKEN: Final = "floor-stream-token"
"""The relay floor checks no token; the function sends whatever the payload holds."""
Opened = Callable[[], Awaitable[None]]


class SubmitFailed(Exception):
    """The fake refused a floor stream's task, so the stream would never end."""


@dataclass
class Record:
    """What one round measured: latencies in nanoseconds and when each chunk was read."""

    latencies_ns: list[int] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    short: int = 0

    def event(self, event: bytes, now: int) -> str | None:
        """Take one server-sent event: "chunk" for a stamped chunk, "done" for the stream's `[DONE]`, None
        for anything else (comments, the gateway's keep-alives)."""
        if not event.startswith(b"data: "):
            return None
        payload = event[6:].strip()
        if payload == DONE:
            return "done"
        sent = json.loads(payload).get("sent_ns")
        if not isinstance(sent, int):
            return None
        self.latencies_ns.append(now - sent)
        self.received_ns.append(now)
        return "chunk"


def request_body(model: str, chunks: int, delay: float) -> dict[str, Any]:
    prompt = f"Stream [[chunks={chunks}]][[chunk_delay={delay:g}]]"
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}


def floor_params(floor: URL, stream_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The task's `model_params` as the gateway would send them, with the floor as the callback."""
    return {
        **body,
        "openai_endpoint": "chat/completions",
        "api_port": API_PORT,
        "streaming_server_host": floor.host,
        "streaming_server_port": floor.port,
        "streaming_server_protocol": "http",
        "stream_task_id": stream_id,
        "stream_task_token": FLOOR_TOKEN,
    }


async def read_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    data: bytes,
    chunks: int,
    record: Record,
    opened: Opened | None = None,
) -> None:
    """Read one stream to its end, stamping every read as it returns: events that arrive together
    were received together. `opened` runs once the answer's headers are in (the floor's submit)."""
    try:
        async with session.post(url, data=data, headers=headers) as response:
            record.statuses[str(response.status)] += 1
            if opened is not None:
                await opened()
            buffer, kinds = b"", Counter[str | None]()
            while piece := await response.content.readany():
                now = time.monotonic_ns()
                *events, buffer = (buffer + piece).split(b"\n\n")
                for event in events:
                    kinds[record.event(event, now)] += 1
    except (aiohttp.ClientError, TimeoutError, ValueError, SubmitFailed) as exc:
        record.statuses[type(exc).__name__] += 1
        return
    if response.status == 200 and kinds["done"]:
        record.completed += 1
        record.short += int(kinds["chunk"] < chunks)


async def run_round(
    session: aiohttp.ClientSession, args: argparse.Namespace, chunks: int, floor: Compute | None
) -> tuple[Record, float]:
    record = Record()
    started = time.perf_counter()
    streams = [
        asyncio.create_task(
            open_stream(session, args, chunks, record, floor)
            if floor is not None
            else gateway_stream(session, args, chunks, record)
        )
        for _ in range(args.streams)
    ]
    _, late = await asyncio.wait(streams, timeout=args.timeout)
    for stream in late:
        stream.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    if late:
        record.statuses["unfinished"] += len(late)
    return record, time.perf_counter() - started


def gateway_stream(
    session: aiohttp.ClientSession, args: argparse.Namespace, chunks: int, record: Record
) -> Coroutine[Any, Any, None]:
    """A streaming chat request: the gateway submits the task and relays its callbacks."""
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    data = json.dumps(request_body(args.model, chunks, args.chunk_delay)).encode()
    return read_stream(session, args.url, headers, data, chunks, record)


def open_stream(
    session: aiohttp.ClientSession, args: argparse.Namespace, chunks: int, record: Record, floor: Compute
) -> Coroutine[Any, Any, None]:
    """A stream on the floor, whose task is submitted once the floor holds the stream open."""
    stream_id = str(uuid.uuid4())
    params = floor_params(URL(args.url), stream_id, request_body(args.model, chunks, args.chunk_delay))

    async def submit() -> None:
        try:
            await floor.submit(params)
        except globus_sdk.GlobusError as exc:
            raise SubmitFailed(str(exc)) from None

    url = f"{args.url.rstrip('/')}/stream/{stream_id}"
    return read_stream(session, url, {}, b"", chunks, record, submit)


def summarize(record: Record, elapsed: float, args: argparse.Namespace) -> dict[str, Any]:
    """Chunks per second over the span in which chunks arrived, so the streams' start (submit and the
    first poll) does not dilute the relay's rate."""
    latencies = [value / 1e9 for value in record.latencies_ns]
    span = (max(record.received_ns) - min(record.received_ns)) / 1e9 if len(latencies) > 1 else 0.0
    return {
        "streams": args.streams,
        "chunks_per_stream": args.chunks,
        "chunk_delay_s": args.chunk_delay,
        "completed": record.completed,
        "short_streams": record.short,
        "status_counts": dict(record.statuses),
        "errors": args.streams - record.completed,
        "chunks": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "chunks_per_s": round(len(latencies) / span, 1) if span > 0 else None,
        "latency_p50_ms": percentile_ms(latencies, 0.50),
        "latency_p90_ms": percentile_ms(latencies, 0.90),
        "latency_p99_ms": percentile_ms(latencies, 0.99),
        "latency_max_ms": percentile_ms(latencies, 1.0),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    floor, warmup_chunks = None, 0
    if args.floor_service:
        service = Service.load(args.floor_service)
        floor = Compute(service, threads=args.streams, poll_interval=1.0, timeout=args.timeout)
    try:
        async with new_session(args.timeout) as session:
            if args.warmup_chunks:
                warm, _ = await run_round(session, args, args.warmup_chunks, floor)
                warmup_chunks = len(warm.latencies_ns)
            record, elapsed = await run_round(session, args, args.chunks, floor)
    finally:
        if floor is not None:
            await floor.close()
    return summarize(record, elapsed, args) | {"warmup_chunks": warmup_chunks}


def bounded(low: float, high: float, kind: Callable[[str], Any] = float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}]")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", help="sent as `Authorization: Bearer TOKEN`")
    parser.add_argument("--model", default="bench/model")
    parser.add_argument("--streams", type=bounded(1, MAX_STREAMS, int), default=16)
    parser.add_argument("--chunks", type=bounded(1, MAX_CHUNKS, int), default=200)
    parser.add_argument("--chunk-delay", type=bounded(0, 1), default=0.0, help="seconds between chunks")
    parser.add_argument("--warmup-chunks", type=bounded(0, MAX_CHUNKS, int), default=10)
    parser.add_argument("--timeout", type=bounded(1, MAX_SECONDS), default=60.0, help="per round")
    parser.add_argument("--floor-service", type=Path, help="URL is a relay floor; submit to this fake")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        result = runner.run(measure(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
