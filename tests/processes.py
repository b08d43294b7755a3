"""Waiting on the real servers the tests start (Redis, PostgreSQL): up, or gone."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable


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
