"""The Globus Compute service as adaptors use it: submitting tasks and waiting for their results.

One `ComputeService` per gateway and set of credentials holds the SDK clients, the submitter
(adaptors/compute_submit.py: submissions of the same moment coalesced into one call) and one result
poller, which asks the service about every task due for a look at once: no AMQP and no polling loop
per request. Adaptors get it from `AdaptorContext.shared` (`acquire_service`), so every endpoint
and cluster with the same credentials shares it, and the last one to shut down closes it.

How results are polled (adaptive, so that a quick task's result comes within tens of ms while the
service sees no more status calls than a fixed 50 ms cadence would make):

- each task is first due for a look when recent tasks were found finished (`_expected`, learned
  by probing: a task found at its first look pulls the estimate earlier, one found later pulls it
  to the middle of the interval in which it finished), `FIRST_CHECK_SECONDS` before anything is
  learned, never sooner than `MIN_FIRST_CHECK_SECONDS`; after a miss, `FIRST_CHECK_SECONDS` later,
  then after twice the previous wait, up to `poll_interval_seconds` (long tasks settle to that
  cadence);
- a task being due is what makes a call (`get_task_batch`) go out, and the call then asks about
  every pending task (up to `MAX_TASKS_PER_POLL`, the longest due first): the cap counts calls, not
  the tasks they name, so any finished task may as well be found by it. The tasks due within
  `NEIGHBOUR_SECONDS` (one call's worth at the long-run rate) or before the next call could go out
  move on in their schedule, so that neighbours keep sharing calls; the others, looked at long
  before they were due, keep theirs and back off no faster for it;
- the calls spend a budget (adaptors/call_budget.py) of `STATUS_CALLS_PER_SECOND` (or one per
  `poll_interval_seconds` when that is shorter) with a burst of `STATUS_CALL_BURST`, whatever the
  number of tasks: in the long run no more status calls per process than a 50 ms cadence makes, while
  a fresh task after a quiet spell is looked at when it is due, not 50 ms after the previous call;
- the calls run on a thread of their own, not in the adaptors' shared pool, so that a poll never
  waits behind a burst of submissions (or of anything else) queued there.

With `result_queue` (the default) results are pushed as well: tasks are submitted in one task group
with `create_queue`, whose AMQP queue the service publishes each result to, and which
adaptors/compute_result_queue.py consumes. While it does, a task is first looked at only after
`poll_interval_seconds` (the poll is then a safety net, for a message that never comes); when the
queue goes down, every task waiting is due for a look at once, and polling is as without a queue.
A result may be pushed before its request starts waiting for it (the message can beat the answer
to the submission): it is kept a short while for the request to find (adaptors/compute_early.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import globus_sdk
from globus_compute_sdk.sdk.batch import Batch
from globus_compute_sdk.serialize import ComputeSerializer

from adaptors.call_budget import CallBudget
from adaptors.compute_clients import Clients, json_serializer, queue_details, sdk_clients
from adaptors.compute_config import ComputeAccess
from adaptors.compute_early import EarlyResults
from adaptors.compute_result_queue import QueuedResult, ResultQueue
from adaptors.compute_results import UnreadableResult, read_result
from adaptors.compute_submit import Submitter
from adaptors.compute_submit_call import SubmitCall, submit_call
from adaptors.context import AdaptorContext
from adaptors.telemetry import Telemetry

log = logging.getLogger(__name__)

GLOBUS_COMPUTE = "Globus Compute"
"""The service's name in what clients are told (see adaptors/transport.py)."""
RESULT_SERIALIZERS = ["globus_compute_sdk.serialize.JSONData"]
MAX_TASKS_PER_POLL = 1000
FIRST_CHECK_SECONDS = 0.02
MIN_FIRST_CHECK_SECONDS = 0.005
LEARNING_WEIGHT = 0.2
STATUS_CALLS_PER_SECOND = 20.0
STATUS_CALL_BURST = 5
NEIGHBOUR_SECONDS = 1 / STATUS_CALLS_PER_SECOND
Result = TypeVar("Result")


class TaskFailed(Exception):
    """The remote function raised; the text is the remote error."""


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    deadline: float
    submitted: float
    on_started: Callable[[float], None] | None
    accept_dill: bool
    due: float
    """When it is next worth a look."""
    wait: float
    """How long after the last look that was."""
    looked: float | None = None
    """When it was last looked at."""
    missed: float | None = None
    """When it was looked at before that, and found unfinished."""
    scheduled: bool = False
    """Whether it has had the look it was due for (and is backing off since)."""
    started: bool = False


@dataclass
class ComputeService:
    """The SDK clients and the result poller for one set of credentials, shared in a gateway."""

    access: ComputeAccess
    key: Hashable
    """What it is shared under: `access.service_key()` when it was made."""
    executor: Executor
    telemetry: Telemetry
    _clients: Clients | None = None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _poller: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _wake_at: float = 0.0
    """When the poller, asleep, wakes up; a task due earlier (and after `_not_before`) wakes it."""
    _not_before: float = 0.0
    """The earliest the next status call may be made (when the budget has room for it)."""
    _budget: CallBudget = field(init=False)
    """The status calls' budget: kept across pollers (one ends when no task is left), so that
    requests one after the other share it."""
    _expected: float | None = None
    """How long after submission recent tasks were found finished."""
    _poll_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute-poll")
    )
    _serializer: ComputeSerializer = field(default_factory=json_serializer)
    _submitter: Submitter | None = None
    _submit_call: SubmitCall | None = None
    _queue: ResultQueue | None = None
    _group: str | None = None
    """The task group the service made for the first submission; later ones join it."""
    _early: EarlyResults = field(default_factory=EarlyResults)
    answering: int = 0
    """Requests of the endpoint adaptors waiting for their answer, counted from before submission
    (a burst of requests after a status call released many answers counts at once)."""

    def __post_init__(self) -> None:
        rate = max(STATUS_CALLS_PER_SECOND, 1 / self.access.poll_interval_seconds)
        self._budget = CallBudget(rate, STATUS_CALL_BURST)

    async def submit(
        self,
        endpoint_uuid: str,
        function_uuid: str,
        *args: Any,
        endpoint_config: dict[str, Any] | None = None,
    ) -> str:
        """`endpoint_config` is the task's `user_endpoint_config`, which the endpoint's template reads."""
        if self._submitter is None:
            self._submitter = Submitter(self._post)
            if self.access.result_queue:
                self._queue = ResultQueue(
                    self._queue_details, self._pushed, self._queue_changed, self.access.result_queue_port
                )
        return await self._submitter.submit(endpoint_uuid, function_uuid, args, endpoint_config)

    async def result(
        self,
        task_id: str,
        timeout: float,
        on_started: Callable[[float], None] | None = None,
        accept_dill: bool = False,
    ) -> Any:
        """The task's return value. A timeout gives up waiting; the task itself keeps running.
        `on_started` gets the seconds the task waited for the endpoint (to a poll's resolution).
        Raises `TaskFailed`, `UnreadableResult` or `TimeoutError`."""
        future = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        expected = FIRST_CHECK_SECONDS if self._expected is None else self._expected
        first = min(max(expected, MIN_FIRST_CHECK_SECONDS), self.access.poll_interval_seconds)
        if self._queue is not None and self._queue.up:
            first = self.access.poll_interval_seconds
        self._pending[task_id] = _Pending(
            future, now + timeout, now, on_started, accept_dill, now + first, first
        )
        early = self._early.take(task_id)
        if early is not None:
            self._pushed(early)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        elif max(now + first, self._not_before) < self._wake_at:
            self._wake.set()
        self.telemetry.tasks_in_flight(1)
        try:
            return await future
        finally:
            self.telemetry.tasks_in_flight(-1)
            self._pending.pop(task_id, None)

    async def endpoint_status(self, endpoint_uuid: str) -> dict[str, Any]:
        return await self._blocking(lambda: dict(self._sdk()[0].get_endpoint_status(endpoint_uuid).data))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._queue is not None:
            await self._queue.close()
        if self._submitter is not None:
            self._submitter.close()
        if self._submit_call is not None:
            await self._submit_call.close()
        self._poll_thread.shutdown(wait=False, cancel_futures=True)

    async def _poll(self) -> None:
        while self._pending:
            now = time.monotonic()
            self._expire(now)
            pending = [p for p in self._pending.values() if not p.future.done()]
            if not pending:
                await asyncio.sleep(0)  # the waiters remove their tasks as they wake
                continue
            self._not_before = now + self._budget.wait()
            due_at = max(min(p.due for p in pending), self._not_before)
            wake_at = min(due_at, min(p.deadline for p in pending))
            if wake_at > now:
                self._wake_at = wake_at
                self._wake.clear()
                with suppress(TimeoutError):  # not `wait_for`: on Python 3.11 it can lose a cancellation
                    async with asyncio.timeout(wake_at - now):
                        await self._wake.wait()
                continue
            self._budget.spend()
            await self._look(self._asked_about(), now + max(self._budget.wait(), NEIGHBOUR_SECONDS))

    def _asked_about(self) -> list[str]:
        """Every pending task, the longest due first when there are too many for one call."""
        pending = [(p.due, task_id) for task_id, p in self._pending.items() if not p.future.done()]
        if len(pending) > MAX_TASKS_PER_POLL:
            pending = sorted(pending)[:MAX_TASKS_PER_POLL]
        return [task_id for _, task_id in pending]

    async def _look(self, task_ids: list[str], horizon: float) -> None:
        """Ask about `task_ids`; those due by `horizon` are next due after their back-off."""
        asked = time.monotonic()
        for task_id in task_ids:
            pending = self._pending[task_id]
            if pending.due <= horizon:
                later = pending.wait * 2 if pending.scheduled else FIRST_CHECK_SECONDS
                pending.wait = min(later, self.access.poll_interval_seconds)
                pending.due = asked + pending.wait
                pending.scheduled = True
            pending.missed, pending.looked = pending.looked, asked
        try:
            documents = await asyncio.get_running_loop().run_in_executor(
                self._poll_thread, self._ask, task_ids
            )
            self.telemetry.poll(time.monotonic() - asked)
        except globus_sdk.GlobusError as exc:
            log.warning("Globus Compute status poll failed: %s", type(exc).__name__)
            return
        except Exception:
            log.exception("Globus Compute status poll failed")
            return
        for task_id, document in documents.items():
            self._settle(task_id, document)

    async def statuses(self, task_ids: list[str]) -> dict[str, Any]:
        """The raw task documents, for every id at once (`get_batch_result` would drop failures)."""

        return await self._blocking(lambda: self._ask(task_ids))

    def _ask(self, task_ids: list[str]) -> dict[str, Any]:
        answer = self._sdk()[0].get_task_batch(task_ids)
        results = answer.data.get("results", {}) if isinstance(answer.data, dict) else {}
        return dict(results)

    async def _post(
        self,
        endpoint_uuid: str,
        endpoint_config: dict[str, Any] | None,
        tasks: list[tuple[str, tuple[Any, ...]]],
    ) -> dict[str, Any]:
        """One V3 submission of `tasks` (function_uuid, args), on the event loop where the service can
        be reached so (adaptors/compute_submit_call.py)."""
        call = await self._submission()
        batch = Batch(
            task_group_id=self._group,
            serializer=self._serializer,
            result_serializers=RESULT_SERIALIZERS,
            request_queue=self._queue is not None,
            user_endpoint_config=endpoint_config,
        )
        for function_uuid, args in tasks:
            batch.add(function_uuid, args=args)
        answer = await call.submit(endpoint_uuid, batch.prepare())
        group = answer.get("task_group_id")
        if isinstance(group, str):
            self._follow(group)
        return answer

    async def _submission(self) -> SubmitCall:
        """Made on first use in a worker thread, with the clients (and the TLS bundle read)."""
        if self._submit_call is None:
            timeout = self.access.http_timeout_seconds
            made = await self._blocking(lambda: submit_call(self._sdk()[1], self._blocking, timeout))
            self._submit_call = self._submit_call or made  # the first of concurrent first calls
        return self._submit_call

    def _follow(self, group: str) -> None:
        """Consume the results of the group the service put the tasks in; later submissions join
        the first group (concurrent first submissions may each get a group of their own)."""
        if self._queue is not None:
            self._group = self._group or group
            self._queue.follow(group)

    async def _queue_details(self) -> tuple[str, str]:
        return await self._blocking(lambda: queue_details(self._sdk()))

    def _pushed(self, result: QueuedResult) -> None:
        """A result from the queue: settles its request, or is kept for one that has yet to wait."""
        pending = self._pending.get(result.task_id)
        if pending is None:
            self._early.keep(result)
            return
        if pending.future.done():
            return
        if result.data is None:  # high assurance: the data is only in the task's document
            self._due_now(pending)
            return
        self.telemetry.result("queue")  # not `on_started`: when the task started is not known
        if result.failed:
            pending.future.set_exception(TaskFailed(result.data))
            return
        try:
            pending.future.set_result(read_result(self._serializer, result.data, pending.accept_dill))
        except UnreadableResult as exc:
            pending.future.set_exception(exc)

    def _queue_changed(self, up: bool) -> None:
        """Down: every task waiting is looked at soon, as when results are only polled."""
        self.telemetry.result_queue(up)
        if not up:
            for pending in self._pending.values():
                self._due_now(pending)

    def _due_now(self, pending: _Pending) -> None:
        soon = time.monotonic() + MIN_FIRST_CHECK_SECONDS
        if pending.due > soon:
            pending.due, pending.wait, pending.scheduled = soon, FIRST_CHECK_SECONDS, False
            if soon < self._wake_at:
                self._wake.set()

    def value(self, document: dict[str, Any], accept_dill: bool = False) -> Any:
        """A finished task's return value: JSON, or with `accept_dill` plain data pickled by dill."""
        return read_result(self._serializer, str(document["result"]), accept_dill)

    def _settle(self, task_id: str, document: dict[str, Any]) -> None:
        pending = self._pending.get(task_id)
        if pending is None or pending.future.done():
            return
        status = str(document.get("status", "")).lower()
        if status in ("success", "failed"):
            self._learn(pending)
        if status in ("running", "success", "failed") and not pending.started:
            pending.started = True
            if pending.on_started is not None:
                pending.on_started(time.monotonic() - pending.submitted)
        if status == "success" and "result" in document:
            self.telemetry.result("poll")
            try:
                pending.future.set_result(self.value(document, pending.accept_dill))
            except UnreadableResult as exc:
                pending.future.set_exception(exc)
        elif status == "failed" or "exception" in document:
            self.telemetry.result("poll")
            pending.future.set_exception(TaskFailed(str(document.get("exception") or document.get("reason"))))

    def _learn(self, pending: _Pending) -> None:
        """When the next tasks are first looked at: a little earlier than this one if it was found at
        its first look, else the middle of the interval in which it finished."""
        if pending.looked is None:
            return
        if pending.missed is None:
            found = (1 - LEARNING_WEIGHT) * (pending.looked - pending.submitted)
        else:
            found = (pending.missed + pending.looked) / 2 - pending.submitted
        previous = found if self._expected is None else self._expected
        self._expected = (1 - LEARNING_WEIGHT) * previous + LEARNING_WEIGHT * found

    def _expire(self, now: float) -> None:
        for pending in self._pending.values():
            if now >= pending.deadline and not pending.future.done():
                pending.future.set_exception(TimeoutError())

    async def _blocking(self, call: Callable[[], Result]) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def _sdk(self) -> Clients:
        """Built on first use, in a worker thread: the authorizer fetches a token as it is built."""
        if self._clients is None:
            self._clients = sdk_clients(self.access)
        return self._clients


def acquire_service(access: ComputeAccess, context: AdaptorContext) -> ComputeService:
    """The gateway's service for these credentials and URLs; `release_service` it at shutdown."""
    key = access.service_key()

    def make() -> ComputeService:
        return ComputeService(access, key, context.executor, context.telemetry)

    return context.shared.acquire(ComputeService, key, make)


async def release_service(service: ComputeService, context: AdaptorContext) -> None:
    """The last user closes it (its poller)."""
    if context.shared.release(ComputeService, service.key) is not None:
        await service.close()
