"""The stream relay: chunks that remote functions POST to the callback routes, delivered to the
client waiting on the stream, in order and as they arrive.

`LocalRelay` keeps each stream in an in-process queue. `RedisRelay` keeps streams in Redis (a
state hash and an append-only Redis stream per relay stream), so a callback that lands on another
gateway process or host still reaches the client. Both share the client side (`RelayedStream`),
which enforces the limits: the wait for the first chunk, the silence between chunks and the
total time, with comment keep-alives while the backend is silent.
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from adaptors import StreamError
from adaptors.relay import CallbackTarget
from proxy.errors import ApiError
from proxy.settings import StreamingSettings

log = logging.getLogger(__name__)

EventKind = Literal["data", "done", "error"]


ORDERING_GRACE_SECONDS = 5.0
"""How long `done` waits for data posts its sender says it made but that have not arrived yet."""

REDIS_COMMAND_TIMEOUT_SECONDS = 5.0
"""The longest a Redis command (or connecting) may take before Redis counts as unavailable."""

REDIS_READ_MARGIN_SECONDS = 5.0
"""How much longer than its block time a blocking read may take: Redis answers it at the block time."""


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
    Messages event) stay in its event, even when the function posted them in an earlier batch."""
    lines = [line.strip().encode() for line in data.split("\n") if line.strip()]
    return b"".join(line + (b"\n\n" if line.startswith(b"data:") else b"\n") for line in lines)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RelayUnavailable(ApiError):
    """Redis, which holds the relay's streams, does not answer: new streams and callbacks are
    refused with a 503 until it does, instead of failing as an internal error."""

    def __init__(self) -> None:
        message = "The stream relay is unavailable right now; please try again shortly."
        super().__init__(503, message, code="relay_unavailable")


@contextlib.contextmanager
def _redis_answers() -> Iterator[None]:
    """Around every call to Redis: its client's errors say nothing to a client or a function."""
    try:
        yield
    except RedisError as exc:
        raise RelayUnavailable() from exc


class Relay(ABC):
    def __init__(self, settings: StreamingSettings) -> None:
        self.settings = settings
        self.callback = callback_target(settings.callback_url)

    async def open(self) -> RelayedStream:
        stream_id, token = str(uuid.uuid4()), secrets.token_urlsafe(32)
        await self._register(stream_id, _digest(token))
        return RelayedStream(self, stream_id, token)

    @abstractmethod
    async def deliver(self, stream_id: str, token: str, event: Event) -> Delivery:
        """Called by the callback routes; `done` waits for data callbacks already being handled."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _register(self, stream_id: str, token_digest: str) -> None: ...

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
        keepalive = self._relay.settings.keepalive_seconds
        loop = asyncio.get_running_loop()
        started = last = loop.time()
        first, finished = True, False
        try:
            while True:
                deadline, message = self._deadline(started, last, first)
                now = loop.time()
                if now >= deadline:
                    raise StreamError(message, 504)
                try:
                    events = await self._relay._next(self.stream_id, min(keepalive, deadline - now))
                except RelayUnavailable as exc:
                    raise StreamError(exc.message, exc.status) from exc
                if not events:
                    yield b": waiting for the model\n\n" if first else b": keep-alive\n\n"
                for event in events:
                    if event.kind == "data":
                        first, last = False, loop.time()
                        yield event.data
                        continue
                    finished = True
                    if event.kind == "error":
                        raise StreamError(event.data.decode(errors="replace"), event.code)
                    return
        finally:
            try:
                await self._relay._release(self.stream_id, finished)
            except RelayUnavailable:
                log.warning("relay stream %s not released: Redis does not answer", self.stream_id)

    def _deadline(self, started: float, last: float, first: bool) -> tuple[float, str]:
        """The nearest limit: the whole stream's, and the first chunk's or the silence's."""
        limits = self._relay.settings
        total = limits.total_timeout_seconds
        if first:
            wait = limits.first_chunk_timeout_seconds
            phase = (
                started + wait,
                f"The model sent nothing within {wait:g} seconds (it may be queued or still loading); "
                "try again later.",
            )
        else:
            wait = limits.silence_timeout_seconds
            phase = (last + wait, f"The model sent nothing for {wait:g} seconds; the stream was ended.")
        overall = (started + total, f"The stream reached the gateway's limit of {total:g} seconds.")
        return min(phase, overall)


@dataclass
class _LocalStream:
    token_digest: str
    queue: asyncio.Queue[Event]
    state: Literal["open", "finished", "gone"] = "open"
    data_posts: int = 0
    posted: asyncio.Event = field(default_factory=asyncio.Event)


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
        if not hmac.compare_digest(stream.token_digest, _digest(token)):
            return Delivery.BAD_TOKEN
        if stream.state != "open":
            return Delivery.GONE
        if event.kind == "data":
            stream.data_posts += 1
            stream.posted.set()
            await stream.queue.put(event)
        else:
            await self._end(stream, event)
        return Delivery.ACCEPTED

    async def close(self) -> None:
        self._streams.clear()

    async def _register(self, stream_id: str, token_digest: str) -> None:
        self._streams[stream_id] = _LocalStream(token_digest, asyncio.Queue(self.settings.max_queued_chunks))

    async def _next(self, stream_id: str, wait: float) -> list[Event]:
        queue = self._streams[stream_id].queue
        try:
            first = await asyncio.wait_for(queue.get(), wait)
        except TimeoutError:
            return []
        events = [first]
        while not queue.empty() and events[-1].kind == "data":
            events.append(queue.get_nowait())
        return events

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
        await stream.queue.put(event)

    async def _release(self, stream_id: str, finished: bool) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        now = time.monotonic()
        memory = self.settings.gone_memory_seconds
        self._gone = {key: at for key, at in self._gone.items() if now - at < memory}
        self._gone[stream_id] = now
        stream.state = "gone"
        while not stream.queue.empty():
            stream.queue.get_nowait()


class RedisRelay(Relay):
    """Several processes or hosts: stream state in a hash, events appended to a Redis stream."""

    _PREFIX = "gateway:relay:"

    def __init__(self, settings: StreamingSettings, url: str) -> None:
        super().__init__(settings)
        # As for the limits: one immediate retry reconnects a pooled connection a Redis restart closed.
        # Explicit socket timeouts, whatever the installed redis-py's default (none before 6, 5 s after):
        # a blocking XREAD waits up to keepalive_seconds, so its connections must wait longer than that.
        pool_size = settings.max_streams + 64
        self._redis = redis.asyncio.Redis.from_url(
            url,
            max_connections=pool_size,
            retry=Retry(NoBackoff(), 1),
            socket_timeout=REDIS_COMMAND_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_COMMAND_TIMEOUT_SECONDS,
        )
        self._reader = redis.asyncio.Redis.from_url(
            url,
            max_connections=pool_size,
            retry=Retry(NoBackoff(), 1),
            socket_timeout=settings.keepalive_seconds + REDIS_READ_MARGIN_SECONDS,
            socket_connect_timeout=REDIS_COMMAND_TIMEOUT_SECONDS,
        )
        self._cursors: dict[str, str] = {}

    def _keys(self, stream_id: str) -> tuple[str, str]:
        return f"{self._PREFIX}{stream_id}", f"{self._PREFIX}{stream_id}:events"

    async def deliver(self, stream_id: str, token: str, event: Event) -> Delivery:
        state_key, events_key = self._keys(stream_id)
        with _redis_answers():
            state: Any = await self._redis.hgetall(state_key)
            if not state:
                return Delivery.UNKNOWN
            if not hmac.compare_digest(state[b"token"], _digest(token).encode()):
                return Delivery.BAD_TOKEN
            if state[b"state"] != b"open":
                return Delivery.GONE
            if event.kind == "data":
                await self._append(events_key, event, count_post=True)
            else:
                await self._end(stream_id, event)
            return Delivery.ACCEPTED

    async def close(self) -> None:
        await self._reader.aclose()
        await self._redis.aclose()

    async def _register(self, stream_id: str, token_digest: str) -> None:
        state_key, _ = self._keys(stream_id)
        ttl = int(self.settings.total_timeout_seconds + self.settings.gone_memory_seconds)
        with _redis_answers():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(state_key, mapping={"token": token_digest, "state": "open", "data_posts": 0})
                pipe.expire(state_key, ttl)
                await pipe.execute()
        self._cursors[stream_id] = "0-0"

    async def _next(self, stream_id: str, wait: float) -> list[Event]:
        _, events_key = self._keys(stream_id)
        cursor = self._cursors[stream_id]
        with _redis_answers():
            answer: Any = await self._reader.xread(
                {events_key: cursor}, count=100, block=max(1, int(wait * 1000))
            )
        events = []
        for _, entries in answer:
            for entry_id, fields in entries:
                self._cursors[stream_id] = entry_id
                events.append(Event(fields[b"kind"].decode(), fields[b"data"], int(fields[b"code"])))
        return events

    async def _push(self, stream_id: str, event: Event) -> None:
        state_key, _ = self._keys(stream_id)
        with _redis_answers():
            if await self._redis.hget(state_key, "state") == b"open":
                await self._end(stream_id, event)

    async def _end(self, stream_id: str, event: Event) -> None:
        state_key, events_key = self._keys(stream_id)
        deadline = time.monotonic() + ORDERING_GRACE_SECONDS
        while time.monotonic() < deadline:
            posts = int(await self._redis.hget(state_key, "data_posts") or 0)
            if posts >= event.after_posts:
                break
            await asyncio.sleep(0.005)
        await self._redis.hset(state_key, "state", "finished")
        await self._append(events_key, event)

    async def _append(self, events_key: str, event: Event, count_post: bool = False) -> None:
        ttl = int(self.settings.total_timeout_seconds + self.settings.gone_memory_seconds)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(events_key, {"kind": event.kind, "data": event.data, "code": event.code})
            pipe.expire(events_key, ttl)
            if count_post:
                pipe.hincrby(events_key.removesuffix(":events"), "data_posts", 1)
            await pipe.execute()

    async def _release(self, stream_id: str, finished: bool) -> None:
        state_key, events_key = self._keys(stream_id)
        self._cursors.pop(stream_id, None)
        with _redis_answers():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(state_key, "state", "finished" if finished else "gone")
                pipe.expire(state_key, int(self.settings.gone_memory_seconds))
                pipe.delete(events_key)
                await pipe.execute()
