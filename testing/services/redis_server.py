"""A real, throw-away redis-server on a free 127.0.0.1 port, for tests.

A fake Redis would only show that the gateway agrees with the fake; the real server also behaves honestly
when it goes away (refused connections, reset sockets) and comes back empty, which is what the "Redis
restarts" tests need. Nothing is persisted (``--save "" --appendonly no``), so a restart loses all data.

    async with RedisServer(tmp_path) as redis_server:
        client = redis.asyncio.from_url(redis_server.url)
        ...
        await redis_server.restart()
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from typing import Final

import pytest

from testing.services.base import ServiceProcess

MISSING_MESSAGE: Final = (
    "redis-server is not installed. The tests need a real Redis: install the Debian package "
    "`redis-server` (apt-get install -y redis-server), as .ci/run does on a fresh machine."
)


def _binary() -> str:
    """The redis-server executable; a missing one fails the test loudly rather than skipping it."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(MISSING_MESSAGE, pytrace=False)
    return path


async def _answers_ping(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class RedisServer(ServiceProcess):
    """One redis-server process; ``stop()`` and ``restart()`` keep the port, so clients can reconnect.
    Stopped with SIGTERM: Redis is gone and its port refuses connections."""

    name = "redis"
    ready_timeout = 10.0
    stop_timeout = 5.0

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, port: int) -> list[str]:
        command = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        return [*command, "--save", "", "--appendonly", "no", "--daemonize", "no"]

    async def ready(self) -> bool:
        return await _answers_ping(self.port)
