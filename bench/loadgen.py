"""A bounded asyncio load generator for OpenAI-compatible endpoints.

    python -m bench.loadgen --url URL [--token T] [--body JSON|@FILE] [--concurrency C]
        [--requests N] [--duration S] [--warmup N] [--stream] [--spread S]
    python -m bench.loadgen --url URL --body JSON --hold-streams N [--hold-seconds S] [--ramp-seconds S]

It prints one JSON object. The first form keeps C requests in flight until N requests are done or
S seconds have passed, whichever comes first; with `--stream` it also times the first body bytes
(time to first chunk). The second form opens N streams (at once, or over a ramp), reads each to its
end and reports how many completed, for measuring what idle streams cost the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from yarl import URL

from testing.loops import new_event_loop

DEFAULT_BODY: Final = (
    '{"model": "bench/model", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}'
)
DEFAULT_DURATION: Final = 10.0
MAX_DURATION: Final = 600.0
MAX_REQUESTS: Final = 10_000_000
WARMUP_SECONDS: Final = 30.0
_DONE: Final = b"data: [DONE]\n\n"


@dataclass
class Tally:
    """What the requests of one phase measured; latencies are in seconds."""

    latencies: list[float] = field(default_factory=list)
    first_chunks: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    completed_streams: int = 0


@dataclass
class Budget:
    """How many requests a phase may still start, and until when."""

    remaining: int
    deadline: float

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.remaining -= 1
        return True


@dataclass(frozen=True)
class Target:
    url: URL
    headers: dict[str, str]
    body: bytes


def percentile_ms(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile, so that p99 of few samples is a real sample, not a blend."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return round(ordered[rank] * 1000, 3)


async def send(session: aiohttp.ClientSession, target: Target, stream: bool, tally: Tally) -> None:
    """One request, read to its end; a stream counts as completed when it ends with [DONE]."""
    started = time.perf_counter()
    try:
        async with session.post(target.url, data=target.body, headers=target.headers) as response:
            if stream:
                tail = await response.content.readany()
                tally.first_chunks.append(time.perf_counter() - started)
                while data := await response.content.readany():
                    tail = (tail + data)[-len(_DONE) :]
                if response.status == 200 and tail.endswith(_DONE):
                    tally.completed_streams += 1
            else:
                await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.failures += 1
        tally.statuses[type(exc).__name__] += 1
        return
    tally.latencies.append(time.perf_counter() - started)
    tally.statuses[str(response.status)] += 1


async def run_phase(
    session: aiohttp.ClientSession,
    target: Target,
    *,
    concurrency: int,
    budget: Budget,
    stream: bool,
    spread: float = 0.0,
) -> tuple[Tally, float]:
    """Keep `concurrency` requests in flight until the budget runs out; returns the elapsed time.
    With `spread`, worker i starts i/concurrency of it late: requests of equal length then keep
    arriving evenly instead of all at once, and a first chunk's time is the server's own delay
    rather than its place in a burst."""
    tally = Tally()

    async def worker(index: int) -> None:
        await asyncio.sleep(spread * index / concurrency)
        while budget.take():
            await send(session, target, stream, tally)

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return tally, time.perf_counter() - started


def summarize(tally: Tally, elapsed: float, stream: bool) -> dict[str, Any]:
    error_statuses = sum(
        count for status, count in tally.statuses.items() if status.isdigit() and int(status) >= 400
    )
    summary: dict[str, Any] = {
        "requests": len(tally.latencies) + tally.failures,
        "errors": tally.failures + error_statuses,
        "status_counts": dict(tally.statuses),
        "elapsed_s": round(elapsed, 3),
        "rps": round(len(tally.latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": percentile_ms(tally.latencies, 0.50),
        "p90_ms": percentile_ms(tally.latencies, 0.90),
        "p99_ms": percentile_ms(tally.latencies, 0.99),
        "mean_ms": (
            round(sum(tally.latencies) / len(tally.latencies) * 1000, 3) if tally.latencies else None
        ),
    }
    if stream:
        summary["ttfc_p50_ms"] = percentile_ms(tally.first_chunks, 0.50)
        summary["ttfc_p99_ms"] = percentile_ms(tally.first_chunks, 0.99)
        summary["completed_streams"] = tally.completed_streams
    return summary


def new_session(timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout, connect=timeout)
    )


async def measure(
    target: Target,
    *,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    stream: bool,
    warmup: int,
    timeout: float,
    spread: float = 0.0,
) -> dict[str, Any]:
    """Warm up (connections, caches), then measure a phase bounded in count and time."""
    if requests is None and duration is None:
        duration = DEFAULT_DURATION
    limit = min(requests if requests is not None else MAX_REQUESTS, MAX_REQUESTS)
    seconds = min(duration if duration is not None else MAX_DURATION, MAX_DURATION)
    async with new_session(timeout) as session:
        if warmup:
            warm = Budget(warmup, time.perf_counter() + WARMUP_SECONDS)
            await run_phase(
                session, target, concurrency=concurrency, budget=warm, stream=stream, spread=spread
            )
        budget = Budget(limit, time.perf_counter() + seconds)
        tally, elapsed = await run_phase(
            session, target, concurrency=concurrency, budget=budget, stream=stream, spread=spread
        )
    return {"concurrency": concurrency, **summarize(tally, elapsed, stream)}


async def hold_streams(target: Target, *, streams: int, seconds: float, ramp: float = 0.0) -> dict[str, Any]:
    """Open the streams (all at once, or evenly over `ramp` seconds) and read them to their end;
    unfinished ones count as failed. A ramp keeps thousands of connections from arriving in the
    same instant, which overflows the kernel's accept queue (net.core.somaxconn) of any server."""
    tally = Tally()
    async with new_session(seconds) as session:
        started = time.perf_counter()

        async def one(index: int) -> None:
            await asyncio.sleep(ramp * index / streams)
            await send(session, target, True, tally)

        tasks = [asyncio.create_task(one(index)) for index in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - started
    summary = summarize(tally, elapsed, stream=True)
    return {
        "streams": streams,
        "completed": summary.pop("completed_streams"),
        "unfinished": len(pending),
        "opened": len(tally.first_chunks),
        **summary,
    }


def read_body(value: str) -> bytes:
    """The body as given, or a file's content for `@path`; checked to be JSON before any load."""
    raw = Path(value[1:]).read_bytes() if value.startswith("@") else value.encode()
    json.loads(raw)
    return raw


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_DURATION:g}]")
    return value


def spread_seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= WARMUP_SECONDS:
        raise argparse.ArgumentTypeError(f"must be in [0, {WARMUP_SECONDS:g}]")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", help="sent as `Authorization: Bearer TOKEN`")
    parser.add_argument("--body", default=DEFAULT_BODY, help="JSON request body, or @FILE")
    parser.add_argument("--concurrency", type=int_at_least(1), default=1)
    parser.add_argument("--requests", type=int_at_least(1), help="stop after this many requests")
    parser.add_argument("--duration", type=positive_float, help="stop after this many seconds")
    parser.add_argument("--warmup", type=int_at_least(0), default=0, help="requests sent before measuring")
    parser.add_argument("--stream", action="store_true", help="time the first chunk as well")
    parser.add_argument("--timeout", type=positive_float, default=60.0, help="per request")
    parser.add_argument(
        "--spread", type=spread_seconds, default=0.0, help="start the workers evenly over this many seconds"
    )
    parser.add_argument("--hold-streams", type=int_at_least(1), help="open this many slow streams")
    parser.add_argument("--hold-seconds", type=positive_float, default=60.0, help="their limit")
    parser.add_argument(
        "--ramp-seconds", type=float, default=0.0, help="open the held streams over this time"
    )
    return parser.parse_args(argv)


def target_of(url: str, token: str | None, body: bytes) -> Target:
    """What every request of a measure sends: JSON, with the bearer token if there is one."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return Target(URL(url), headers, body)


def print_result(work: Coroutine[Any, Any, Any]) -> None:
    """Runs a measure on the benchmark's event loop and prints its JSON object, the one line a
    load generator writes to stdout."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        result = runner.run(work)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    target = target_of(args.url, args.token, read_body(args.body))
    if args.hold_streams:
        work = hold_streams(
            target, streams=args.hold_streams, seconds=args.hold_seconds, ramp=args.ramp_seconds
        )
    else:
        work = measure(
            target,
            concurrency=args.concurrency,
            requests=args.requests,
            duration=args.duration,
            stream=args.stream,
            warmup=args.warmup,
            timeout=args.timeout,
            spread=args.spread,
        )
    print_result(work)


if __name__ == "__main__":
    main()
