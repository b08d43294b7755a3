"""The tests' fake Globus Auth and Globus Compute as one process, for the benchmark's compute path.

    python -m bench.fake_compute_server [--result-queue DIRECTORY]

The benchmark pins this process to the load generator's CPU, so that the fake service and the
"remote" functions it runs in its threads never take CPU time from the gateway being measured. Once
listening it prints one JSON line with everything a gateway's compute endpoint needs (URLs, service
account, endpoint and function ids, the callback secret); on SIGTERM or SIGINT it prints one JSON
line with the number of submits and status polls it answered, and on SIGUSR1 one line with the
counts so far (`counts_so_far`). With `--result-queue`, a RabbitMQ broker starts in this process's
place on the CPU (its data and log in DIRECTORY) and the fake pushes results to it for task groups that
ask for a queue; the JSON line then also carries `result_broker_url`.

The registered function stands in for `compute-functions/vllm_inference.py` without a vLLM behind
it: a non-streaming task returns a small fixed chat completion at once (or after the prompt's
`[[delay=S]]` seconds), so a request's latency is the service's own (submit, then the wait for the
next status poll) plus that delay; given the gateway's callback details, it first POSTs that answer
to the callback route (pushed, as our function does). A streaming task POSTs its
chunks to the gateway's callback routes, one server-sent event line per POST as the task asks, and
stamps each line with `time.monotonic_ns()` just before it is sent: CLOCK_MONOTONIC is one clock
for every process of a Linux host, so the client that receives the line can tell how long the relay
took. The prompt's `[[chunks=N]]` and `[[chunk_delay=S]]` (as for testing.fake_vllm) set how many lines
and how far apart; lines keep to a fixed schedule, so a slow POST does not stretch the pacing. Each
stream starts its schedule at a random point of the first interval: streams of different users do not
tick in step, and streams submitted together would otherwise all post within the same millisecond,
every interval, so that the latency measured would be the queue of that burst rather than the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_vllm import parse_faults
from testing.loops import new_event_loop
from testing.services.rabbitmq_server import RabbitMQServer

SERVICE_ID: Final = "6c1d9a3e-42b7-4f05-8e1a-b3c4d5e6f701"
ENDPOINT_UUID: Final = "3a9c5e7b-1d2f-4a6b-8c0e-2f4a6b8c0d1e"
FUNCTION_UUID: Final = "5b7d9f1a-3c5e-4a7b-9d1f-3a5c7e9b1d2f"
QSTAT_UUID: Final = "5b7d9f1a-3c5e-4a7b-9d1f-3a5c7e9b1d30"
MODEL: Final = "bench/model"
CALLBACK_PATH: Final = "/resource_server/api/streaming/"
MAX_CHUNKS: Final = 100_000
MAX_CHUNK_DELAY: Final = 1.0
MAX_TASK_SECONDS: Final = 10.0
CALLBACK_TIMEOUT: Final = 10.0
PRUNE_SECONDS: Final = 5.0
KEEP_TASKS_SECONDS: Final = 30.0
"""The fakes record every request and task: pruning finished ones keeps a long run's memory flat."""
ANSWER: Final = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fake endpoint."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    }
)
JOBS: Final = json.dumps(
    {
        "running": [{"Models": MODEL, "Framework": "vllm", "Cluster": "hpc", "Job ID": "1"}],
        "queued": [],
        "stopped": [],
        "others": [],
        "private_batch_running": [],
        "private_batch_queued": [],
        "cluster_status": {"cluster": "hpc", "total_models": 1},
    }
)


@dataclass(frozen=True)
class Callback:
    """Where and how a streaming task reaches the gateway: the fields the gateway adds to the payload."""

    host: str
    port: int
    stream_id: str
    headers: dict[str, str]

    @classmethod
    def from_params(cls, params: dict[str, Any], secret: str) -> Callback:
        if params.get("streaming_server_protocol", "http") != "http":
            raise ValueError("the benchmark's gateway is reached over plain http")
        headers = {
            "Content-Type": "application/json",
            "X-Internal-Secret": secret,
            "X-Stream-Task-Token": str(params["stream_task_token"]),
        }
        host, port = str(params["streaming_server_host"]), int(params["streaming_server_port"])
        return cls(host, port, str(params["stream_task_id"]), headers)


def chunk_line(number: int) -> str:
    """One SSE line shaped like vLLM's, stamped as late as possible: the POST follows at once."""
    chunk = {
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": f"w{number} "}}],
        "sent_ns": time.monotonic_ns(),
    }
    return "data: " + json.dumps(chunk, separators=(",", ":"))


def post(connection: http.client.HTTPConnection, callback: Callback, route: str, body: dict[str, Any]) -> int:
    """One callback over the task's kept-alive connection, as the real function posts them."""
    document = json.dumps({"task_id": callback.stream_id, **body}).encode()
    connection.request("POST", CALLBACK_PATH + route, body=document, headers=callback.headers)
    response = connection.getresponse()
    response.read()
    return response.status


def stream(params: dict[str, Any], secret: str) -> str:
    """POST the chunks, `[DONE]`, then done with the number of data posts; stop early if the client left."""
    callback = Callback.from_params(params, secret)
    faults = parse_faults(str(params["messages"][-1]["content"]))
    chunks = min(faults.chunks if faults.chunks is not None else 5, MAX_CHUNKS)
    delay = min(faults.chunk_delay, MAX_CHUNK_DELAY)
    connection = http.client.HTTPConnection(callback.host, callback.port, timeout=CALLBACK_TIMEOUT)
    try:
        started = time.monotonic() + random.uniform(0, delay)
        for number in range(chunks):
            if delay:
                time.sleep(max(0.0, started + number * delay - time.monotonic()))
            status = post(connection, callback, "data/", {"data": chunk_line(number), "type": "data"})
            if status != 200:
                return json.dumps({"cancelled": True, "status": status, "sent": number})
        post(connection, callback, "data/", {"data": "data: [DONE]", "type": "data"})
        post(connection, callback, "done/", {"type": "done", "data_posts": chunks + 1})
    finally:
        connection.close()
    return json.dumps({"streamed": True, "chunks": chunks})


def push(params: dict[str, Any], secret: str) -> None:
    """The answer POSTed as one data line on a connection of its own, as our function pushes it
    when the gateway sends its callback details with a request that is not streamed."""
    callback = Callback.from_params(params, secret)
    connection = http.client.HTTPConnection(callback.host, callback.port, timeout=CALLBACK_TIMEOUT)
    try:
        post(connection, callback, "data/", {"data": "data: " + ANSWER, "type": "result"})
    finally:
        connection.close()


def make_function(secret: str) -> Any:
    """The endpoint's function: one for both kinds of request, as on a real endpoint."""

    def bench_inference(parameters: dict[str, Any]) -> str:
        params = parameters["model_params"]
        if params.get("stream") is True:
            return stream(params, secret)
        delay = parse_faults(str(params["messages"][-1]["content"])).delay
        if delay:
            time.sleep(min(delay, MAX_TASK_SECONDS))
        if params.get("stream_task_id"):
            push(params, secret)
        return ANSWER

    return bench_inference


def qstat() -> str:
    return JOBS


def announce(
    globus: FakeGlobus, compute: FakeCompute, client_secret: str, callback_secret: str
) -> dict[str, Any]:
    """Everything the gateway's compute endpoint and the direct client need, so no caller hard-codes it."""
    return {
        "auth_url": globus.auth_url,
        "compute_url": compute.url,
        "client_id": SERVICE_ID,
        "client_secret": client_secret,
        "endpoint_uuid": ENDPOINT_UUID,
        "function_uuid": FUNCTION_UUID,
        "qstat_function_uuid": QSTAT_UUID,
        "callback_secret": callback_secret,
    }


def call_kind(path: str) -> str:
    """Which API a recorded request called, by the ends of the fake's paths."""
    for suffix, kind in (
        ("/submit", "submits"),
        ("/batch_status", "status_polls"),
        ("/status", "endpoint_status"),
    ):
        if path.endswith(suffix):
            return kind
    return "other"


def prune(compute: FakeCompute, calls: Counter[str]) -> None:
    """Count the recorded requests, then drop them and the tasks finished long enough ago that nobody
    polls them any more."""
    calls.update(call_kind(recorded.path) for recorded in compute.requests)
    compute.requests.clear()
    horizon = time.time() - KEEP_TASKS_SECONDS
    finished = [tid for tid, task in compute.tasks.items() if task.done and (task.finished_at or 0) < horizon]
    for task_id in finished:
        del compute.tasks[task_id]


async def keep_small(compute: FakeCompute, calls: Counter[str], stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), PRUNE_SECONDS)
        except TimeoutError:
            prune(compute, calls)


async def serve(result_queue: Path | None) -> None:
    """With `result_queue`, a broker in that directory for as long as the fake serves."""
    if result_queue is None:
        await serve_with(None)
        return
    async with RabbitMQServer(result_queue) as broker:
        await serve_with(broker.url)


async def serve_with(broker_url: str | None) -> None:
    client_secret, callback_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    globus = FakeGlobus()
    globus.add_client(SERVICE_ID, client_secret)
    compute = FakeCompute(
        accepted_tokens=lambda token: token in globus.issued_tokens, result_broker_url=broker_url
    )
    # A persistent message costs the broker, on the load generator's CPU, 335 µs against 117 µs for
    # a transient one (AMD VM): enough to make CPU 0 the limit of every measure. Consumers read both alike.
    compute.persistent_results = False
    compute.add_endpoint(ENDPOINT_UUID)
    compute.register_function(FUNCTION_UUID, make_function(callback_secret))
    compute.register_function(QSTAT_UUID, qstat)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    calls: Counter[str] = Counter()

    def report() -> None:
        """On SIGUSR1, the counts so far: the benchmark reads the calls one measure made."""
        prune(compute, calls)
        print(json.dumps({"counts_so_far": dict(calls)}), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, report)
    async with globus, compute:
        announced = announce(globus, compute, client_secret, callback_secret)
        if broker_url is not None:
            announced["result_broker_url"] = broker_url
        print(json.dumps(announced), flush=True)
        await keep_small(compute, calls, stopping)
        prune(compute, calls)
    tokens = sum(1 for r in globus.requests if r.path.endswith("/oauth2/token"))
    print(json.dumps({"counts": {**calls, "token_grants": tokens}}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--result-queue", type=Path, metavar="DIRECTORY", help="start a RabbitMQ broker")
    options = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(options.result_queue))


if __name__ == "__main__":
    main()
