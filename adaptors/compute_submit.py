"""Submissions to Globus Compute, coalesced: tasks submitted in the same moment for the same endpoint
(and `user_endpoint_config`) go out as one V3 batch submission.

Each web call costs CPU (about 0.25 ms over the gateway's own client, adaptors/compute_submit_call.py;
about 1 ms through `requests` in a worker thread); under a burst of requests one call per task
queues the burst behind itself. The V3 submit API takes many tasks (`Batch`), and answers their ids
per function in the order they were added.

When a group goes out: at the next turn of the event loop (every task submitted by handlers that
run in the same turn joins it), or, while another submission of this submitter is already on the
wire, `BURST_WINDOW_SECONDS` later (a burst is under way: a few ms more gather most of it into the
same call). A group of `MAX_TASKS_PER_SUBMIT` goes at once. A lone request therefore waits no
timer at all.

Why 10 ms: with results pushed over the result queue, answers (and so the clients' next requests)
arrive one by one rather than in the bursts a status call releases. With calls through `requests`
(about 1.2 ms of CPU each) at 100 requests in flight on the AMD VM, a 3 ms window made 133 calls a
second (0.47 ms of gateway CPU per request, p50 58 ms), 10 ms made 64 (0.38 ms, 49 ms), 20 ms made
37 (0.36 ms, 53 ms): the wait costs more than it saves beyond 10 ms.

Each caller gets its own task id or its own error: a task whose arguments cannot be serialized
fails alone, and when the service refuses a whole batch for a reason that may be one task's (a
4xx other than 401 and 429, such as an unknown function), each task is sent again alone, so that
the caller whose task is at fault gets the service's answer and the others get their ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import globus_sdk

MAX_TASKS_PER_SUBMIT = 100
BURST_WINDOW_SECONDS = 0.010
Post = Callable[[str, dict[str, Any] | None, list[tuple[str, tuple[Any, ...]]]], Awaitable[dict[str, Any]]]
"""Builds one batch of (function_uuid, args) for the endpoint and config, submits it, and returns
the service's answer; raises what the SDK raises (for a task that cannot be serialized too)."""


@dataclass
class _Task:
    function_uuid: str
    args: tuple[Any, ...]
    future: asyncio.Future[str]


@dataclass
class _Group:
    endpoint_uuid: str
    endpoint_config: dict[str, Any] | None
    tasks: list[_Task] = field(default_factory=list)


@dataclass
class Submitter:
    """Gathers submissions into groups per endpoint and config, and sends each group in one call
    (`post`)."""

    post: Post
    _groups: dict[tuple[str, str], _Group] = field(default_factory=dict)
    _sending: set[asyncio.Task[None]] = field(default_factory=set)

    async def submit(
        self,
        endpoint_uuid: str,
        function_uuid: str,
        args: tuple[Any, ...],
        endpoint_config: dict[str, Any] | None,
    ) -> str:
        loop = asyncio.get_running_loop()
        key = (endpoint_uuid, repr(sorted(endpoint_config.items())) if endpoint_config else "")
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(endpoint_uuid, endpoint_config or None)
            if self._sending:
                loop.call_later(BURST_WINDOW_SECONDS, self._send, key, group)
            else:
                loop.call_soon(self._send, key, group)
        future: asyncio.Future[str] = loop.create_future()
        group.tasks.append(_Task(function_uuid, args, future))
        if len(group.tasks) >= MAX_TASKS_PER_SUBMIT:
            self._send(key, group)
        return await future

    def close(self) -> None:
        for sending in self._sending:
            sending.cancel()

    def _send(self, key: tuple[str, str], group: _Group) -> None:
        """Closes the group (once: a full group is sent before its timer fires) and sends it."""
        if self._groups.get(key) is not group:
            return
        del self._groups[key]
        tasks = [task for task in group.tasks if not task.future.done()]
        if tasks:
            sending = asyncio.get_running_loop().create_task(self._deliver(group, tasks))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    async def _deliver(self, group: _Group, tasks: list[_Task]) -> None:
        outcomes: list[str | BaseException]
        try:
            outcomes = await self._outcomes(group, tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.future.cancel()
            raise
        except Exception as exc:
            outcomes = [exc] * len(tasks)
        for task, outcome in zip(tasks, outcomes, strict=True):
            if task.future.done():
                continue
            if isinstance(outcome, BaseException):
                task.future.set_exception(outcome)
            else:
                task.future.set_result(outcome)

    async def _outcomes(self, group: _Group, tasks: list[_Task]) -> list[str | BaseException]:
        """The task ids, or each task's error."""
        try:
            answer = await self.post(
                group.endpoint_uuid, group.endpoint_config, [(t.function_uuid, t.args) for t in tasks]
            )
        except Exception as exc:
            if len(tasks) > 1 and _maybe_one_tasks_fault(exc):
                return [await self._alone(group, task) for task in tasks]
            return [exc] * len(tasks)
        ids = {function: iter(task_ids) for function, task_ids in answer["tasks"].items()}
        return [str(next(ids[task.function_uuid])) for task in tasks]

    async def _alone(self, group: _Group, task: _Task) -> str | BaseException:
        try:
            return (await self._outcomes(group, [task]))[0]
        except Exception as exc:
            return exc


def _maybe_one_tasks_fault(exc: Exception) -> bool:
    """Anything but the service's answer (a payload that cannot be serialized), or a refusal that may
    be about one task; not a network error, an outage or the credentials, which every task shares."""
    if not isinstance(exc, globus_sdk.GlobusError):
        return True
    return (
        isinstance(exc, globus_sdk.GlobusAPIError)
        and 400 <= exc.http_status < 500
        and exc.http_status not in (401, 429)
    )
