"""The wrapper the local scheduler runs as each job: `python local_job.py JOB_DIR`.

Standard library only, run by file path, so it needs nothing importable. It is the leader of the
job's session and process group: it waits out the simulated queue delay, runs the job's command
with its environment and log file, and writes `exit.json` when the job ends, whether it finished,
failed, was ended (SIGTERM to the group) or ran past its walltime, which it enforces itself as a
batch system would. A wrapper killed outright writes nothing; the scheduler then reads the job as
ended from the missing process.
"""

from __future__ import annotations

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
        status = child.wait(grace)
    except subprocess.TimeoutExpired:
        _write(job_dir / "exit.json", {"status": -signal.SIGKILL, "reason": reason})
        os.killpg(os.getpgid(0), signal.SIGKILL)
        return 1
    _write(job_dir / "exit.json", {"status": status, "reason": reason})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
