"""The local scheduler: each job is a process on the gateway's own host.

The embedded default (one machine runs gateway and models) and what the tests run real pilots
with. A job is a directory under `state_dir/jobs/<job id>` holding its spec, the wrapper's pid and
process start time, its output log and, once it ends, its exit status (local_job.py writes that).
Everything is read back from those files, so a restarted gateway still knows its jobs; the start
time from /proc keeps a reused pid from passing for a job that ended.

A job starts with a login's basic environment and its spec's, never the gateway's own.

Config: `state_dir` (absolute path, required), `staging_dir` (absolute, default
`state_dir/staging`), `queue_delay_seconds` (0: a simulated wait in the queue, for tests that
watch the `queued` phase), `end_grace_seconds` (10: SIGTERM, then SIGKILL after this).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptors.schedulers.contract import JobSpec, JobState, JobStatus, Scheduler, SchedulerError
from adaptors.schedulers.local_job import session_members

_WRAPPER = Path(__file__).with_name("local_job.py")
_JOB_ID_PREFIX = "local-"
_LOGIN_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")
_FIELDS = {"state_dir", "staging_dir", "queue_delay_seconds", "end_grace_seconds"}


def _absolute(config: Mapping[str, Any], name: str, default: Path | None = None) -> Path:
    value = config.get(name)
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or not value:
        raise ValueError(f"config.{name}: required, an absolute directory path")
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"config.{name}: must be an absolute path, not {value!r}")
    return path


def _login_environment() -> dict[str, str]:
    """What a batch job starts with: a login's basics, not the gateway's environment, which holds
    its secrets (database password, Globus client secret)."""
    return {name: os.environ[name] for name in _LOGIN_VARIABLES if name in os.environ}


def _seconds(config: Mapping[str, Any], name: str, default: float, minimum: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ValueError(f"config.{name}: must be a number of seconds, at least {minimum:g}")
    return float(value)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if
    there is no such process or it is a zombie (ended, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass(frozen=True)
class _Job:
    directory: Path
    pid: int
    start_time: int | None
    submitted: float
    queue_delay: float

    def alive(self) -> bool:
        return self.start_time is not None and _start_time(self.pid) == self.start_time


class LocalScheduler(Scheduler):
    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        super().__init__(name, config)
        unknown = sorted(set(config) - _FIELDS)
        if unknown:
            raise ValueError(f"config.{unknown[0]}: unknown field (known: {', '.join(sorted(_FIELDS))})")
        self.state_dir = _absolute(config, "state_dir")
        self.staging_dir = _absolute(config, "staging_dir", self.state_dir / "staging")
        self.queue_delay = _seconds(config, "queue_delay_seconds", 0, 0)
        self.end_grace = _seconds(config, "end_grace_seconds", 10, 0.1)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        """Wrappers this process started, kept so that ended ones are reaped, not left zombies."""

    def staging_path(self, file_name: str) -> str:
        if not file_name or "/" in file_name or file_name.startswith("."):
            raise SchedulerError(f"cannot stage a file named {file_name!r}", retryable=False)
        return str(self.staging_dir / file_name)

    async def stage(self, content: bytes, file_name: str) -> str:
        path = Path(self.staging_path(file_name))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(content)
        os.chmod(path, 0o600)
        return str(path)

    async def submit(self, spec: JobSpec) -> str:
        job_id = _JOB_ID_PREFIX + secrets.token_hex(8)
        directory = self._directory(job_id)
        try:
            directory.mkdir(parents=True, mode=0o700)
            document = {
                "name": spec.name,
                "command": list(spec.command),
                "environment": {**_login_environment(), **spec.environment},
                "working_directory": spec.working_directory or str(directory),
                "walltime_seconds": spec.walltime_seconds,
                "queue_delay_seconds": self.queue_delay,
                "end_grace_seconds": self.end_grace,
                "submitted": time.time(),
            }
            (directory / "job.json").write_text(json.dumps(document))
            with open(directory / "wrapper.log", "wb") as errors:
                wrapper = subprocess.Popen(
                    [sys.executable, str(_WRAPPER), str(directory)],
                    env=_login_environment(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise SchedulerError(f"cannot start a local job: {exc}") from exc
        self._children[job_id] = wrapper
        started = {"pid": wrapper.pid, "start_time": _start_time(wrapper.pid)}
        (directory / "pid.json").write_text(json.dumps(started))
        return job_id

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        self._reap()
        answers = {}
        for job_id in job_ids:
            answers[job_id] = await self._state(job_id)
        return answers

    async def end(self, job_id: str) -> None:
        job = self._job(job_id)
        if job is None or not job.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2 * self.end_grace + 1  # the command's grace, then its strays'
        while time.monotonic() < deadline and job.alive():
            await asyncio.sleep(0.05)
            self._reap()
        if job.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            self._reap()
        for pid in session_members(job.pid):  # strays of a wrapper killed before it swept them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        exit_file = job.directory / "exit.json"
        if not exit_file.exists():  # killed before its wrapper could say so
            exit_file.write_text(json.dumps({"status": None, "reason": "ended by the gateway"}))

    async def _state(self, job_id: str) -> JobStatus:
        job = self._job(job_id)
        if job is None:
            return JobStatus(JobState.ended, "no such local job")
        exit_file = job.directory / "exit.json"
        if exit_file.exists():
            ended = json.loads(exit_file.read_text())
            return JobStatus(JobState.ended, f"{ended['reason']} (exit status {ended['status']})")
        if not job.alive():
            return JobStatus(JobState.ended, "the job's process is gone")
        started = job.directory / "started.json"
        if not started.exists():
            return JobStatus(JobState.queued, "waiting", estimated_start=job.submitted + job.queue_delay)
        spec = json.loads((job.directory / "job.json").read_text())
        began = float(json.loads(started.read_text())["started"])
        if time.time() > began + float(spec["walltime_seconds"]) + self.end_grace + 5:
            await self.end(job_id)  # the wrapper enforces the walltime; this is its backstop
            return JobStatus(JobState.ended, "walltime exceeded")
        return JobStatus(JobState.running, f"pid {job.pid}")

    def _directory(self, job_id: str) -> Path:
        if not job_id.startswith(_JOB_ID_PREFIX) or not job_id[len(_JOB_ID_PREFIX) :].isalnum():
            raise SchedulerError(f"{job_id!r} is not a local job id", retryable=False)
        return self.state_dir / "jobs" / job_id

    def _job(self, job_id: str) -> _Job | None:
        directory = self._directory(job_id)
        try:
            spec = json.loads((directory / "job.json").read_text())
            started = json.loads((directory / "pid.json").read_text())
        except (OSError, ValueError):
            return None
        return _Job(
            directory,
            int(started["pid"]),
            started["start_time"],
            float(spec["submitted"]),
            float(spec["queue_delay_seconds"]),
        )

    def _reap(self) -> None:
        for job_id, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[job_id]

    async def shutdown(self) -> None:
        """Jobs outlive the gateway (a restarted one adopts them); only the handles are dropped."""
        self._reap()
