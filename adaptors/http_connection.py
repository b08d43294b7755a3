"""One keep-alive connection to a backend, as an asyncio protocol: it sends a request, reads the
answer's head and body as they arrive (adaptors/http_wire.py), and wakes the one coroutine that
waits on it. adaptors/http_client.py pools these connections.

The costs per request are kept to what the work needs, which is why this exists (aiohttp's client
spent about 300 µs of CPU per request where a bare protocol spends 60): one future per wait, no
task, no timer per chunk. A wait's deadline is one timer that re-arms itself: a total deadline for
an answer read whole, or the silence allowed since the last bytes arrived for a stream, checked
only when the timer fires. The timer outlives its exchange: the next exchange on a kept-alive
connection, due later, keeps it and re-arms it when it fires, so that a busy connection arms about
one timer per deadline's length instead of one per request (one that fires between exchanges finds
no wait and lapses); an exchange due sooner than the timer arms its own. Reading stops while more
than `HIGH_WATER` bytes of body wait unread (a client that does not read holds back the backend
instead of filling the gateway's memory), and starts again once they are taken; that pause is the
gateway's, so it is not counted as silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import cast

from adaptors.http_wire import (
    MAX_INTERIM_ANSWERS,
    Chunks,
    Disconnected,
    Head,
    HTTPFailure,
    MalformedAnswer,
    ReadTimeout,
    head_end,
    parse_head,
)

HIGH_WATER = 256 * 1024
"""Body bytes held unread before the connection stops reading."""
_EARLY = 0.002
"""A timer may fire this much before its time (the event loop's clock resolution)."""


class Connection(asyncio.Protocol):
    """Serves one exchange at a time; between exchanges it is idle in the pool, and any byte or
    end of file that arrives then makes it unusable (the server closed it, or sent what no request
    asked for)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Hashable) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.open = True
        self.idle_since = 0.0
        self.received = 0
        """Bytes of the current answer received so far: with none, a failure may be a stale
        connection that the server closed as the request went out."""
        self._active = False
        self._head_buffer = bytearray()
        self._head: Head | None = None
        self._chunks: Chunks | None = None
        self._left: int | None = None
        self._interim = 0
        self._body: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._extra = False
        self._error: HTTPFailure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 1
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._silence: float | None = None
        self._last_data = 0.0

    # the exchange, as the client drives it

    def send(self, head: bytes, body: bytes | None, deadline: float, silence: float | None) -> None:
        """Starts an exchange. `deadline` (loop time) bounds it all, unless `silence` is given: then
        each wait ends once the backend has sent nothing for that many seconds. A body larger than
        the socket's buffer waits in the transport's, which costs nothing more: the gateway holds
        the body already (within its request limit)."""
        self._active = True
        self.received = 0
        self._head = None
        self._done = False
        self._extra = False
        self._deadline = deadline
        self._silence = silence
        self._last_data = self.loop.time() if silence is not None else 0.0
        transport = self.transport
        if transport is None or transport.is_closing():
            self._error = Disconnected("the connection closed before the request went out")
            return
        try:
            if body is None:
                transport.write(head)
            elif len(body) <= 16384:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
        except (OSError, RuntimeError):  # uvloop's transports may raise where asyncio's report later
            self._error = Disconnected("the connection failed as the request went out")

    async def read_head(self) -> Head:
        while self._head is None:
            if self._error is not None:
                raise self._error
            self._wake_at = 1
            await self._wait()
        return self._head

    async def read_some(self, at_least: int) -> bytes | None:
        """The body bytes that arrived, once there are `at_least` of them or the body ended; None
        once it ended and all was taken. A failure is raised once the bytes before it were taken."""
        while True:
            if self._buffered >= at_least or (self._buffered and (self._done or self._error)):
                return self._take()
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            self._wake_at = at_least
            await self._wait()

    @property
    def buffered(self) -> int:
        """Body bytes arrived and not yet taken: at most `HIGH_WATER` and one read more."""
        return self._buffered

    @property
    def reusable(self) -> bool:
        """The answer was read to its end, and the connection may take another request: not while
        part of the request is still unsent (a server that answered before reading all of it would
        read the rest as the next request)."""
        head = self._head
        return (
            self.open
            and self._done
            and self.transport is not None
            and not self.transport.get_write_buffer_size()
            and not self._extra
            and self._error is None
            and head is not None
            and head.keep_alive
            and not self._buffered
        )

    def finish(self) -> None:
        """Ends the exchange (its answer read, or abandoned)."""
        self._active = False
        if self._head_buffer:
            self._head_buffer = bytearray()
        self._body = []
        self._buffered = 0
        self._chunks = None
        self._interim = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self) -> bytes:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_data = self.loop.time()
            self.transport.resume_reading()
        return data

    async def _wait(self) -> None:
        due = self._due()
        timer = self._timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(due, self._on_timer)
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _due(self) -> float:
        return self._deadline if self._silence is None else self._last_data + self._silence

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return
        due = self._due()
        if self.loop.time() < due - _EARLY:
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        self._fail(ReadTimeout("the backend's answer did not come in time"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: HTTPFailure) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        if not self._active or self._error is not None:
            self._extra = True
            self.close()
            return
        self.received += len(data)
        if self._silence is not None:
            self._last_data = self.loop.time()
        try:
            self._feed(data)
        except MalformedAnswer as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.transport = None

    def _ended(self, exc: Exception | None) -> None:
        """The backend closed the connection (or it broke)."""
        self.open = False
        if not self._active or self._done or self._error is not None:
            return
        if self._head is None:
            self._error = Disconnected("the backend closed the connection without an answer")
        elif self._chunks is None and self._left is None:
            self._done = True  # the body's length was the connection's
        else:
            self._error = Disconnected(
                "the backend closed the connection before the answer's end", shown="ClientPayloadError"
            )
        self._wake()

    def _feed(self, data: bytes) -> None:
        if self._head is None:
            pending = self._head_buffer
            buffer: bytes | bytearray = data
            start = 0
            if pending:
                start = len(pending) - 3  # the blank line may have begun in what came before
                pending += data
                buffer = pending
            while True:
                end = head_end(buffer, max(start, 0))
                start = 0
                if end < 0:
                    if buffer is not pending:
                        self._head_buffer = bytearray(buffer)
                    return
                head = parse_head(buffer[: end - 4])
                buffer = buffer[end:]
                if head.status >= 200:
                    break
                self._interim += 1
                if head.status == 101 or self._interim > MAX_INTERIM_ANSWERS:
                    raise MalformedAnswer(f"the backend answered {head.status} to a plain request")
            if pending:
                self._head_buffer = bytearray()
            self._head = head
            self._chunks = Chunks() if head.chunked else None
            self._left = head.length
            self._extra = False
            self._done = head.length == 0
            self._wake()
            if not buffer:
                return
            data = bytes(buffer)
        if self._done:
            self._extra = True
            return
        body = self._body
        if self._chunks is not None:
            before = len(body)
            used = self._chunks.feed(data, body)
            for piece in body[before:]:
                self._buffered += len(piece)
            if self._chunks.done:
                self._done = True
                self._extra = used < len(data)
        elif self._left is not None:
            take = min(self._left, len(data))
            body.append(data if take == len(data) else data[:take])
            self._buffered += take
            self._left -= take
            if not self._left:
                self._done = True
                self._extra = take < len(data)
        else:
            body.append(data)
            self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._done and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._done or self._buffered >= self._wake_at:
            self._wake()
