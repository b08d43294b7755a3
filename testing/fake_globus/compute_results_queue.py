"""The fake Globus Compute service's result queues: each finished task of a task group that asked for a
queue is pushed to a real RabbitMQ broker, as the real service pushes results to globus-compute-sdk's
``Executor`` (its ``_ResultWatcher``).

What the SDK expects, read in globus-compute-sdk 4.19 (``sdk/executor.py``, ``sdk/batch.py``) and
globus-sdk (``ComputeClientV2.get_result_amqp_url`` and its example document):

- ``GET /v2/get_amqp_result_connection_url`` answers ``{"queue_prefix", "connection_url"}``; the watcher
  connects with ``pika.URLParameters(connection_url)`` and only consumes (``basic_consume`` on
  ``f"{queue_prefix}{task_group_id}"``, manual acks); it never declares the queue, so the service must
  have created it when it accepted a submit with ``"create_queue": true`` (``Batch.prepare``);
- a message body is ``globus_compute_common.messagepack.pack(Result(...))``; the watcher matches it to a
  future by ``task_id``, deserializes ``data`` on success and raises ``TaskExecutionFailed(data,
  str(properties.timestamp))`` when ``error_details`` is set; a true ``high_assurance`` header makes it
  fetch the result with a status call instead of reading ``data``.

The Result itself is the one the endpoint's worker sends (``globus_compute_endpoint.engines.helper.
execute_task``, forwarded unchanged by the service, assumed): ``data`` is the serialized result, or for a
failure the same error text the task document's ``exception`` holds, with ``error_details`` of code
``RemoteExecutionError`` (or the class name and ``"remote error: ..."`` for the worker's own errors such
as ``MaxResultSizeExceeded``); ``details`` are the worker's environment and endpoint id; ``task_statuses``
the execution start and end.

Assumed (the service is closed source): the queue is durable and neither exclusive nor auto-deleted (a
later watcher of the same task group, e.g. after ``reload_tasks``, must find it and its unread results);
messages are persistent, carry the completion time as the AMQP ``timestamp`` and no content type; a
high-assurance result carries no data; a failed declare (broker down) does not fail the submit, whose
tasks stay readable by polling. Not modelled: per-user credentials and queue permissions (the fake hands
out the broker's guest URL), expiry of abandoned queues.

Publishing never blocks the fake's event loop: one pika ``AsyncioConnection`` and one channel on that
loop, in confirm mode; at most ``MAX_UNCONFIRMED`` messages wait for the broker's confirmation, more are
dropped (and counted). When the broker goes away, results are dropped (they stay pollable) and the
publisher reconnects every ``RECONNECT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import Any, Final

import pika
import pika.exceptions
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails, TaskTransition
from globus_compute_common.tasks import ActorName, TaskState
from globus_compute_sdk.errors import MaxResultSizeExceeded
from pika.adapters.asyncio_connection import AsyncioConnection

from testing.fake_globus.compute_tasks import FakeTask

log = logging.getLogger(__name__)

QUEUE_PREFIX: Final = "fake-compute-results."
DECLARE_TIMEOUT: Final = 5.0
"""A submit waits this long at most for the broker to declare its queue."""
CONNECT_TIMEOUT: Final = 5.0
"""Start waits this long at most for the first connection; the publisher keeps trying afterwards."""
RECONNECT_SECONDS: Final = 0.5
MAX_UNCONFIRMED: Final = 10_000
"""Published but not yet confirmed by the broker: the bound on what the fake buffers for it."""
DECLARED_MEMORY: Final = 10_000
"""Queue names declared on the current connection, not declared again (most recent kept)."""
PERSISTENT: Final = 2
TRANSIENT: Final = 1


def error_details(error: BaseException | None) -> ResultErrorDetails:
    """What the worker reports beside the error text: its own errors by class name, the user's code's
    errors under one code with a fixed message."""
    if isinstance(error, MaxResultSizeExceeded):
        return ResultErrorDetails(code=type(error).__name__, user_message=f"remote error: {error}")
    return ResultErrorDetails(
        code="RemoteExecutionError", user_message="An error occurred during the execution of this task"
    )


def result_message(task: FakeTask, *, high_assurance: bool) -> bytes:
    """The packed Result of a finished task."""
    details = dict(task.details or {})
    transitions = details.pop("task_transitions", {})
    statuses = [
        TaskTransition(timestamp=int(float(at) * 1e9), state=state, actor=ActorName.WORKER)
        for state, at in (
            (TaskState.EXEC_START, transitions.get("execution-start", task.started_at or 0.0)),
            (TaskState.EXEC_END, transitions.get("execution-end", task.finished_at or 0.0)),
        )
    ]
    failed = task.exception is not None
    data = "" if high_assurance else (task.exception if failed else task.result) or ""
    result = Result(
        task_id=uuid.UUID(task.task_id),
        data=data,
        details=details,
        error_details=error_details(task.error) if failed else None,
        task_statuses=statuses,
    )
    return messagepack.pack(result)


def result_properties(
    task: FakeTask, *, high_assurance: bool, persistent: bool = True
) -> pika.BasicProperties:
    headers = {"high_assurance": True} if high_assurance else None
    return pika.BasicProperties(
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        timestamp=int(task.finished_at or 0),
        headers=headers,
    )


class ResultPublisher:
    """One connection and channel to the broker on the running event loop, kept open: queues declared,
    results published, both without waiting on the broker except where a submit must."""

    def __init__(self, url: str) -> None:
        self.parameters = pika.URLParameters(url)
        self.parameters.connection_attempts = 1
        self.published = 0
        self.confirmed = 0
        """Answered by the broker: acknowledged, or refused (logged)."""
        self.dropped = 0
        self.returned = 0
        """Published but unroutable (no such queue): the broker sends these back."""
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Any = None
        self._channel: Any = None
        self._ready = asyncio.Event()
        self._gone = asyncio.Event()
        self._closing = False
        self._retry: asyncio.TimerHandle | None = None
        self._declared: OrderedDict[str, None] = OrderedDict()
        self._declaring: dict[str, asyncio.Future[bool]] = {}
        self._unconfirmed: OrderedDict[int, None] = OrderedDict()
        self._next_tag = 0
        self._dropping = False
        self._failing = False

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def address(self) -> str:
        """For logs: the broker without its credentials."""
        return f"{self.parameters.host}:{self.parameters.port}"

    async def start(self) -> None:
        """Connect; wait a little for the first connection, but a broker that is down is not an error."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._connect()
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            log.warning("result queue broker %s not reachable yet; retrying", self.address)

    async def close(self) -> None:
        self._closing = True
        if self._retry is not None:
            self._retry.cancel()
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            self._gone.clear()
            connection.close()
            try:
                await asyncio.wait_for(self._gone.wait(), CONNECT_TIMEOUT)
            except TimeoutError:
                log.warning("result queue broker %s did not close the connection in time", self.address)
        self._lost()

    async def settled(self, timeout: float = 5.0) -> None:
        """Wait until the broker has confirmed (or refused) everything published: for tests."""
        async with asyncio.timeout(timeout):
            while self._unconfirmed:
                await asyncio.sleep(0.005)

    async def declare(self, queue: str) -> bool:
        """Make sure `queue` exists before answering a submit; False (logged) when the broker is away."""
        if queue in self._declared:
            self._declared.move_to_end(queue)
            return True
        channel = self._channel
        if channel is None:
            log.warning("result queue broker %s is down: queue %s not declared", self.address, queue)
            return False
        waiting = self._declaring.get(queue)
        if waiting is None:
            assert self._loop is not None
            waiting = self._declaring[queue] = self._loop.create_future()
            channel.queue_declare(queue, durable=True, callback=lambda _frame: self._on_declared(queue))
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), DECLARE_TIMEOUT)
        except TimeoutError:
            log.warning("result queue broker %s did not declare queue %s in time", self.address, queue)
            return False

    def publish(self, queue: str, task: FakeTask, *, high_assurance: bool, persistent: bool = True) -> bool:
        """Push a finished task's Result to its queue; False when it had to be dropped."""
        channel = self._channel
        if channel is None or len(self._unconfirmed) >= MAX_UNCONFIRMED:
            self._drop(queue, "down" if channel is None else "not confirming")
            return False
        if queue not in self._declared:  # declared at submit while the broker was away: now, in order
            channel.queue_declare(queue, durable=True, callback=lambda _frame: self._remember(queue))
        body = result_message(task, high_assurance=high_assurance)
        properties = result_properties(task, high_assurance=high_assurance, persistent=persistent)
        try:
            channel.basic_publish("", queue, body, properties, mandatory=True)
        except pika.exceptions.AMQPError as error:
            self._drop(queue, f"refusing ({error!r})")
            return False
        self._next_tag += 1
        self._unconfirmed[self._next_tag] = None
        self.published += 1
        self._dropping = False
        return True

    # -- pika callbacks, all on the event loop ----------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._closing:
            return
        self._gone.clear()
        self._connection = AsyncioConnection(
            self.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed,
            on_close_callback=self._on_failed,
            custom_ioloop=self._loop,
        )

    def _on_open(self, connection: Any) -> None:
        if connection is self._connection:
            connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._on_confirming(channel))

    def _on_confirming(self, channel: Any) -> None:
        self._channel, self._next_tag = channel, 0
        self.connections += 1
        self._failing = False
        self._ready.set()
        log.info("result queue broker %s connected", self.address)

    def _on_failed(self, connection: Any, error: BaseException) -> None:
        if connection is not self._connection:
            return
        self._lost()
        self._gone.set()
        if not self._closing:
            level = logging.DEBUG if self._failing else logging.WARNING  # once per outage: it retries often
            log.log(level, "result queue broker %s: %r; reconnecting", self.address, error)
            self._failing = True
            assert self._loop is not None
            self._retry = self._loop.call_later(RECONNECT_SECONDS, self._connect)

    def _on_channel_closed(self, channel: Any, error: BaseException) -> None:
        """A channel error (e.g. a queue declared with other arguments): start over with a new connection."""
        if channel is self._channel and not self._closing:
            log.warning("result queue broker %s closed the channel: %r", self.address, error)
            self._lost()
            if self._connection is not None and self._connection.is_open:
                self._connection.close()

    def _lost(self) -> None:
        """Whatever was in flight is unknown now: the queues are declared again on the next connection."""
        self._ready.clear()
        self._channel = None
        self._declared.clear()
        self._unconfirmed.clear()
        for waiting in self._declaring.values():
            if not waiting.done():
                waiting.set_result(False)
        self._declaring.clear()

    def _on_declared(self, queue: str) -> None:
        self._remember(queue)
        waiting = self._declaring.pop(queue, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(True)

    def _remember(self, queue: str) -> None:
        self._declared[queue] = None
        self._declared.move_to_end(queue)
        while len(self._declared) > DECLARED_MEMORY:
            self._declared.popitem(last=False)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        if method.multiple:
            while self._unconfirmed and next(iter(self._unconfirmed)) <= tag:
                self._unconfirmed.popitem(last=False)
                self.confirmed += 1
        elif tag in self._unconfirmed:
            del self._unconfirmed[tag]
            self.confirmed += 1
        if isinstance(method, pika.spec.Basic.Nack):
            log.warning("result queue broker %s refused message %s", self.address, tag)

    def _on_return(self, _channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        self.returned += 1
        log.warning("result queue broker %s: no queue %s, result dropped", self.address, method.routing_key)

    def _drop(self, queue: str, why: str) -> None:
        """Counted always, logged once per spell of drops, so that an outage does not flood the log."""
        self.dropped += 1
        if not self._dropping:
            log.warning("result queue broker %s %s: dropping results (first: %s)", self.address, why, queue)
            self._dropping = True
