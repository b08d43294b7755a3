"""Who started each asynchronous task (proxy/edge/tasks.py), so that only they may read it.

In this process's memory, or in Redis when `redis_url` is set, so that a task started through one
gateway process or host can be read through any other. Both are bounded the same way: entries
live `tasks.lifetime_seconds`, and beyond `tasks.max_remembered` the oldest are forgotten.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from adaptors import BaseEndpoint
from proxy.core.identity import User
from proxy.errors import ApiError
from proxy.settings.batches import TaskSettings

MAX_TASK_ID_CHARS = 128
"""Task ids are Globus UUIDs; anything much longer cannot be one and is not looked up."""


@dataclass(frozen=True)
class TaskEntry:
    user_id: str
    endpoint_slug: str
    cluster: str
    framework: str


class TaskBookUnavailable(ApiError):
    def __init__(self) -> None:
        message = "The gateway cannot read its task records right now; try again shortly."
        super().__init__(503, message, code="tasks_unavailable")


class TaskBook(ABC):
    def __init__(self, settings: TaskSettings) -> None:
        self.max_remembered = settings.max_remembered
        self.lifetime = settings.lifetime_seconds

    async def add(self, task_id: str, user: User, endpoint: BaseEndpoint) -> None:
        entry = TaskEntry(user.id, endpoint.endpoint_slug, endpoint.cluster, endpoint.framework)
        await self._add(task_id, entry)

    async def get(self, task_id: str) -> TaskEntry | None:
        if len(task_id) > MAX_TASK_ID_CHARS:
            return None
        return await self._get(task_id)

    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def _add(self, task_id: str, entry: TaskEntry) -> None: ...

    @abstractmethod
    async def _get(self, task_id: str) -> TaskEntry | None: ...


class LocalTaskBook(TaskBook):
    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self._entries: OrderedDict[str, tuple[float, TaskEntry]] = OrderedDict()
        """task id → (time.monotonic() when forgotten, entry), oldest first"""

    async def _add(self, task_id: str, entry: TaskEntry) -> None:
        self._entries[task_id] = (time.monotonic() + self.lifetime, entry)
        self._entries.move_to_end(task_id)
        self._forget_expired()
        while len(self._entries) > self.max_remembered:
            self._entries.popitem(last=False)

    async def _get(self, task_id: str) -> TaskEntry | None:
        self._forget_expired()
        found = self._entries.get(task_id)
        return None if found is None else found[1]

    def _forget_expired(self) -> None:
        """Every entry lives equally long, so the expired ones are the oldest, at the front."""
        now = time.monotonic()
        while self._entries and next(iter(self._entries.values()))[0] <= now:
            self._entries.popitem(last=False)


class RedisTaskBook(TaskBook):
    """An entry per task with its own expiry, and an index by time that bounds their number."""

    _PREFIX = "gateway:task:"
    _INDEX = "gateway:tasks"

    def __init__(self, settings: TaskSettings, url: str) -> None:
        super().__init__(settings)
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 1)
        )

    async def _add(self, task_id: str, entry: TaskEntry) -> None:
        now = time.time()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._PREFIX + task_id, json.dumps(asdict(entry)), px=int(self.lifetime * 1000))
                pipe.zadd(self._INDEX, {task_id: now})
                pipe.zremrangebyscore(self._INDEX, "-inf", now - self.lifetime)
                pipe.zcard(self._INDEX)
                *_, count = await pipe.execute()
            if count > self.max_remembered:
                oldest: Any = await self._redis.zpopmin(self._INDEX, count - self.max_remembered)
                await self._redis.delete(*(self._PREFIX + member.decode() for member, _ in oldest))
        except RedisError as exc:
            raise TaskBookUnavailable() from exc

    async def _get(self, task_id: str) -> TaskEntry | None:
        try:
            data = await self._redis.get(self._PREFIX + task_id)
        except RedisError as exc:
            raise TaskBookUnavailable() from exc
        return None if data is None else TaskEntry(**json.loads(data))

    async def close(self) -> None:
        await self._redis.aclose()


def build_task_book(settings: TaskSettings, redis_url: str | None) -> TaskBook:
    return RedisTaskBook(settings, redis_url) if redis_url else LocalTaskBook(settings)
