"""Waiting on processes that tests and benchmarks start: up, gone, or their children."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path


async def exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether `process` ended within `timeout` seconds, waited for without blocking the loop."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


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


async def stop_process(
    process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float, *, group: bool = False
) -> None:
    """The server's own shutdown signal first, then SIGKILL if it lingers: to its whole process group
    with `group` (a process started in a session of its own), so that its workers go too."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    if await exited(process, timeout):
        return
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
    await exited(process, timeout)


def children(pid: int) -> list[int]:
    """A process's children (a supervisor's workers), from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            listed = (task / "children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended since the listing: it has no children left
        found += [int(child) for child in listed.split()]
    return found
