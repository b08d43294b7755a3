"""The report of a run: each target judged, the markdown table with the targets beside the figures
(ready to paste into docs/performance.md), warnings about measures that cannot be trusted, and every
figure written as JSON. Each section brings its own checks, rows, failures and disturbances."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

from bench.auth import auth_checks, auth_disturbances, auth_failures, auth_rows
from bench.compute_report import compute_checks, compute_disturbances, compute_failures, compute_rows
from bench.deployment import deployment_checks, deployment_failures, deployment_rows
from bench.federation import federation_checks, federation_failures, federation_rows
from bench.observability import (
    missing_records,
    observability_checks,
    observability_disturbances,
    observability_failures,
    observability_rows,
)
from bench.on_demand_report import (
    on_demand_checks,
    on_demand_disturbances,
    on_demand_failures,
    on_demand_rows,
)
from bench.openai_batches import batch_checks, batch_failures, batch_rows
from bench.overhead import overhead_checks, overhead_failures, overhead_rows

OTHER_CPU_WARNING: Final = 0.05
"""Beyond this share of CPUs 0 and 1 taken by other processes, a measure may be off by more than the
5% the auth comparison judges."""


def machine() -> dict[str, Any]:
    """Which interpreter ran is part of the machine: on the AMD VM the same code took a tenth to a sixth
    less CPU time per request under Debian's python3.11 (an optimized build) than under this
    machine's pyenv build of 3.11.7 (docs/performance.md, 2026-12-05 06:37-07:40)."""
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False)
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "uname": uname.stdout.strip(),
        "cpu_model": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_executable": os.path.realpath(sys.executable),
        "python_build": " ".join(platform.python_build()),
    }


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its figure; a target without a gateway figure stays unjudged (None)."""
    checks = {
        **overhead_checks(results),
        **auth_checks(results.get("auth") or {}),
        **observability_checks(results.get("observability") or {}),
        **compute_checks(results.get("compute") or {}),
        **federation_checks(results.get("federation") or {}),
        **batch_checks(results.get("batches") or {}),
        **deployment_checks(results.get("deployment") or {}),
        **on_demand_checks(results.get("on_demand") or {}),
    }
    return {
        key: {"figure": figure, "target": target, "met": None if figure is None else passes(figure)}
        for key, (figure, target, passes) in checks.items()
    }


def markdown(results: dict[str, Any]) -> str:
    """The figures with the targets beside them, ready to paste into docs/performance.md."""
    judged = results["targets"]
    lines = [
        "| Measure | Direct | Gateway | Gateway vs direct | Target | Met |",
        "|---|---|---|---|---|---|",
        *overhead_rows(results, judged),
    ]
    for section, rows in (
        ("auth", auth_rows),
        ("observability", observability_rows),
        ("federation", federation_rows),
        ("batches", batch_rows),
        ("deployment", deployment_rows),
        ("on_demand", on_demand_rows),
        ("compute", compute_rows),
    ):
        if results.get(section):
            lines.extend(rows(results[section], judged))
    return "\n".join(lines)


def failed_runs(results: dict[str, Any]) -> list[str]:
    """Measurements with errors, since their figures would be misleading if read alone."""
    return (
        overhead_failures(results)
        + auth_failures(results.get("auth") or {})
        + observability_failures(results.get("observability") or {})
        + compute_failures(results.get("compute") or {})
        + federation_failures(results.get("federation") or {})
        + batch_failures(results.get("batches") or {})
        + deployment_failures(results.get("deployment") or {})
        + on_demand_failures(results.get("on_demand") or {})
    )


def disturbed_runs(results: dict[str, Any]) -> list[str]:
    """Auth, observability and compute measures that other processes disturbed enough to blur a 5%
    difference."""
    return (
        auth_disturbances(results.get("auth") or {}, OTHER_CPU_WARNING)
        + observability_disturbances(results.get("observability") or {}, OTHER_CPU_WARNING)
        + compute_disturbances(results.get("compute") or {}, OTHER_CPU_WARNING)
        + on_demand_disturbances(results.get("on_demand") or {}, OTHER_CPU_WARNING)
    )


def report(results: dict[str, Any], output: Path) -> None:
    """Print the table and the warnings; write every figure to `output`."""
    print(markdown(results))
    for problem in failed_runs(results):
        print(f"\nwarning: errors in {problem}")
    for problem in missing_records(results.get("observability") or {}):
        print(f"\nwarning: request records do not match the requests in {problem}")
    disturbed = disturbed_runs(results)
    if disturbed:
        print(f"\nwarning: other processes took this share of CPUs 0-1 during {'; '.join(disturbed)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nall figures: {output}")
