"""The Redis helper gives a real server that can go away and come back on the same URL."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from testing.services.redis_server import RedisServer


async def test_set_get_stop_restart_reconnect(tmp_path: Path) -> None:
    async with RedisServer(tmp_path) as server:
        client = aioredis.from_url(server.url)
        try:
            await client.set("greeting", "hello")
            assert await client.get("greeting") == b"hello"
            url = server.url

            await server.stop()
            with pytest.raises(RedisConnectionError):
                await client.get("greeting")
            await server.restart()

            assert server.url == url and url.startswith("redis://127.0.0.1:")
            assert await client.get("greeting") is None  # nothing persisted across the restart
            await client.set("greeting", "again")
            assert await client.get("greeting") == b"again"
        finally:
            await client.aclose()
    assert not server.running
