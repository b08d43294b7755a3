"""The fake batch system's memory: a directory (``FAKE_BATCH_DIR``) holding one JSON file per job,
a counter for job ids, and ``control.json``, which a test may change at any moment.

Every fake command is a short-lived process, like the real ones, so the state lives on disk and
every change is made under an exclusive lock. Jobs move on their own: a queued job starts once it
has waited ``queue_seconds``; with ``run_scripts`` a runner process (runner.py) runs the job's
script for real and records its end, otherwise a started job runs until it is deleted, its walltime
passes, or a test ends it (``FakeBatch.finish``).

Standard library only: the commands run under whichever Python 3 is first on ``PATH``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DIRECTORY_VARIABLE = "FAKE_BATCH_DIR"
QUEUED, RUNNING, DONE = "queued", "running", "done"
DEFAULT_CONTROL: dict[str, Any] = {
    "server": "fake-pbs-01.hsn.cm.example.org",
    "queues": ["workq", "debug", "prod"],
    "default_queue": "workq",
    "partitions": ["compute", "debug"],
    "default_partition": "compute",
    "accounts": None,
    "queue_seconds": 0.0,
    "run_scripts": False,
    "delay_seconds": {},
    "history_seconds": 3600.0,
    "estimated_start_in": None,
    "accounting": True,
    "kill_delay_seconds": 10.0,
}
"""``accounts``: those with an allocation (None: any); ``delay_seconds``: per command name, how long
it hangs before answering; ``history_seconds``: how long a finished job is still listed;
``estimated_start_in``: seconds after submission at which a queued job is expected to start (None:
no estimate); ``accounting``: whether sacct has a database to ask; ``kill_delay_seconds``: how long a deleted
running job has between SIGTERM and SIGKILL."""


class FakeBatch:
    """The job table in ``directory``, for the fake commands and for tests."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        (self.directory / "jobs").mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_environment(cls) -> FakeBatch:
        directory = os.environ.get(DIRECTORY_VARIABLE)
        if not directory:
            sys.stderr.write(f"fake batch system: {DIRECTORY_VARIABLE} is not set\n")
            sys.exit(2)
        return cls(directory)

    # -- control ---------------------------------------------------------------------------------

    def control(self) -> dict[str, Any]:
        try:
            given = json.loads((self.directory / "control.json").read_text())
        except FileNotFoundError:
            given = {}
        return {**DEFAULT_CONTROL, **given}

    def configure(self, **changes: Any) -> None:
        with self.locked():
            current = self.control()
            current.update(changes)
            _write_json(self.directory / "control.json", current)

    def hang_if_asked(self, command: str) -> None:
        delay = float(self.control()["delay_seconds"].get(command, 0))
        if delay > 0:
            time.sleep(delay)

    # -- jobs ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.directory / "lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, job: dict[str, Any], script: str, named: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Gives the job the next number and stores it, queued, with a copy of its script (the
        real systems copy it at submission: a later change of the file does not reach the job);
        `named` gives the fields that depend on the number (its id, its variables)."""
        with self.locked():
            counter = self.directory / "counter"
            number = int(counter.read_text()) + 1 if counter.exists() else 1000
            counter.write_text(str(number))
            copy = self.directory / "scripts" / f"{number}.sh"
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(script)
            job = {**job, **named(number), "number": number, "state": QUEUED, "submitted": time.time()}
            job["script"] = str(copy)
            job.update(started=None, ended=None, exit_status=None, pid=None, ended_by=None, deleted=False)
            self.store_unlocked(job)
        if self.control()["run_scripts"]:
            subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("runner.py")),
                    str(self.directory),
                    str(number),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        return job

    def job(self, number: int) -> dict[str, Any] | None:
        """The job as it is now (moved on by the clock first), None once its history is gone."""
        with self.locked():
            job = self.load_unlocked(number)
            if job is None:
                return None
            self._advance(job)
            return job

    def jobs(self) -> list[dict[str, Any]]:
        numbers = sorted(int(path.stem) for path in (self.directory / "jobs").glob("*.json"))
        return [job for job in map(self.job, numbers) if job is not None]

    def update(self, number: int, **changes: Any) -> dict[str, Any] | None:
        with self.locked():
            job = self.load_unlocked(number)
            if job is None:
                return None
            job.update(changes)
            self.store_unlocked(job)
            return job

    def start(self, number: int) -> None:
        self.update(number, state=RUNNING, started=time.time())

    def finish(self, number: int, exit_status: int = 0, ended_by: str | None = None) -> None:
        """Ends a job as its script would: `ended_by` "walltime", "node_fail" or None (it exited)."""
        self.update(number, state=DONE, ended=time.time(), exit_status=exit_status, ended_by=ended_by)

    def forget(self, number: int) -> None:
        """The server drops the job's history: from now on it is an unknown job."""
        with self.locked():
            (self.directory / "jobs" / f"{number}.json").unlink(missing_ok=True)

    def cancel(self, number: int, exit_status: int) -> str | None:
        """Deletes a job; returns the state it was in, None for an unknown job. A queued job ends at
        once; a running one whose script a runner runs is marked deleted and ends when the script
        does (the runner signals it, and records how it exited); one without a runner ends at once
        with `exit_status`."""
        with self.locked():
            job = self.load_unlocked(number)
            if job is None:
                return None
            self._advance(job)
            before = str(job["state"])
            if before == RUNNING and job["pid"]:
                job.update(ended_by="cancelled", deleted=True)
            elif before != DONE:
                job.update(state=DONE, ended=time.time(), ended_by="cancelled")
                job["exit_status"] = exit_status if before == RUNNING else None
            self.store_unlocked(job)
            return before

    def _advance(self, job: dict[str, Any]) -> None:
        """Without a runner, the clock moves the job: queued -> running -> done at its walltime."""
        control, now = self.control(), time.time()
        if control["run_scripts"] or job.get("pid"):
            return
        if job["state"] == QUEUED and now >= job["submitted"] + float(control["queue_seconds"]):
            job.update(state=RUNNING, started=now)
            self.store_unlocked(job)
        if job["state"] == RUNNING and now >= job["started"] + int(job.get("walltime_seconds") or 10**9):
            job.update(state=DONE, ended=now, exit_status=-29, ended_by="walltime")
            self.store_unlocked(job)

    def load_unlocked(self, number: int) -> dict[str, Any] | None:
        path = self.directory / "jobs" / f"{number}.json"
        try:
            job: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        ended = job.get("ended")
        if ended is not None and time.time() > ended + float(self.control()["history_seconds"]):
            path.unlink(missing_ok=True)
            return None
        return job

    def store_unlocked(self, job: dict[str, Any]) -> None:
        _write_json(self.directory / "jobs" / f"{job['number']}.json", job)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document))
    os.replace(temporary, path)


def walltime_seconds(text: str) -> int | None:
    """[[HH:]MM:]SS, as PBS's walltime and Slurm's --time (minutes alone for Slurm is the caller's)."""
    try:
        parts = [int(part) for part in text.split(":")]
    except ValueError:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds


def script_directives(script: str, prefix: str) -> list[str]:
    """The directive lines at the top of a script: read until the first command, as qsub and
    sbatch do (blank lines and other comments do not stop them)."""
    found: list[str] = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith(prefix):
            found.append(stripped[len(prefix) :].strip())
        elif stripped and not stripped.startswith("#"):
            break
    return found
