"""Waiting on the real servers the tests start (Redis, PostgreSQL): up, or gone."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable

import aiohttp


async def became_ready(
    process: subprocess.Popen[bytes], ready: Callable[[], Awaitable[bool]], timeout: float
) -> bool:
    """True once `ready()` says so; False if the process died or the time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if await ready():
            return True
        await asyncio.sleep(0.02)
    return False


async def exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def stop(process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> None:
    """The server's own shutdown signal first, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    if not await exited(process, timeout):
        process.kill()
        await exited(process, timeout)


async def wait_until_serving(http: aiohttp.ClientSession, url: str, timeout: float = 20) -> None:
    """For gateways started as processes: their health route answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not come up")
