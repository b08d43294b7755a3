"""The callback relay: chunks that remote functions POST to the callback routes, delivered to the
client waiting on the stream, in order and as they arrive.

`LocalRelay` keeps each stream in an in-process queue. `RedisRelay` (proxy/core/callback_relay_redis.py)
keeps streams in Redis, so a callback that lands on another gateway process or host still reaches the
client. Both share the client side (`RelayedStream`), which enforces the limits: the wait for the
first chunk, the silence between chunks and the total time, with comment keep-alives while the
backend is silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal
from urllib.parse import urlsplit

from adaptors import StreamError
from adaptors.relay import CallbackTarget
from proxy.errors import ApiError
from proxy.settings.streaming import StreamingSettings

log = logging.getLogger(__name__)

EventKind = Literal["data", "done", "error"]


ORDERING_GRACE_SECONDS = 5.0
"""How long `done` waits for data posts its sender says it made but that have not arrived yet."""

ABANDONED_GRACE_SECONDS = 60.0
"""A stream still registered this long after `total_timeout_seconds` was never read by a client (its
request failed between opening it and streaming): it no longer counts against `max_streams`."""


MAX_GONE_REMEMBERED = 200_000
"""At most this many ended streams' ids are remembered (about 30 MB) by an in-process relay."""


def abandoned_before(settings: StreamingSettings) -> float:
    """The monotonic time before which an opened stream counts as abandoned."""
    return time.monotonic() - settings.total_timeout_seconds - ABANDONED_GRACE_SECONDS


@dataclass(frozen=True)
class Event:
    kind: EventKind
    data: bytes = b""
    code: int = 0
    after_posts: int = 0
    """For `done`: how many data posts the sender made before it (0 when it does not say)."""


class Delivery(IntEnum):
    """What a callback is answered."""

    ACCEPTED = 200
    BAD_TOKEN = 403
    UNKNOWN = 404
    GONE = 410


def callback_target(url: str) -> CallbackTarget:
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return CallbackTarget(host=parts.hostname or "", port=parts.port or default_port, protocol=parts.scheme)


def sse_lines(data: str) -> bytes:
    """The function sends SSE lines joined by newlines, without the blank lines between events, so
    each `data:` line ends an event here. The lines before it (the `event:` line of a Responses or
    Messages event) stay in its event, even when the function posted them in an earlier batch.
    Encoded once, as a whole; raises `UnicodeEncodeError` for text that has no UTF-8 (a lone surrogate,
    which a JSON body can spell)."""
    pieces = []
    for line in data.split("\n"):
        if line := line.strip():
            pieces.append(line)
            pieces.append("\n\n" if line.startswith("data:") else "\n")
    return "".join(pieces).encode()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RelayUnavailable(ApiError):
    """Redis, which holds the relay's streams, does not answer: new streams and callbacks are
    refused with a 503 until it does, instead of failing as an internal error."""

    def __init__(self) -> None:
        message = "The stream relay is unavailable right now; please try again shortly."
        super().__init__(503, message, code="relay_unavailable")


class RelayFull(ApiError):
    """The process relays `streaming.max_streams` streams already: a new one is refused with a 503
    rather than growing the process's memory (and Redis's) without bound."""

    def __init__(self, limit: int) -> None:
        message = f"The gateway is relaying its limit of {limit} streams; please try again shortly."
        super().__init__(503, message, code="relay_full", headers={"Retry-After": "5"})


class Relay(ABC):
    def __init__(self, settings: StreamingSettings) -> None:
        self.settings = settings
        self.callback = callback_target(settings.callback_url)

    async def open(self) -> RelayedStream:
        stream_id, token = str(uuid.uuid4()), secrets.token_urlsafe(32)
        await self._register(stream_id, token)
        return RelayedStream(self, stream_id, token)

    async def refused(self, stream_id: str, message: str) -> None:
        """A callback for this stream was refused (wrong secret or token): every later one will be
        too, so the waiting client gets the reason now instead of after the first-chunk limit.
        Nothing happens for a stream that does not exist or has ended."""
        await self._push(stream_id, Event("error", message.encode(), 502))

    @abstractmethod
    async def deliver(self, stream_id: str, token: str, event: Event) -> Delivery:
        """Called by the callback routes; `done` waits for data callbacks already being handled."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _register(self, stream_id: str, token: str) -> None:
        """A relay that keeps streams outside the process keeps the token's digest, not the token."""

    @abstractmethod
    async def _next(self, stream_id: str, wait: float) -> list[Event]:
        """Events that arrived, or an empty list after `wait` seconds of silence."""

    @abstractmethod
    async def _push(self, stream_id: str, event: Event) -> None:
        """An event from the gateway itself (the task finished or failed)."""

    @abstractmethod
    async def _release(self, stream_id: str, finished: bool) -> None:
        """The client side is done; an unfinished stream becomes gone (callbacks answer 410)."""


class RelayedStream:
    def __init__(self, relay: Relay, stream_id: str, token: str) -> None:
        self._relay = relay
        self.stream_id = stream_id
        self.token = token

    async def finish(self) -> None:
        await self._relay._push(self.stream_id, Event("done"))

    async def fail(self, code: int, message: str) -> None:
        await self._relay._push(self.stream_id, Event("error", message.encode(), code))

    async def events(self) -> AsyncIterator[bytes]:
        """Data events that arrived together leave as one chunk: one write to the client for them,
        and one trip through the layers between this stream and the client's socket."""
        keepalive = self._relay.settings.keepalive_seconds
        loop = asyncio.get_running_loop()
        started = last = loop.time()
        first, finished = True, False
        try:
            while True:
                deadline = self._deadline(started, last, first)
                now = loop.time()
                if now >= deadline:
                    raise StreamError(self._expired(started, last, first), 504)
                try:
                    events = await self._relay._next(self.stream_id, min(keepalive, deadline - now))
                except RelayUnavailable as exc:
                    raise StreamError(exc.message, exc.status) from exc
                if not events:
                    yield b": waiting for the model\n\n" if first else b": keep-alive\n\n"
                    continue
                cut = next((at for at, event in enumerate(events) if event.kind != "data"), len(events))
                if cut:
                    first, last = False, loop.time()
                    yield events[0].data if cut == 1 else b"".join(event.data for event in events[:cut])
                if cut == len(events):
                    continue
                end, finished = events[cut], True
                if end.kind == "error":
                    raise StreamError(end.data.decode(errors="replace"), end.code)
                return
        finally:
            try:
                await self._relay._release(self.stream_id, finished)
            except RelayUnavailable:
                log.warning("relay stream %s not released: Redis does not answer", self.stream_id)

    def _deadline(self, started: float, last: float, first: bool) -> float:
        """The nearest limit: the whole stream's, and the first chunk's or the silence's."""
        return min(
            self._phase_end(started, last, first), started + self._relay.settings.total_timeout_seconds
        )

    def _phase_end(self, started: float, last: float, first: bool) -> float:
        limits = self._relay.settings
        if first:
            return started + limits.first_chunk_timeout_seconds
        return last + limits.silence_timeout_seconds

    def _expired(self, started: float, last: float, first: bool) -> str:
        """Why the stream ended at its deadline (built then only, not at every chunk)."""
        limits = self._relay.settings
        total = limits.total_timeout_seconds
        if started + total < self._phase_end(started, last, first):
            return f"The stream reached the gateway's limit of {total:g} seconds."
        if first:
            wait = limits.first_chunk_timeout_seconds
            return (
                f"The model sent nothing within {wait:g} seconds (it may be queued or still loading); "
                "try again later."
            )
        return f"The model sent nothing for {limits.silence_timeout_seconds:g} seconds; the stream was ended."


@dataclass
class _LocalStream:
    """A stream's events, bounded: a callback that finds `limit` events waiting for the client
    waits for room (back-pressure), as with `asyncio.Queue`. The client side waits on a future of
    its own with a timer, which costs a third of a queue's `get` under `asyncio.timeout`."""

    token: str
    """Kept as it is: the process holds it anyway (`RelayedStream.token`), and a digest per chunk
    costs more than the rest of the check."""
    limit: int
    events: deque[Event] = field(default_factory=deque)
    reader: asyncio.Future[None] | None = None
    """Set while the client side waits for an event."""
    senders: deque[asyncio.Future[None]] = field(default_factory=deque)
    """Callbacks waiting for room, woken one per event taken."""
    state: Literal["open", "finished", "gone"] = "open"
    data_posts: int = 0
    posted: asyncio.Event = field(default_factory=asyncio.Event)
    opened: float = field(default_factory=time.monotonic)

    async def put(self, event: Event) -> None:
        while len(self.events) >= self.limit:
            room = asyncio.get_running_loop().create_future()
            self.senders.append(room)
            try:
                await room
            except BaseException:
                with contextlib.suppress(ValueError):
                    self.senders.remove(room)
                if room.done() and not room.cancelled():
                    self._wake_sender()  # the room it was given goes to the next one
                raise
        self.events.append(event)
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until an event is there or `seconds` have passed."""
        if self.events:
            return
        reader = self.reader = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(seconds, _wake, reader)
        try:
            await reader
        finally:
            timer.cancel()
            self.reader = None

    def take(self) -> list[Event]:
        """The events waiting, up to the first that ends the stream."""
        taken = [self.events.popleft()]
        while self.events and taken[-1].kind == "data":
            taken.append(self.events.popleft())
        for _ in taken:
            self._wake_sender()
        return taken

    def clear(self) -> None:
        self.events.clear()
        while self.senders:
            self._wake_sender()

    def _wake_sender(self) -> None:
        while self.senders:
            sender = self.senders.popleft()
            if not sender.done():
                sender.set_result(None)
                return


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class LocalRelay(Relay):
    """One process: a bounded queue per stream, so a fast function waits for a slow client."""

    def __init__(self, settings: StreamingSettings) -> None:
        super().__init__(settings)
        self._streams: dict[str, _LocalStream] = {}
        self._gone: dict[str, float] = {}

    async def deliver(self, stream_id: str, token: str, event: Event) -> Delivery:
        stream = self._streams.get(stream_id)
        if stream is None:
            return Delivery.GONE if stream_id in self._gone else Delivery.UNKNOWN
        if not (token.isascii() and hmac.compare_digest(stream.token, token)):
            return Delivery.BAD_TOKEN
        if stream.state != "open":
            return Delivery.GONE
        if event.kind == "data":
            stream.data_posts += 1
            stream.posted.set()
            await stream.put(event)
        else:
            await self._end(stream, event)
        return Delivery.ACCEPTED

    async def close(self) -> None:
        self._streams.clear()

    async def _register(self, stream_id: str, token: str) -> None:
        if len(self._streams) >= self.settings.max_streams:
            cutoff = abandoned_before(self.settings)
            self._streams = {key: stream for key, stream in self._streams.items() if stream.opened >= cutoff}
            if len(self._streams) >= self.settings.max_streams:
                raise RelayFull(self.settings.max_streams)
        self._streams[stream_id] = _LocalStream(token, self.settings.max_queued_chunks)

    async def _next(self, stream_id: str, wait: float) -> list[Event]:
        stream = self._streams[stream_id]
        await stream.wait(wait)
        return stream.take() if stream.events else []

    async def _push(self, stream_id: str, event: Event) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.state == "open":
            await self._end(stream, event)

    async def _end(self, stream: _LocalStream, event: Event) -> None:
        deadline = time.monotonic() + ORDERING_GRACE_SECONDS
        while stream.data_posts < event.after_posts and time.monotonic() < deadline:
            stream.posted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.posted.wait(), deadline - time.monotonic())
        stream.state = "finished"
        await stream.put(event)

    def _forget_gone(self, now: float) -> None:
        """The oldest ids first (the dict keeps them in the order they went), so a release costs the
        ids it forgets, not a copy of all it remembers: at hundreds of pushed answers a second the
        memory of 600 s holds over 100,000 of them. Beyond `MAX_GONE_REMEMBERED` the oldest go
        early; a late callback for one then gets 404 instead of 410, which also stops a function."""
        memory = self.settings.gone_memory_seconds
        while self._gone:
            oldest, at = next(iter(self._gone.items()))
            if now - at < memory and len(self._gone) <= MAX_GONE_REMEMBERED:
                return
            del self._gone[oldest]

    async def _release(self, stream_id: str, finished: bool) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        now = time.monotonic()
        self._gone[stream_id] = now
        self._forget_gone(now)
        stream.state = "gone"
        stream.clear()
