"""The on-demand section's report (bench/on_demand.py): its targets judged, its rows of the table
and its warnings."""

from __future__ import annotations

from typing import Any, Final

from bench.common import Check, show, table_row

CONCURRENCIES: Final = (1, 16)
STREAMS: Final = 16
TARGET_MS: Final = 1.0
TARGET_RATIO: Final = 10.0


def on_demand_checks(results: dict[str, Any]) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    for level in map(str, CONCURRENCIES):
        entry = (results.get("by_kind") or {}).get(level) or {}
        checks[f"on_demand_c{level}_added_p50_ms"] = (
            entry.get("on_demand_over_direct_ms"),
            f"≤ {TARGET_MS:g} ms at p50 over the direct path",
            lambda v: v <= TARGET_MS,
        )
        checks[f"on_demand_c{level}_compute_ratio"] = (
            entry.get("compute_to_on_demand_ratio"),
            f"Compute adds ≥ {TARGET_RATIO:g}x what on demand adds over the backend",
            lambda v: v >= TARGET_RATIO,
        )
    return checks


def on_demand_rows(results: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    """The direct path under Direct and the on-demand path under Gateway; the backend alone and the
    Compute path in rows of their own."""
    rows = []
    for kind, entry in results["by_kind"].items():
        paths = entry["paths"]
        what = (
            f"on demand, {STREAMS} paced streams, first chunk" if kind == "stream" else f"on demand c={kind}"
        )
        for rank in ("p50", "p99"):
            check = judged.get(f"on_demand_c{kind}_added_p50_ms") if rank == "p50" else None
            added = show(entry["on_demand_over_direct_ms"], " ms") if rank == "p50" else ""
            direct, on_demand = paths["direct"][f"{rank}_ms"], paths["on_demand"][f"{rank}_ms"]
            rows.append(
                table_row(f"{what}: {rank}, direct → on demand", direct, on_demand, added, " ms", check)
            )
        backend, compute = paths["backend"]["p50_ms"], paths["compute"]["p50_ms"]
        over = show(entry["on_demand_over_backend_ms"], " ms") + " on demand, "
        over += show(entry["compute_over_backend_ms"], " ms") + " Compute"
        direct, on_demand = paths["direct"], paths["on_demand"]
        cpu = (direct["gateway_cpu_us_per_request"], on_demand["gateway_cpu_us_per_request"])
        pilot = f"pilot {show(on_demand['pilot_cpu_us_per_request'], ' µs')}"
        rows.append(table_row(f"{what}: gateway CPU per request, direct → on demand", *cpu, pilot, " µs"))
        busy = (_busy(direct), _busy(on_demand))
        others = f"other processes {direct['other_cpu_share']:.0%} / {on_demand['other_cpu_share']:.0%}"
        rows.append(table_row(f"{what}: CPU 0 / CPU 1 busy, direct → on demand", *busy, others, ""))
        ratio = entry["compute_to_on_demand_ratio"]
        check = judged.get(f"on_demand_c{kind}_compute_ratio")
        rows.append(
            table_row(
                f"{what}: p50, backend alone → Compute (added: {over})",
                backend,
                compute,
                show(ratio, "x"),
                " ms",
                check,
            )
        )
    return rows


def on_demand_failures(results: dict[str, Any]) -> list[str]:
    return [
        f"on demand {run['path']} {run['round']} {run['kind']}: {run['status_counts']}"
        for run in results.get("runs", [])
        if run.get("errors")
    ]


def on_demand_disturbances(results: dict[str, Any], threshold: float) -> list[str]:
    return [
        f"on demand {run['path']} {run['round']} {run['kind']}: {run['other_cpu_share']:.0%}"
        for run in results.get("runs", [])
        if run.get("other_cpu_share", 0) > threshold
    ]


def _busy(side: dict[str, Any]) -> str:
    return f"{side['cpu0_busy_share']:.0%} / {side['cpu1_busy_share']:.0%}"
