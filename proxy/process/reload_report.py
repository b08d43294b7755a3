"""How `inference-gateway reload` learns what a running gateway did with its SIGHUP.

Each process that handles the signal appends one JSON line to a file next to `server.pid_file`
(`<pid_file>.reloads`): the supervisor says whether the files were valid and how many workers it
asked; each worker, or the single process, says whether it reloaded and, if not, why. The command
reads the lines appended after it signalled, so it can exit non-zero with the gateway's own reason
(an adaptor that failed to start, say) instead of "see the log".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WAIT_SECONDS = 30.0
"""Adaptors start before a reload is accepted; a slow backend may take a few seconds."""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


def report_path(pid_file: Path) -> Path:
    return pid_file.with_name(f"{pid_file.name}.reloads")


def record_outcome(report: Path, outcome: Outcome, workers: int | None = None) -> None:
    """One short line with O_APPEND: lines of several workers never interleave."""
    line = {"pid": os.getpid(), "ok": outcome.ok, "message": outcome.message, "workers": workers}
    descriptor = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(descriptor, (json.dumps(line) + "\n").encode())
    finally:
        os.close(descriptor)


def request_reload(pid_file: Path, wait_seconds: float = WAIT_SECONDS) -> int:
    """Signal the gateway and wait for every process's answer. Exit status: 0 reloaded everywhere,
    1 refused, no gateway, or no answer in time."""
    report = report_path(pid_file)
    try:
        pid = int(pid_file.read_text().strip())
        start = report.stat().st_size if report.exists() else 0
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"{pid_file}: no running gateway to reload ({exc})", file=sys.stderr)
        return 1
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        verdict = _verdict(_lines_after(report, start), pid)
        if verdict is not None:
            print(verdict.message, file=sys.stdout if verdict.ok else sys.stderr)
            return 0 if verdict.ok else 1
        time.sleep(0.05)
    print(
        f"the gateway (pid {pid}) did not answer within {wait_seconds:g} s; its log says whether it reloaded",
        file=sys.stderr,
    )
    return 1


def _lines_after(report: Path, start: int) -> list[dict[str, Any]]:
    try:
        with report.open("rb") as file:
            file.seek(start)
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            document = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(document, dict):
            lines.append(document)
    return lines


def _verdict(lines: list[dict[str, Any]], pid: int) -> Outcome | None:
    """None while answers are missing. The signalled process answers first; a supervisor's answer
    names its workers, whose answers follow."""
    first = next((index for index, line in enumerate(lines) if line.get("pid") == pid), None)
    if first is None:
        return None
    answer = lines[first]
    workers = answer.get("workers")
    if not answer.get("ok") or not isinstance(workers, int):
        return Outcome(bool(answer.get("ok")), str(answer.get("message")))
    replies = [line for line in lines[first + 1 :] if line.get("pid") != pid][:workers]
    if len(replies) < workers:
        return None
    refused = [f"worker {line.get('pid')}: {line.get('message')}" for line in replies if not line.get("ok")]
    if refused:
        return Outcome(False, "\n".join(refused))
    return Outcome(True, f"{replies[0].get('message')} (in {workers} workers)")
