"""What the benchmark's Globus Compute section counts besides time: the fake service's calls (which it
prints when asked) and the gateway's status calls (from its metrics)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from typing import Final

from bench.common import Service

STATUS_CALL_METRIC: Final = "gateway_compute_poll_duration_seconds"


def fake_calls(fake: Service) -> dict[str, int]:
    """The fake's count of submits, status polls and token grants, which it prints when stopped."""
    fake.stop()
    for line in reversed(fake.log.read_text(errors="replace").splitlines()):
        if line.startswith('{"counts"'):
            calls: dict[str, int] = json.loads(line)["counts"]
            return calls
    raise RuntimeError(f"the {fake.name} did not report its calls:\n{fake.log_tail()}")


def calls_so_far(fake: Service) -> dict[str, int]:
    """The fake's counts until now (it prints them on SIGUSR1)."""
    seen = fake.log.read_text(errors="replace").count('{"counts_so_far"')
    os.kill(fake.process.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [
            line
            for line in fake.log.read_text(errors="replace").splitlines()
            if line.startswith('{"counts_so_far"')
        ]
        if len(lines) > seen:
            counts: dict[str, int] = json.loads(lines[-1])["counts_so_far"]
            return counts
        time.sleep(0.02)
    raise RuntimeError(f"the {fake.name} did not report its calls:\n{fake.log_tail()}")


def status_call_seconds(url: str) -> tuple[float, float]:
    """The gateway's count of status calls and the seconds they took, from its metrics."""
    metrics = url.split("/resource_server/", 1)[0] + "/metrics"
    with urllib.request.urlopen(metrics, timeout=10) as response:
        text = response.read().decode()
    found = dict.fromkeys(("count", "sum"), 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for kind in found:
            if name == f"{STATUS_CALL_METRIC}_{kind}":
                found[kind] = float(value)
    return found["count"], found["sum"]
