"""What the alternating comparisons (the auth and observability sections) share: one gateway at a time
on CPU 1 against the backend on CPU 0, started afresh for each run in turn (A, B, A, B, ...), the same
measure for every run, and the best run of each side compared.
"""

from __future__ import annotations

import statistics
from typing import Any, Final

from bench.common import TOKEN, chat_body, loadgen, other_cpu_use, process_cpu_seconds

GATEWAY_PATH: Final = "/resource_server/local/vllm/v1/chat/completions"
SERIAL_WARM_REQUESTS: Final = 5
"""Requests sent one by one before measuring: the first makes the globus gateway introspect the token
and cache the user, so the measures see only the warm path."""


def warmup_requests(level: int) -> int:
    return max(100, level * 20)


def measure_chat(
    url: str, level: int, seconds: float, ours: list[int], gateway: int | None = None
) -> dict[str, Any]:
    """The same body, warm-up and duration for every gateway compared, as in the non-streaming measures;
    with the share of CPUs 0-1 that processes other than `ours` took meanwhile and, given the
    `gateway` pid, its CPU time per request (warm-up included): unlike requests/s, that hardly moves
    when the machine is busy elsewhere."""
    options = ["--duration", str(seconds), "--concurrency", str(level)]
    options += ["--warmup", str(warmup_requests(level))]
    spent = process_cpu_seconds(gateway) if gateway else 0.0
    with other_cpu_use(ours) as disturbance:
        summary = loadgen(url, chat_body(), *options, token=TOKEN, limit=seconds + 90)
    if gateway and summary["requests"]:
        used = process_cpu_seconds(gateway) - spent
        summary["gateway_cpu_us_per_request"] = round(
            used * 1e6 / (summary["requests"] + warmup_requests(level)), 1
        )
    return summary | disturbance


def best_of(runs: list[dict[str, Any]], side: str, level: str, key: str) -> dict[str, Any]:
    """The run with the most requests/s, since noise (other processes, CPU frequency) only slows a run."""
    measured = [run["by_concurrency"][level] for run in runs if run[key] == side]
    best = dict(max(measured, key=lambda summary: float(summary["rps"])))
    rps = [summary["rps"] for summary in measured]
    return best | {"rps_runs": rps, "rps_median": statistics.median(rps)}


def run_failures(section: str, results: dict[str, Any], key: str) -> list[str]:
    """Measures of a section's runs that had errors, named by section, side (`key`), round and level."""
    return [
        f"{section} {run[key]} {run['round']} c={level}: {summary['status_counts']}"
        for run in results.get("runs", [])
        for level, summary in run["by_concurrency"].items()
        if summary.get("errors")
    ]


def run_disturbances(section: str, results: dict[str, Any], key: str, threshold: float) -> list[str]:
    """Measures of a section's runs that other processes disturbed by more than `threshold` of CPUs 0-1."""
    return [
        f"{section} {run[key]} {run['round']} c={level}: {summary['other_cpu_share']:.0%}"
        for run in results.get("runs", [])
        for level, summary in run["by_concurrency"].items()
        if summary["other_cpu_share"] > threshold
    ]
