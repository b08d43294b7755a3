"""What the scheduler adaptor tests share: the fake batch commands first on PATH, their job table,
an adaptor context, a stand-in for ssh, and waiting for a job to reach a state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adaptors.context import AdaptorContext
from adaptors.schedulers.contract import JobState, JobStatus
from testing.fake_schedulers import BIN
from testing.fake_schedulers.table import DIRECTORY_VARIABLE, FakeBatch


def batch_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBatch:
    """The fake commands first on PATH (read when an adaptor is built), with an empty job table."""
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return FakeBatch(tmp_path / "batch")


@contextlib.asynccontextmanager
async def adaptor_context() -> AsyncIterator[AdaptorContext]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield AdaptorContext(executor=executor, relay=None)  # type: ignore[arg-type]


def common_config(batch: FakeBatch, tmp_path: Path) -> dict[str, object]:
    return {
        "staging_directory": str(tmp_path / "staging"),
        "command_environment": {DIRECTORY_VARIABLE: str(batch.directory)},
    }


def fake_ssh(directory: Path, exit_status: int | None = None) -> str:
    """A stand-in for `ssh HOST COMMAND...`: like ssh, it joins the words after the host with
    spaces and hands them to a shell; with `exit_status`, it cannot reach the host."""
    path = directory / "fake-ssh"
    if exit_status is None:
        body = 'shift\nexec /bin/sh -c "$*"\n'
    else:
        body = f'echo "ssh: connect to host $1 port 22: Connection refused" >&2\nexit {exit_status}\n'
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def wait_for_state(
    read: Callable[[], Awaitable[dict[str, JobStatus]]], job_id: str, state: JobState, timeout: float = 15
) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        found = (await read())[job_id]
        if found.state is state:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{job_id} is {found}, not {state.value}")
        await asyncio.sleep(0.1)


def number(job_id: str) -> int:
    return int(job_id.split(".", 1)[0])
