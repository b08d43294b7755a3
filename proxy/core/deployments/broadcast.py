"""Across hosts (with `redis_url`): a process that changed a deployment, or wants one started,
says so on a Redis channel; every process refreshes its routing map at once instead of at its
next periodic refresh, and the leader reconciles at once. The message carries only a kind and a
deployment name: the state itself is in the database, so a lost message costs a second at most.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import redis.asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

CHANNEL = "gateway:deployments"
RECONNECT_SECONDS = 2.0
_MAX_MESSAGE_BYTES = 1024


class Broadcast:
    def __init__(self, url: str, on_message: Callable[[str, str], None]) -> None:
        self._client = redis.asyncio.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._on_message = on_message
        self._failing = False
        self.subscribed = False

    async def publish(self, kind: str, name: str) -> None:
        try:
            await self._client.publish(CHANNEL, json.dumps({"kind": kind, "name": name}))
        except (RedisError, OSError) as exc:
            log.warning("cannot publish a deployment change to Redis: %s", exc)

    async def listen_forever(self) -> None:
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                self.subscribed = False
                if not self._failing:
                    log.warning("deployment changes from Redis unavailable (%s); retrying", exc)
                self._failing = True
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen(self) -> None:
        async with self._client.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            self._failing, self.subscribed = False, True
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or not isinstance(message.get("data"), bytes):
                    continue
                data = message["data"]
                if len(data) > _MAX_MESSAGE_BYTES:
                    continue
                try:
                    document = json.loads(data)
                    kind, name = document["kind"], document["name"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(kind, str) and isinstance(name, str):
                    self._on_message(kind, name)

    async def close(self) -> None:
        await self._client.aclose()
