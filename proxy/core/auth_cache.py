"""A cache of authentication outcomes keyed by sha256(token), never by the token itself.

Concurrent requests with the same uncached token share one lookup (single flight); entries expire
on their own TTL; the local cache is bounded (least recently used entries go first). With Redis
configured, outcomes are shared between processes and hosts, with the local cache in front.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import redis.asyncio

log = logging.getLogger(__name__)

Value = TypeVar("Value")


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SharedStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None: ...
    async def close(self) -> None: ...


class Codec(Protocol[Value]):
    def encode(self, value: Value) -> bytes: ...
    def decode(self, data: bytes) -> Value: ...


Loader = Callable[[], Awaitable[tuple[Value, float]]]
"""Returns the value and how long it may be cached (0: not at all)."""


class TokenCache(Generic[Value]):
    def __init__(self, max_entries: int, store: SharedStore | None = None, codec: Codec[Value] | None = None):
        if (store is None) != (codec is None):
            raise ValueError("a shared store needs a codec")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Value]] = OrderedDict()
        self._pending: dict[str, asyncio.Task[Value]] = {}
        self._store = store
        self._codec = codec

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str, load: Loader[Value]) -> Value:
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > time.monotonic():
                self._entries.move_to_end(key)
                return entry[1]
            del self._entries[key]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fill(key, load))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(task)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def _fill(self, key: str, load: Loader[Value]) -> Value:
        shared = await self._shared_get(key)
        if shared is not None:
            value, ttl = shared
        else:
            value, ttl = await load()
            await self._shared_set(key, value, ttl)
        self._remember(key, value, ttl)
        return value

    def _remember(self, key: str, value: Value, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def _shared_get(self, key: str) -> tuple[Value, float] | None:
        if self._store is None or self._codec is None:
            return None
        try:
            data = await self._store.get(key)
        except Exception as exc:
            log.warning("shared auth cache unavailable, introspecting locally: %s", type(exc).__name__)
            return None
        if data is None:
            return None
        expires_at, _, payload = data.partition(b"\n")
        return self._codec.decode(payload), float(expires_at) - time.time()

    async def _shared_set(self, key: str, value: Value, ttl: float) -> None:
        if self._store is None or self._codec is None or ttl <= 0:
            return
        data = f"{time.time() + ttl:.3f}\n".encode() + self._codec.encode(value)
        try:
            await self._store.set(key, data, ttl)
        except Exception as exc:
            log.warning("shared auth cache unavailable, keeping the outcome locally: %s", type(exc).__name__)


class RedisStore:
    """Outcomes in Redis under a prefix; only hashes of tokens ever reach it."""

    def __init__(self, url: str, prefix: str = "gateway:auth:") -> None:
        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(self._prefix + key)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        await self._redis.set(self._prefix + key, value, px=max(1, int(ttl_seconds * 1000)))

    async def close(self) -> None:
        await self._redis.aclose()
