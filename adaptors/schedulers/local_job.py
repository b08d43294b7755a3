"""The wrapper the local scheduler runs as each job: `python local_job.py JOB_DIR`.

Standard library only, run by file path, so it needs nothing importable. It is the leader of the
job's session and process group: it waits out the simulated queue delay, runs the job's command
with its environment and log file, and writes `exit.json` when the job ends, whether it finished,
failed, was ended (SIGTERM to the group) or ran past its walltime, which it enforces itself as a
batch system would. A wrapper killed outright writes nothing; the scheduler then reads the job as
ended from the missing process.

When the job ends, so does every process left in its session, as a batch system's cgroup ends a
job's strays: a pilot killed outright leaves its model servers (in process groups of their own)
behind, and on a compute node they would hold the GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

_terminated = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminated
    _terminated = True


def _write(path: Path, document: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document))
    partial.replace(path)


def session_members(session: int) -> list[int]:
    """The processes of `session` but the caller, from /proc (the job's strays: Linux only)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended meanwhile
        pid = int(stat.parent.name)
        if int(fields[3]) == session and pid != os.getpid():
            members.append(pid)
    return members


def end_session(session: int, grace: float) -> None:
    """SIGTERM to the session's processes, SIGKILL to those still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = session_members(session)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while members and time.time() < deadline:
            time.sleep(0.05)
            members = session_members(session)
        if not members:
            return


def main(job_dir: Path) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    spec = json.loads((job_dir / "job.json").read_text())
    deadline = time.time() + float(spec["queue_delay_seconds"])
    while time.time() < deadline and not _terminated:
        time.sleep(min(0.05, max(deadline - time.time(), 0)))
    if _terminated:
        _write(job_dir / "exit.json", {"status": None, "reason": "ended while queued"})
        return 0
    with open(job_dir / "output.log", "ab") as log:
        child = subprocess.Popen(
            spec["command"],
            env=spec["environment"],
            cwd=spec["working_directory"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _write(job_dir / "started.json", {"started": time.time(), "pid": child.pid})
    walltime_end = time.time() + float(spec["walltime_seconds"])
    grace = float(spec["end_grace_seconds"])
    reason = "finished"
    while child.poll() is None:
        if _terminated:
            reason = "ended"
            break
        if time.time() >= walltime_end:
            reason = "walltime exceeded"
            os.killpg(os.getpgid(0), signal.SIGTERM)
            break
        time.sleep(0.05)
    if reason == "finished" and _terminated:
        reason = "ended"  # the SIGTERM to the group ended the command before the loop saw it
    try:
        status: int | None = child.wait(grace)
    except subprocess.TimeoutExpired:
        status = -signal.SIGKILL
    end_session(os.getsid(0), grace)
    _write(job_dir / "exit.json", {"status": status, "reason": reason})
    return 0 if status != -signal.SIGKILL else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
