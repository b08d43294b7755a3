"""The compute path's baseline: what the gateway does for a request, done straight against the fake service.

    python -m bench.compute_client --service FILE [--concurrency C] [--duration S] [--requests N]
        [--warmup N] [--poll-interval S] [--threads T] [--timeout S]

FILE is the JSON line that bench.fake_compute_server announces (a file, so that the service account's
secret stays off the command line). The client keeps C requests in flight until N are done or S seconds
have passed and prints one JSON object shaped like bench.loadgen's, so that the two sides of the
comparison line up field by field.

What this baseline is. With `--result-queue` (the fake publishes results to a RabbitMQ queue, as the
service does) results come from that queue, consumed as the gateway consumes it
(`adaptors.compute_result_queue.ResultQueue`), and the poller asks only every
`QUEUE_POLL_INTERVAL` as a safety net. Without a queue, the fastest way the fake allows to learn of a
result is to ask again as soon as the last answer came: with `--poll-interval 0` the one poller asks
about every pending task back to back. The fake's own latency (its submit, its
task run, one status call) then cancels out against the gateway, and the gateway's wait for its poll
(adaptive, `adaptors.compute_service.ComputeService`) does not: it is part of what the gateway adds.
With a positive interval the poller sleeps that long between calls, as the gateway's poller did
before it became adaptive. Otherwise the client does what the gateway does:

- one poller for every task in flight, asking about all pending tasks at once
  (`ComputeClientV2.get_task_batch`);
- submissions of the same moment coalesced into one V3 submit of up to the gateway's
  `MAX_TASKS_PER_SUBMIT` tasks, as the gateway coalesces them, but sent at the next turn of the event
  loop without the gateway's few ms of gathering during a burst: the fastest way the fake takes a
  burst of tasks (one web call per task would make the client's own CPU its limit at 100 requests
  in flight, and the baseline no floor);
- the same calls built the same way: a `Batch` with the JSON serializer submitted on the event loop
  over the gateway's own HTTP client with the SDK's token and retries
  (`adaptors.compute_submit_call`), status calls through the gateway's own `sdk_clients` (one
  pooled requests transport, the same retry settings) in a thread pool of the gateway's size, on
  the event loop the gateway uses (uvloop);
- the payload the gateway sends for the benchmark's body, and the result read back as JSON.

What the difference leaves to the gateway is then its own work: the HTTP front, authentication, request
validation and routing, and the JSON relayed back, plus the load generator that talks to it (the
baseline client runs on the gateway's CPU, in its place).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import globus_sdk
from globus_compute_sdk.sdk.batch import Batch

from adaptors.compute_clients import json_serializer, queue_details, sdk_clients
from adaptors.compute_config import GlobusComputeClusterConfig
from adaptors.compute_early import EarlyResults
from adaptors.compute_result_queue import QueuedResult, ResultQueue
from adaptors.compute_submit import MAX_TASKS_PER_SUBMIT
from adaptors.compute_submit_call import submit_call
from bench.loadgen import DEFAULT_BODY, MAX_DURATION, MAX_REQUESTS, WARMUP_SECONDS, Budget, Tally, summarize
from testing.loops import new_event_loop

DEFAULT_THREADS: Final = 16
"""The gateway's `server.adaptor_threads` default; the benchmark sets both to this value."""
DEFAULT_POLL_INTERVAL: Final = 0.05
QUEUE_POLL_INTERVAL: Final = 0.5
"""With the result queue, polls only catch what it did not bring (none in a healthy run)."""
MAX_TASKS_PER_POLL: Final = 1000
API_PORT: Final = 8000
"""The endpoint's `api_port`, which the gateway adds to every payload; the fake's function ignores it."""
RESULT_SERIALIZERS: Final = ["globus_compute_sdk.serialize.JSONData"]
Result = TypeVar("Result")


class TaskFailed(Exception):
    """The task failed on the endpoint, or its document could not be read."""


@dataclass(frozen=True)
class Service:
    """The fake's announcement: where it listens and who the client is to it."""

    compute_url: str
    auth_url: str
    client_id: str
    client_secret: str
    endpoint_uuid: str
    function_uuid: str

    @classmethod
    def load(cls, path: Path) -> Service:
        document = json.loads(path.read_text())
        return cls(**{name: str(document[name]) for name in cls.__dataclass_fields__})


def access_of(service: Service, timeout: float) -> GlobusComputeClusterConfig:
    """The fake's account and URLs as the gateway's configuration holds them, so that the SDK
    clients are built as the gateway builds them (`adaptors.compute_clients.sdk_clients`) and each
    call costs both sides the same."""
    return GlobusComputeClusterConfig(
        qstat_endpoint_uuid=service.endpoint_uuid,
        qstat_function_uuid=service.function_uuid,
        client_id=service.client_id,
        client_secret=service.client_secret,
        compute_url=service.compute_url,
        auth_url=service.auth_url,
        http_timeout_seconds=timeout,
    )


@dataclass(frozen=True)
class Waiting:
    """A task whose result a request awaits, and since when (the queue's safety net asks only about
    those waiting longer than its interval)."""

    future: asyncio.Future[Any]
    since: float


class Compute:
    """Submits and waits on one shared poller, as `ComputeService` does in the gateway."""

    def __init__(
        self,
        service: Service,
        *,
        threads: int,
        poll_interval: float,
        timeout: float,
        result_queue: bool = False,
        burst_window: float = 0.0,
    ) -> None:
        self.service = service
        self.burst_window = burst_window
        self.poll_interval = QUEUE_POLL_INTERVAL if result_queue else poll_interval
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdk")
        self.serializer = json_serializer()
        self.clients = sdk_clients(access_of(service, timeout))
        self.v2, self.v3 = self.clients[0], self.clients[1]
        self.submission = submit_call(self.v3, self._blocking, timeout)
        self.pending: dict[str, Waiting] = {}
        self.queued: list[tuple[dict[str, Any], asyncio.Future[str]]] = []
        self.sending: set[asyncio.Task[None]] = set()
        self.polls = 0
        self.poll_errors = 0
        self.pushed = 0
        self._poller: asyncio.Task[None] | None = None
        self.queue = ResultQueue(self._queue_details, self._pushed, print_change) if result_queue else None
        self.group: str | None = None
        self.early = EarlyResults()

    async def submit(self, params: dict[str, Any]) -> str:
        """Joins the submissions of this turn of the event loop; the first one schedules their call.
        With a `burst_window`, while another call is on the wire the call waits that long to gather
        more, as the gateway's `Submitter` does (requests behind an HTTP front arrive one by one)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        if not self.queued:
            if self.burst_window and self.sending:
                loop.call_later(self.burst_window, self._flush)
            else:
                loop.call_soon(self._flush)
        self.queued.append((params, future))
        if len(self.queued) >= MAX_TASKS_PER_SUBMIT:
            self._flush()
        return await future

    def _flush(self) -> None:
        queued, self.queued = self.queued, []
        if queued:
            sending = asyncio.get_running_loop().create_task(self._send(queued))
            self.sending.add(sending)
            sending.add_done_callback(self.sending.discard)

    async def _send(self, queued: list[tuple[dict[str, Any], asyncio.Future[str]]]) -> None:
        function_uuid = self.service.function_uuid
        batch = Batch(
            task_group_id=self.group,
            serializer=self.serializer,
            result_serializers=RESULT_SERIALIZERS,
            request_queue=self.queue is not None,
        )
        for params, _ in queued:
            batch.add(function_uuid, args=({"model_params": params},))
        try:
            answer = await self.submission.submit(self.service.endpoint_uuid, batch.prepare())
            if self.queue is not None:
                self._follow(str(answer["task_group_id"]))
            task_ids = [str(task_id) for task_id in answer["tasks"][function_uuid]]
            if len(task_ids) != len(queued):
                raise TaskFailed(f"{len(queued)} tasks submitted, {len(task_ids)} ids in the answer")
        except Exception as exc:
            for _, future in queued:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), task_id in zip(queued, task_ids, strict=True):
            if not future.done():
                future.set_result(task_id)

    def _follow(self, group: str) -> None:
        if self.queue is not None:
            self.group = self.group or group
            self.queue.follow(group)

    async def _queue_details(self) -> tuple[str, str]:
        return await self._blocking(lambda: queue_details(self.clients))

    def _pushed(self, result: QueuedResult) -> None:
        waiting = self.pending.get(result.task_id)
        if waiting is None:
            self.early.keep(result)
            return
        future = waiting.future
        if future.done() or result.data is None:
            return
        self.pushed += 1
        if result.failed:
            future.set_exception(TaskFailed(result.data))
            return
        try:
            future.set_result(self.serializer.deserialize(result.data))
        except Exception as exc:
            future.set_exception(TaskFailed(f"unreadable result ({type(exc).__name__})"))

    async def result(self, task_id: str) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending[task_id] = Waiting(future, time.monotonic())
        early = self.early.take(task_id)
        if early is not None:
            self._pushed(early)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            return await future
        finally:
            self.pending.pop(task_id, None)

    async def _poll(self) -> None:
        """Sleep the interval (0: ask again as soon as the last answer came), then ask about every
        pending task at once; with the result queue, only about those waiting longer than the
        interval (the queue brings the others), as the gateway's safety net does."""
        while self.pending:
            await asyncio.sleep(self.poll_interval)
            overdue = time.monotonic() - self.poll_interval
            task_ids = [
                task_id
                for task_id, waiting in self.pending.items()
                if self.queue is None or waiting.since <= overdue
            ][:MAX_TASKS_PER_POLL]
            if not task_ids:
                continue
            try:
                answer = await self._blocking(functools.partial(self.v2.get_task_batch, task_ids))
            except globus_sdk.GlobusError:
                self.poll_errors += 1
                continue
            self.polls += 1
            for task_id, document in dict(answer.data.get("results", {})).items():
                self._settle(task_id, document)

    def _settle(self, task_id: str, document: dict[str, Any]) -> None:
        waiting = self.pending.get(task_id)
        if waiting is None or waiting.future.done():
            return
        future = waiting.future
        status = str(document.get("status", "")).lower()
        if status == "success" and "result" in document:
            try:
                future.set_result(self.serializer.deserialize(document["result"]))
            except Exception as exc:
                future.set_exception(TaskFailed(f"unreadable result ({type(exc).__name__})"))
        elif status == "failed" or "exception" in document:
            future.set_exception(TaskFailed(str(document.get("exception") or document.get("reason"))))

    async def _blocking(self, call: Callable[[], Result]) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.queue is not None:
            await self.queue.close()
        for sending in self.sending:
            sending.cancel()
        await self.submission.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def print_change(up: bool) -> None:
    print(f"result queue {'consumed' if up else 'down'}", file=sys.stderr)


def cpu_seconds() -> float:
    """This process's CPU time, every thread's: what the gateway's CPU would spend on the same work."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def request(compute: Compute, params: dict[str, Any], timeout: float, tally: Tally) -> None:
    """One request from submit to its result read as JSON; failures count by kind, like loadgen's."""
    started = time.perf_counter()
    try:
        task_id = await compute.submit(params)
        value = await asyncio.wait_for(compute.result(task_id), timeout)
        json.loads(value)
    except (globus_sdk.GlobusError, TaskFailed, TimeoutError, ValueError, TypeError) as exc:
        tally.failures += 1
        tally.statuses[type(exc).__name__] += 1
        return
    tally.latencies.append(time.perf_counter() - started)
    tally.statuses["200"] += 1


async def run_phase(
    compute: Compute, params: dict[str, Any], concurrency: int, budget: Budget, timeout: float
) -> tuple[Tally, float]:
    tally = Tally()

    async def worker() -> None:
        while budget.take():
            await request(compute, params, timeout, tally)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally, time.perf_counter() - started


async def measure(compute: Compute, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up (the service account's token, connections), then one phase bounded in count and time."""
    params = {**json.loads(args.body), "openai_endpoint": "chat/completions", "api_port": API_PORT}
    if args.warmup:
        warm = Budget(args.warmup, time.perf_counter() + WARMUP_SECONDS)
        await run_phase(compute, params, args.concurrency, warm, args.timeout)
    polls_before, cpu_before = compute.polls, cpu_seconds()
    budget = Budget(min(args.requests or MAX_REQUESTS, MAX_REQUESTS), time.perf_counter() + args.duration)
    tally, elapsed = await run_phase(compute, params, args.concurrency, budget, args.timeout)
    polls, cpu = compute.polls - polls_before, cpu_seconds() - cpu_before
    return {
        "concurrency": args.concurrency,
        **summarize(tally, elapsed, stream=False),
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_request": round(cpu / len(tally.latencies) * 1000, 3) if tally.latencies else None,
        "threads": args.threads,
        "poll_interval_s": args.poll_interval,
        "polls": polls,
        "poll_cycle_ms": round(elapsed / polls * 1000, 2) if polls else None,
        "poll_errors": compute.poll_errors,
        "result_queue": compute.queue is not None,
        "pushed": compute.pushed,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    compute = Compute(
        Service.load(args.service),
        threads=args.threads,
        poll_interval=args.poll_interval,
        timeout=args.timeout,
        result_queue=args.result_queue,
    )
    try:
        return await measure(compute, args)
    finally:
        await compute.close()


def bounded(low: float, high: float, kind: Callable[[str], Any] = float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}]")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--service", type=Path, required=True, help="the fake's announcement (JSON)")
    parser.add_argument("--body", default=DEFAULT_BODY, help="the client's request body (JSON)")
    parser.add_argument("--concurrency", type=bounded(1, 10_000, int), default=1)
    parser.add_argument("--requests", type=bounded(1, MAX_REQUESTS, int), help="stop after this many")
    parser.add_argument("--duration", type=bounded(0.1, MAX_DURATION), default=5.0, help="seconds")
    parser.add_argument("--warmup", type=bounded(0, 100_000, int), default=0, help="requests before")
    parser.add_argument("--poll-interval", type=bounded(0, 60), default=DEFAULT_POLL_INTERVAL)
    parser.add_argument("--threads", type=bounded(1, 512, int), default=DEFAULT_THREADS)
    parser.add_argument("--timeout", type=bounded(0.1, MAX_DURATION), default=60.0, help="per request")
    parser.add_argument("--result-queue", action="store_true", help="results from the fake's AMQP queue")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        result = runner.run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
