"""The callback relay in Redis, for several gateway processes or hosts: a callback that lands on another
process than the one holding the client still reaches it.

Each relay stream is a state hash (token digest, state, data posts) and a Redis stream of events.
What keeps Redis and the process bounded:

- A Redis stream holds at most `max_queued_chunks` unread data events: a callback that finds it full
  waits for the client to read (back-pressure, as the in-process relay's bounded queue does), and
  after `BACKPRESSURE_LIMIT_SECONDS` ends the stream instead (its client has stopped reading).
- Events are deleted from Redis as soon as the process holding the client has read them.
- A process reads all its waiting streams through `READERS` connections, each one blocking XREAD over
  many streams, fanned out to the waiting streams; other commands share a small pool.
- Every command and every read has a socket timeout, so a Redis that accepts connections and never
  answers ends the waiting streams with a clear error within `READ_BLOCK_SECONDS` plus
  `READ_MARGIN_SECONDS`, and refuses new ones after `COMMAND_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.core.callback_relay import (
    ABANDONED_GRACE_SECONDS,
    ORDERING_GRACE_SECONDS,
    Delivery,
    Event,
    EventKind,
    Relay,
    RelayFull,
    RelayUnavailable,
    _digest,
    abandoned_before,
)
from proxy.settings.streaming import StreamingSettings

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_SECONDS = 5.0
"""The longest a Redis command (or connecting) may take before Redis counts as unavailable. Set
explicitly: redis-py's default differs between versions (none before 6, 5 s since)."""

COMMAND_CONNECTIONS = 32
"""The pool for every command but the blocking reads; callers wait for a free connection."""

READERS = 4
"""Connections per process that read the waiting streams, each with one blocking XREAD."""

READ_BLOCK_SECONDS = 5.0
"""How long one XREAD blocks when none of its streams has news."""

READ_MARGIN_SECONDS = 3.0
"""How much longer than its block time a blocking read may take before Redis counts as unavailable."""

READ_COUNT = 100
"""Events taken per stream per read; a stream whose client has more than this unread in the
process is left out of the reads until it catches up, so the rest waits in Redis."""

BACKPRESSURE_LIMIT_SECONDS = 60.0
"""How long a callback waits on a stream that is full because its client does not read."""

_APPEND = """
if ARGV[6] ~= '0' and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[6]) then
    return 0
end
redis.call('XADD', KEYS[1], '*', 'kind', ARGV[1], 'data', ARGV[2], 'code', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] == '1' then
    redis.call('HINCRBY', KEYS[2], 'data_posts', 1)
end
return 1
"""
"""Append an event unless the stream already holds its limit (0: no limit, for `done` and `error`)."""


@contextlib.contextmanager
def _redis_answers() -> Iterator[None]:
    """Around every call to Redis: its client's errors say nothing to a client or a function."""
    try:
        yield
    except RedisError as exc:
        raise RelayUnavailable() from exc


@dataclass
class _Waiting:
    """A stream whose client is in this process: what the reader has taken for it, not yet read."""

    key: bytes
    cursor: bytes = b"0-0"
    events: deque[Event] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    failure: RelayUnavailable | None = None
    left_out: bool = False
    opened: float = field(default_factory=time.monotonic)


def _event(fields: dict[bytes, bytes]) -> Event:
    return Event(cast(EventKind, fields[b"kind"].decode()), fields[b"data"], int(fields[b"code"]))


class _Reader:
    """One connection's blocking XREAD over its share of the process's waiting streams. A stream that
    joins while the read blocks is added by waking it: an entry in the reader's own wake stream,
    which the read also watches."""

    def __init__(self, relay: RedisRelay, url: str, index: int) -> None:
        self._relay = relay
        self._client = redis.asyncio.Redis.from_url(
            url,
            single_connection_client=True,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=READ_BLOCK_SECONDS + READ_MARGIN_SECONDS,
            socket_connect_timeout=COMMAND_TIMEOUT_SECONDS,
        )
        self.wake_key = f"{RedisRelay.PREFIX}wake:{relay.process_id}:{index}".encode()
        self._wake_cursor = b"0-0"
        self._waiting: dict[bytes, _Waiting] = {}
        self._changed = asyncio.Event()
        self._reading = self._woken = False
        self._task: asyncio.Task[None] | None = None

    def add(self, waiting: _Waiting) -> None:
        self._waiting[waiting.key] = waiting
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-relay-reader")
        self.changed()

    def remove(self, key: bytes) -> None:
        self._waiting.pop(key, None)

    def changed(self) -> None:
        """A stream joined, or a client caught up: the next read must include it."""
        self._changed.set()
        if self._reading and not self._woken:
            self._woken = True
            self._relay.background(self._relay.wake(self.wake_key))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            wanted = self._wanted()
            if not wanted:
                self._changed.clear()
                await self._changed.wait()
                continue
            wanted[self.wake_key] = self._wake_cursor
            self._changed.clear()
            self._reading, self._woken = True, False
            try:
                answer: Any = await self._client.xread(
                    wanted, count=READ_COUNT, block=int(READ_BLOCK_SECONDS * 1000)
                )
            except RedisError as exc:
                self._fail(exc)
                continue
            finally:
                self._reading = False
            try:
                read = self._take(answer or [])
            except (KeyError, ValueError, IndexError, TypeError) as exc:  # not what this relay writes
                self._fail(exc)
                continue
            if read:
                self._relay.background(self._relay.forget(read))

    def _wanted(self) -> dict[Any, Any]:
        """Each waiting stream from where it was last read, but those whose clients lag behind."""
        wanted: dict[Any, Any] = {}
        for waiting in self._waiting.values():
            waiting.left_out = len(waiting.events) >= READ_COUNT
            if not waiting.left_out:
                wanted[waiting.key] = waiting.cursor
        return wanted

    def _take(self, answer: list[Any]) -> dict[bytes, list[bytes]]:
        """Hand the events read to their streams; the ids read, per stream, to delete from Redis."""
        read: dict[bytes, list[bytes]] = {}
        for key, entries in answer:
            if key == self.wake_key:
                self._wake_cursor = entries[-1][0]
                continue
            waiting = self._waiting.get(key)
            if waiting is None:
                continue
            waiting.events.extend(_event(fields) for _, fields in entries)
            waiting.cursor = entries[-1][0]
            waiting.arrived.set()
            read[key] = [entry_id for entry_id, _ in entries]
        return read

    def _fail(self, exc: Exception) -> None:
        """Redis did not answer the read: every stream waiting on it ends with a clear error."""
        count = len(self._waiting)
        log.warning("relay: reading streams from Redis failed (%s); ending %d streams", exc, count)
        for waiting in self._waiting.values():
            waiting.failure = RelayUnavailable()
            waiting.arrived.set()
        self._waiting.clear()


class RedisRelay(Relay):
    """Several processes or hosts: stream state in a hash, events appended to a Redis stream."""

    PREFIX = "gateway:relay:"

    def __init__(self, settings: StreamingSettings, url: str) -> None:
        super().__init__(settings)
        self.process_id = uuid.uuid4().hex
        self._pool = pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=COMMAND_CONNECTIONS,
            timeout=COMMAND_TIMEOUT_SECONDS,
            socket_timeout=COMMAND_TIMEOUT_SECONDS,
            socket_connect_timeout=COMMAND_TIMEOUT_SECONDS,
        )
        # One immediate retry reconnects a pooled connection that a Redis restart closed; a command
        # that timed out is not sent again, so a Redis that stopped answering is known in one timeout.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        self._redis = redis.asyncio.Redis(connection_pool=pool, retry=retry)
        self._append_script = self._redis.register_script(_APPEND)
        self._readers = [_Reader(self, url, index) for index in range(READERS)]
        self._waiting: dict[str, tuple[_Waiting, _Reader]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_sweep = time.monotonic() + ABANDONED_GRACE_SECONDS

    def _keys(self, stream_id: str) -> tuple[str, str]:
        return f"{self.PREFIX}{stream_id}", f"{self.PREFIX}{stream_id}:events"

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wake(self, wake_key: bytes) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(wake_key, {"w": 1}, maxlen=1, approximate=False)
                pipe.expire(wake_key, 60)
                await pipe.execute()
        except RedisError as exc:
            log.debug("relay: waking a reader failed: %s", exc)

    async def forget(self, read: dict[bytes, list[bytes]]) -> None:
        """Events the process has taken leave Redis at once: what stays there is unread."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, entry_ids in read.items():
                    pipe.xdel(key, *entry_ids)
                await pipe.execute()
        except RedisError as exc:
            log.warning("relay: deleting read events from Redis failed: %s", exc)

    async def deliver(self, stream_id: str, token: str, event: Event) -> Delivery:
        state_key, _ = self._keys(stream_id)
        with _redis_answers():
            state: Any = await self._redis.hgetall(state_key)
            if not state:
                return Delivery.UNKNOWN
            if not hmac.compare_digest(state[b"token"], _digest(token).encode()):
                return Delivery.BAD_TOKEN
            if state[b"state"] != b"open":
                return Delivery.GONE
            if event.kind != "data":
                await self._end(stream_id, event)
                return Delivery.ACCEPTED
            return await self._append_waiting(stream_id, event)

    async def _append_waiting(self, stream_id: str, event: Event) -> Delivery:
        """Back-pressure: a full stream makes the callback wait for its client, up to a limit."""
        state_key, events_key = self._keys(stream_id)
        deadline = time.monotonic() + BACKPRESSURE_LIMIT_SECONDS
        pause = 0.01
        while not await self._append(events_key, event, limit=self.settings.max_queued_chunks):
            if time.monotonic() >= deadline:
                message = "The stream's client stopped reading; the stream was ended."
                await self._end(stream_id, Event("error", message.encode(), 504))
                return Delivery.GONE
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
            if await self._redis.hget(state_key, "state") != b"open":
                return Delivery.GONE
        return Delivery.ACCEPTED

    async def close(self) -> None:
        for reader in self._readers:
            await reader.close()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=COMMAND_TIMEOUT_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._redis.aclose()
        await self._pool.disconnect()  # a client given its pool leaves it open

    async def _register(self, stream_id: str, token: str) -> None:
        if len(self._waiting) >= self.settings.max_streams or time.monotonic() > self._next_sweep:
            self._forget_abandoned()
            if len(self._waiting) >= self.settings.max_streams:
                raise RelayFull(self.settings.max_streams)
        state_key, events_key = self._keys(stream_id)
        ttl = int(self.settings.total_timeout_seconds + self.settings.gone_memory_seconds)
        with _redis_answers():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(state_key, mapping={"token": _digest(token), "state": "open", "data_posts": 0})
                pipe.expire(state_key, ttl)
                await pipe.execute()
        waiting = _Waiting(events_key.encode())
        reader = self._readers[hash(stream_id) % len(self._readers)]
        self._waiting[stream_id] = (waiting, reader)
        reader.add(waiting)

    def _forget_abandoned(self) -> None:
        """Streams opened but never read (or released) long ago stop being read and counted."""
        cutoff = abandoned_before(self.settings)
        self._next_sweep = time.monotonic() + ABANDONED_GRACE_SECONDS
        for stream_id, (waiting, reader) in list(self._waiting.items()):
            if waiting.opened < cutoff:
                del self._waiting[stream_id]
                reader.remove(waiting.key)

    async def _next(self, stream_id: str, wait: float) -> list[Event]:
        waiting, reader = self._waiting[stream_id]
        if not waiting.events and waiting.failure is None:
            waiting.arrived.clear()
            try:  # not `wait_for`, which (before Python 3.12) runs the wait as a task of its own
                async with asyncio.timeout(wait):
                    await waiting.arrived.wait()
            except TimeoutError:
                return []
        if waiting.failure is not None:
            raise waiting.failure
        events = list(waiting.events)
        waiting.events.clear()
        if waiting.left_out:
            reader.changed()
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

    async def _append(self, events_key: str, event: Event, limit: int = 0) -> bool:
        ttl = int(self.settings.total_timeout_seconds + self.settings.gone_memory_seconds)
        state_key = events_key.removesuffix(":events")
        count_post = "1" if event.kind == "data" else "0"
        arguments = [event.kind, event.data, event.code, ttl, count_post, limit]
        return bool(await self._append_script(keys=[events_key, state_key], args=arguments))

    async def _release(self, stream_id: str, finished: bool) -> None:
        """Once Redis has failed the stream's read, it is told in the background: the client's stream
        ends at once instead of waiting on a Redis that does not answer."""
        waiting, reader = self._waiting.pop(stream_id, (None, None))
        if waiting is not None and reader is not None:
            reader.remove(waiting.key)
            if waiting.failure is not None:
                self.background(self._forget_stream(stream_id, finished))
                return
        await self._forget_stream(stream_id, finished)

    async def _forget_stream(self, stream_id: str, finished: bool) -> None:
        state_key, events_key = self._keys(stream_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(state_key, "state", "finished" if finished else "gone")
                pipe.expire(state_key, int(self.settings.gone_memory_seconds))
                pipe.delete(events_key)
                await pipe.execute()
        except RedisError:
            log.warning("relay stream %s not released: Redis does not answer", stream_id)
