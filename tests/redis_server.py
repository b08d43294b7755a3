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
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

from tests.processes import became_ready, stop

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
MISSING_MESSAGE = (
    "redis-server is not installed. The tests need a real Redis: install the Debian package "
    "`redis-server` (apt-get install -y redis-server), as .ci/run does on a fresh machine."
)


def _free_port() -> int:
    """An ephemeral port nobody listens on right now (the small race is handled by retrying in start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


class RedisServer:
    """One redis-server process; ``stop()`` and ``restart()`` keep the port, so clients can reconnect."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start on a free port (or the previous port after a stop) and wait until it answers PING."""
        if self.running:
            return
        if self.port:
            await self._launch(self.port)
            return
        for attempt in range(3):
            try:
                await self._launch(_free_port())
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers: Redis is gone and its port refuses connections."""
        process, self._process = self._process, None
        await stop(process, signal.SIGTERM, STOP_TIMEOUT)

    async def restart(self) -> None:
        """Redis goes away and comes back on the same port, empty."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _launch(self, port: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / f"redis-{port}.log"
        command = [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._process, self.port = process, port
        if await became_ready(process, lambda: _answers_ping(port), READY_TIMEOUT):
            return
        await self.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {port} did not answer PING; its log:\n{tail}")


async def start_redis(tmp_dir: Path) -> RedisServer:
    """Start a server in ``tmp_dir``; the caller must ``await server.stop()`` (or use ``async with``)."""
    server = RedisServer(tmp_dir)
    await server.start()
    return server
