"""Results of Globus Compute tasks pushed by the service over AMQP, as the SDK's `Executor` gets them.

Why: under the service's budget of status calls (20 a second, adaptors/compute_service.py) a task
that finishes waits on average half the interval between two calls to be seen, about 26 ms with
100 requests in flight. The service also publishes each result to a RabbitMQ queue of the task's
group, as soon as it has it; consuming that queue removes the wait without any status call.

How it matches the service (globus-compute-sdk's `_ResultWatcher`):
- `GET /v2/get_amqp_result_connection_url` gives a connection URL, with credentials minted for the
  caller (never logged), and a queue prefix. A task group submitted with `create_queue` has the
  queue `{prefix}{task_group_id}`, declared by the service: the gateway only consumes it.
- each message is a globus-compute-common `Result` packed by `messagepack`: `data` is the
  serialized return value, or the error text when `error_details` is set; a `high_assurance`
  header means the data is not in the message and must be read by a status call.

Nothing is lost: a message is acknowledged once it was handed over; one that cannot be read is
rejected (not requeued: it would come back forever) and its task is left to the poll, which keeps
looking at every task, only less often while the queue is up. A lost connection is opened again
(with a new URL: the credentials may have expired) after a growing, randomised pause; messages not
acknowledged by then are delivered again.

Bounds: at most `PREFETCH` unacknowledged messages on a channel (acknowledged in groups, see
`_unacknowledged`), bodies over `MAX_MESSAGE_BYTES`
rejected unread, at most `MAX_GROUPS` queues, a deadline on every step of opening.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pika
import pika.exceptions
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result
from pika.adapters.asyncio_connection import AsyncioConnection

log = logging.getLogger(__name__)
logging.getLogger("pika").setLevel(logging.CRITICAL)
"""pika logs every failed connection attempt at ERROR, with its stack of connectors, in several
records; what operators need is the one warning below, which says the results are polled meanwhile."""

PREFETCH = 512
ACKNOWLEDGE_EVERY = PREFETCH // 4
ACKNOWLEDGE_AFTER_SECONDS = 0.05
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_GROUPS = 64
OPEN_TIMEOUT_SECONDS = 10.0
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
NOT_FOUND = 404
MAX_CLOSES = 3
CLOSES_WINDOW_SECONDS = 60.0
PROTOCOL_1 = b"\x01"


@dataclass(frozen=True)
class QueuedResult:
    task_id: str
    data: str | None
    """The serialized value, or the error text when `failed`; None when only a status call has it."""
    failed: bool


Details = Callable[[], Awaitable[tuple[str, str]]]
"""The connection URL and the queue prefix (the service's `get_result_amqp_url`)."""
Deliver = Callable[[QueuedResult], None]
Changed = Callable[[bool], None]
"""Told True once results are consumed, False when they no longer are."""


class QueueClosed(Exception):
    """The connection ended (the broker, the network, or a close); it is opened again."""


def read_message(headers: dict[str, Any] | None, body: bytes) -> QueuedResult | None:
    """The result a message carries; None when it is not one (too large, not a `Result`)."""
    if len(body) > MAX_MESSAGE_BYTES:
        log.warning("a Globus Compute result message of %d bytes was refused unread", len(body))
        return None
    read = _plain_result(body)
    if read is None:
        try:
            message = messagepack.unpack(body)
        except Exception as exc:  # messagepack raises its own errors and pydantic's
            log.warning("a Globus Compute result message could not be read (%s)", type(exc).__name__)
            return None
        if not isinstance(message, Result):
            log.warning("a Globus Compute result queue carried a %s message", type(message).__name__)
            return None
        read = QueuedResult(str(message.task_id), message.data, message.is_error)
    if headers and headers.get("high_assurance"):
        return QueuedResult(read.task_id, None, False)
    return read


def _plain_result(body: bytes) -> QueuedResult | None:
    """The common case read without building pydantic models (a third of a message's cost): protocol
    version 1 (a 0x01 byte, then the JSON envelope `{"message_type": "result", "data": {...}}`) whose
    task id, data and error details have the types `Result` requires. Anything else, None: then
    `messagepack.unpack` reads it, or says what is wrong with it."""
    if body[:1] != PROTOCOL_1:
        return None
    try:
        envelope = orjson.loads(body[1:])
        result = envelope["data"]
        task_id, data, error = str(uuid.UUID(result["task_id"])), result["data"], result.get("error_details")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if envelope.get("message_type") != "result" or not isinstance(data, str):
        return None
    if error is not None and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("user_message"), str)
    ):
        return None
    return QueuedResult(task_id, data, error is not None)


@dataclass
class ResultQueue:
    """One AMQP connection consuming the result queue of each task group it is told to follow,
    each on a channel of its own (a queue the broker does not know closes only its channel)."""

    details: Details
    deliver: Deliver
    changed: Changed
    port: int | None = None
    """Instead of the URL's, like the SDK's `amqp_port` (some sites let only 443 out)."""
    _groups: dict[str, Any] = field(default_factory=dict)
    """Followed task groups → their channel once consuming (None before)."""
    _connection: Any = None
    _prefix: str = ""
    _runner: asyncio.Task[None] | None = None
    _up: bool = False
    _unacknowledged: dict[Any, int] = field(default_factory=dict)
    """Channel → the latest delivery tag handed over, acknowledged with all before it
    `ACKNOWLEDGE_AFTER_SECONDS` after the first of them, or at once when `ACKNOWLEDGE_EVERY` wait:
    an acknowledgement each cost more than the rest of a message (a write, and pika's writer
    registered and removed), while a result acknowledged late is at worst delivered again after a
    reconnection, and found already answered."""
    _waiting: int = 0
    _closes: dict[str, list[float]] = field(default_factory=dict)
    """When each group's channel was last closed by the broker."""
    _closing: bool = False

    def follow(self, task_group_id: str) -> None:
        """Consume the group's queue from now on (and after every reconnection)."""
        if task_group_id in self._groups:
            return
        if len(self._groups) >= MAX_GROUPS:
            log.warning("already following %d task groups; results of another are polled", MAX_GROUPS)
            return
        self._groups[task_group_id] = None
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        elif self._connection is not None and self._connection.is_open:
            self._consume(task_group_id)

    @property
    def up(self) -> bool:
        """Whether results are being consumed (at least one group's channel is open)."""
        return self._up

    async def close(self) -> None:
        """Stops consuming. The flag as well as the cancellation: on Python 3.11 `asyncio.wait_for`
        can swallow a cancellation that comes as its inner call ends, which left the runner going."""
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.wait({self._runner}, timeout=OPEN_TIMEOUT_SECONDS)
            if not self._runner.done():
                log.warning("the Globus Compute result queue did not stop in time")

    async def _run(self) -> None:
        pause = RETRY_FIRST_SECONDS
        while not self._closing:
            try:
                await self._session()
            except (QueueClosed, TimeoutError, OSError, pika.exceptions.AMQPError) as exc:
                if self._up:
                    pause = RETRY_FIRST_SECONDS
                log.warning(
                    "Globus Compute result queue: %s; results are polled meanwhile (again in %.0f s)",
                    _describe(exc),
                    pause,
                )
            except Exception as exc:  # the SDK's errors asking for the URL: any Globus error
                log.warning("no Globus Compute result queue (%s); results are polled", _describe(exc))
            finally:
                self._set_up(False)
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, RETRY_MAX_SECONDS)

    async def _session(self) -> None:
        """Open, consume every group, and wait until the connection ends; closes it when cancelled."""
        async with asyncio.timeout(OPEN_TIMEOUT_SECONDS):
            url, self._prefix = await self.details()
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        ended: asyncio.Future[None] = loop.create_future()
        parameters = pika.URLParameters(url)
        if self.port is not None:
            parameters.port = self.port
        parameters.connection_attempts = 1
        parameters.socket_timeout = OPEN_TIMEOUT_SECONDS
        parameters.stack_timeout = OPEN_TIMEOUT_SECONDS
        self._connection = AsyncioConnection(
            parameters,
            on_open_callback=lambda _c: _settle(opened, None),
            on_open_error_callback=lambda _c, exc: _fail(opened, exc),
            on_close_callback=lambda _c, exc: _fail(ended, QueueClosed(_describe(exc))),
            custom_ioloop=loop,
        )
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_SECONDS):
                await opened
            for group in self._groups:
                self._consume(group)
            await ended
        finally:
            connection, self._connection = self._connection, None
            for group in self._groups:
                self._groups[group] = None
            if connection.is_open:
                connection.close()
                await asyncio.wait({ended}, timeout=OPEN_TIMEOUT_SECONDS)
            if not ended.done():
                ended.cancel()
            elif not ended.cancelled():
                ended.exception()

    def _consume(self, group: str) -> None:
        """Open the group's channel; once open, set its prefetch and consume its queue."""

        def opened(channel: Any) -> None:
            self._groups[group] = channel
            channel.add_on_close_callback(lambda _ch, exc: self._channel_closed(group, exc))
            channel.basic_qos(prefetch_count=PREFETCH)
            channel.basic_consume(queue=f"{self._prefix}{group}", on_message_callback=self._on_message)
            self._set_up(True)

        self._connection.channel(on_open_callback=opened)

    def _channel_closed(self, group: str, exc: BaseException) -> None:
        """The broker closed a group's channel: a queue it does not have (404) is given up at once,
        one it refuses again and again (`MAX_CLOSES` within `CLOSES_WINDOW_SECONDS`) too; the group's
        tasks are then polled. Otherwise the channel is opened again. A channel closed with its
        connection is the session's to open again, with the others."""
        if group not in self._groups:
            return
        self._groups[group] = None
        if not isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            self._set_up(any(channel is not None for channel in self._groups.values()))
            return
        now = time.monotonic()
        closes = [at for at in self._closes.get(group, []) if now - at < CLOSES_WINDOW_SECONDS] + [now]
        self._closes[group] = closes
        if getattr(exc, "reply_code", None) == NOT_FOUND or len(closes) >= MAX_CLOSES:
            log.warning(
                "no Globus Compute result queue for task group %s (%s); its results are polled",
                group,
                _describe(exc),
            )
            del self._groups[group]
            del self._closes[group]
        elif self._connection is not None and self._connection.is_open:
            log.warning("a Globus Compute result queue channel closed (%s); opening it again", _describe(exc))
            asyncio.get_running_loop().call_later(RETRY_FIRST_SECONDS, self._reopen, group)
        self._set_up(any(channel is not None for channel in self._groups.values()))

    def _reopen(self, group: str) -> None:
        open_ = self._connection is not None and self._connection.is_open
        if open_ and group in self._groups and self._groups[group] is None:
            self._consume(group)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        result = read_message(properties.headers, body)
        if result is None:
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        try:
            self.deliver(result)
        finally:
            if not self._unacknowledged:
                asyncio.get_running_loop().call_later(ACKNOWLEDGE_AFTER_SECONDS, self._acknowledge)
            self._unacknowledged[channel] = method.delivery_tag
            self._waiting += 1
            if self._waiting >= ACKNOWLEDGE_EVERY:
                self._acknowledge()

    def _acknowledge(self) -> None:
        unacknowledged, self._unacknowledged, self._waiting = self._unacknowledged, {}, 0
        for channel, tag in unacknowledged.items():
            if channel.is_open:
                channel.basic_ack(tag, multiple=True)

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            self.changed(up)


def _settle(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[None], exc: BaseException | str) -> None:
    if not future.done():
        future.set_exception(exc if isinstance(exc, BaseException) else QueueClosed(exc))


def _describe(exc: BaseException | str) -> str:
    """What went wrong, without the URL (it holds credentials)."""
    if isinstance(exc, str):
        return exc
    code = getattr(exc, "reply_code", None)
    return f"{type(exc).__name__} ({code})" if code is not None else type(exc).__name__
