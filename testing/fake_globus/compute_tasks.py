"""Tasks and endpoints as the fake Globus Compute (``compute.py``) keeps them, and how an endpoint's
worker runs a task: the payload unpacked, the function called in a thread of its own, the result
or the error encoded as ``globus-compute-endpoint`` encodes it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from globus_compute_sdk.errors import MaxResultSizeExceeded
from globus_compute_sdk.serialize import ComputeSerializer

WAITING = "waiting-for-ep"
RUNNING = "running"
SUCCESS = "success"
FAILED = "failed"
ONLINE = "online"
OFFLINE = "offline"
# A worker refuses results larger than this (globus-compute-endpoint's default result_size_limit).
RESULT_SIZE_LIMIT = 10 * 1024 * 1024


@dataclass
class FakeEndpoint:
    """An endpoint as the service sees it: connected or not, and how many managers (nodes) it has."""

    endpoint_id: str
    status: str
    managers: int
    honours_result_serializers: bool = True
    """False: an older globus-compute-endpoint, which serializes every result with its default (dill)."""
    # Replaced (and the old one set) on every change, so waiters wake up and look again.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def status_document(self, tasks: Iterable[FakeTask]) -> dict[str, Any]:
        """``GET /v2/endpoints/{id}/status``: the shape of globus-sdk's example document. Worker and task
        counts are approximations (one worker per manager); the gateway only reads ``status`` and
        ``details.managers``."""
        mine = [t for t in tasks if t.endpoint_id == self.endpoint_id]
        waiting = sum(1 for t in mine if t.status == WAITING)
        running = sum(1 for t in mine if t.status == RUNNING)
        details = {
            "total_workers": self.managers,
            "idle_workers": max(0, self.managers - running),
            "pending_tasks": waiting,
            "outstanding_tasks": waiting + running,
            "managers": self.managers,
        }
        return {"status": self.status, "details": details}


@dataclass
class FakeTask:
    """One submitted task: what it was called with, where it is, and what the service will answer for it."""

    task_id: str
    function_id: str
    endpoint_id: str
    task_group_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    result_serializers: list[str]
    status: str = WAITING
    result: str | None = None  # serialized, exactly as on the wire
    exception: str | None = None  # traceback text, exactly as on the wire
    completion_t: str | None = None
    details: dict[str, Any] | None = None
    value: Any = None  # what the function returned, before serialization
    error: BaseException | None = None  # what it raised
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    payload_error: Exception | None = None  # an undecodable payload fails on the endpoint, not at submit
    result_queue: str | None = None  # where the service pushes the result, when the submit asked for it
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def submitted(
        cls, endpoint_id: str, function_id: str, task_group_id: str, payload: str, serializers: list[str]
    ) -> FakeTask:
        """A task as submitted, waiting; an undecodable payload is kept, to fail once the task runs."""
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        payload_error: Exception | None = None
        try:
            args, kwargs = unpack_payload(payload)
        except Exception as exc:
            payload_error = exc
        return cls(
            task_id=str(uuid.uuid4()),
            function_id=function_id,
            endpoint_id=endpoint_id,
            task_group_id=task_group_id,
            args=args,
            kwargs=kwargs,
            result_serializers=list(serializers),
            payload_error=payload_error,
        )

    @property
    def done(self) -> bool:
        return self.status in (SUCCESS, FAILED)

    def document(self) -> dict[str, Any]:
        """The task document of ``GET /v2/tasks/{id}`` and ``batch_status``: ``result`` and ``exception`` are
        present only when set, ``completion_t`` always (null while pending)."""
        body: dict[str, Any] = {
            "task_id": self.task_id,
            "status": self.status,
            "completion_t": self.completion_t,
        }
        if self.result is not None:
            body["result"] = self.result
        if self.exception is not None:
            body["exception"] = self.exception
        if self.details is not None:
            body["details"] = self.details
        return body


@dataclass
class Outcome:
    """What a worker thread hands back to the event loop; the thread never touches the task itself."""

    started: float
    ended: float
    result: str | None = None
    value: Any = None
    exception: str | None = None
    error: BaseException | None = None


def unpack_payload(payload: str) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) from a payload built by ``Batch.add``: two packed, serialized buffers."""
    buffers = ComputeSerializer.unpack_buffers(payload)
    if len(buffers) != 2:
        raise ValueError(f"expected 2 buffers (args, kwargs), got {len(buffers)}")
    serde = ComputeSerializer()
    args, kwargs = serde.deserialize(buffers[0]), serde.deserialize(buffers[1])
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise TypeError(f"args must be a sequence and kwargs a dict, got {type(args)}, {type(kwargs)}")
    return list(args), kwargs


def error_string(exc: BaseException) -> str:
    """What a worker reports for an exception: the traceback without its own frame, or ``repr`` for the
    worker's internal errors (``get_error_string`` in globus-compute-endpoint)."""
    if isinstance(exc, MaxResultSizeExceeded):
        return repr(exc)
    tb = exc.__traceback__
    inner = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    return "".join(traceback.format_exception(type(exc), exc, inner))


def check_status(status: str) -> None:
    if status not in (ONLINE, OFFLINE):
        raise ValueError(f"endpoint status must be {ONLINE!r} or {OFFLINE!r}, not {status!r}")


async def online(endpoint: FakeEndpoint) -> None:
    """Return once the endpoint is connected; the event is read before the status, so no change is missed."""
    while True:
        changed = endpoint.changed
        if endpoint.status == ONLINE:
            return
        await changed.wait()


async def in_daemon_thread(call: Callable[..., Outcome], *args: Any) -> Outcome:
    """Run a blocking call in a fresh daemon thread. Not the loop's default executor: long remote functions
    would starve the test's own ``asyncio.to_thread`` SDK calls, and a hung one would block the exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Outcome] = loop.create_future()

    def deliver(outcome: Outcome) -> None:
        if not future.done():  # cancelled when the fake stopped meanwhile
            future.set_result(outcome)

    def work() -> None:
        outcome = call(*args)  # never raises: _execute turns every exception into an outcome
        with contextlib.suppress(RuntimeError):  # a closed loop: the test is over, nobody waits for this
            loop.call_soon_threadsafe(deliver, outcome)

    threading.Thread(target=work, name="fake-compute-task", daemon=True).start()
    return await future


def execute(
    task: FakeTask, function: Callable[..., Any], honours_serializers: bool, size_limit: int
) -> Outcome:
    """Runs in a worker thread, like ``execute_task`` on an endpoint: call, serialize, check the size.
    Unlike a worker, which dies on ``SystemExit`` and the like, this reports any exception as failed.
    An endpoint that does not honour the task's result serializers answers in its default (dill)."""
    started = time.time()
    try:
        if task.payload_error is not None:
            raise task.payload_error
        value = function(*task.args, **task.kwargs)
        if honours_serializers:
            result = ComputeSerializer.serialize_from_list(value, task.result_serializers)
        else:
            result = ComputeSerializer().serialize(value)
        if len(result) > size_limit:
            raise MaxResultSizeExceeded(len(result), size_limit)
    except BaseException as exc:
        return Outcome(started, time.time(), exception=error_string(exc), error=exc)
    return Outcome(started, time.time(), result=result, value=value)
