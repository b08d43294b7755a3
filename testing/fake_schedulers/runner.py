"""Runs one fake job's script for real, in the background, as a batch system's execution host
would: after the job's time in the queue, with the job's output file, environment variables
naming the job, and its walltime enforced; records the start, the end and the exit status.

    python runner.py FAKE_BATCH_DIR JOB_NUMBER
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from testing.fake_schedulers.table import DONE, QUEUED, RUNNING, FakeBatch

POLL_SECONDS = 0.05
SIGNAL_EXIT_BASE = 256
"""PBS reports a job killed by signal N as Exit_status 256 + N."""


def main(directory: str, number: int) -> int:
    batch = FakeBatch(directory)
    job = batch.job(number)
    while job is not None and job["state"] == QUEUED:
        if time.time() >= job["submitted"] + float(batch.control()["queue_seconds"]):
            break
        time.sleep(POLL_SECONDS)
        job = batch.job(number)
    if job is None or job["state"] != QUEUED:
        return 0
    environment = {**os.environ, **{key: str(value) for key, value in job["variables"].items()}}
    output = open(job["output"], "ab")  # noqa: SIM115 (the child writes to it until it ends)
    process = subprocess.Popen(
        ["/bin/bash", job["script"]],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=os.environ.get("HOME", "/"),
        env=environment,
        start_new_session=True,
    )
    output.close()
    with batch.locked():
        current = batch.load_unlocked(number)
        cancelled = current is None or current["state"] == DONE
        if not cancelled and current is not None:
            current.update(state=RUNNING, started=time.time(), pid=process.pid)
            batch.store_unlocked(current)
    if cancelled:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 0
    returncode, ended_by = _wait(batch, number, process, float(job.get("walltime_seconds") or 10**8))
    status = SIGNAL_EXIT_BASE - returncode if returncode < 0 else returncode
    with batch.locked():
        current = batch.load_unlocked(number)
        if current is not None and current["state"] == RUNNING:
            exit_status = -29 if ended_by == "walltime" else status
            ended_by = "cancelled" if current["deleted"] else ended_by
            current.update(state=DONE, ended=time.time(), exit_status=exit_status, ended_by=ended_by)
            batch.store_unlocked(current)
    return 0


def _wait(
    batch: FakeBatch, number: int, process: subprocess.Popen[bytes], walltime: float
) -> tuple[int, str | None]:
    """Waits for the script; a deleted job or one past its walltime gets SIGTERM, then SIGKILL
    `kill_delay_seconds` later (PBS's kill_delay, Slurm's KillWait), as the execution host does."""
    started, ended_by, terminated = time.monotonic(), None, None
    while process.poll() is None:
        now = time.monotonic()
        if terminated is None:
            job = batch.job(number)
            gone = job is None or job["state"] == DONE or bool(job["deleted"])
            if gone or now - started > walltime:
                ended_by = None if gone else "walltime"
                _signal(process, signal.SIGTERM)
                terminated = now
        elif now - terminated > float(batch.control()["kill_delay_seconds"]):
            _signal(process, signal.SIGKILL)
        time.sleep(POLL_SECONDS)
    return process.returncode, ended_by


def _signal(process: subprocess.Popen[bytes], number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, number)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
