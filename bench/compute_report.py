"""The benchmark's Globus Compute section in the report: its targets (issue 20), its rows, and the
measures whose errors or disturbance make their figures unreliable. The measures are bench/compute.py's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from bench.common import Check, difference, show, table_row
from bench.compute import RELAY_STREAMS

ADDED_P50_TARGETS_MS: Final = {"1": 10.0, "100": 15.0, "1000": 40.0}
"""Issue 20's bound on the p50 the gateway adds over the baseline, per concurrency."""
CPU_TARGET_MS: Final = 0.3
"""Issue 20's bound on the gateway's CPU time per Compute request, judged at `JUDGED_CONCURRENCY`."""
JUDGED_CONCURRENCY: Final = 100
RELAY_TARGET_MS: Final = 1.0
"""Issue 20's bound on what the relay adds to a paced chunk's p99 over the minimal relay."""
CPU_PER_REQUEST: Final = f"compute_c{JUDGED_CONCURRENCY}_cpu_ms_per_request"
RELAY_P99: Final = f"relay{RELAY_STREAMS}_paced_added_p99_ms"


def at_most(bound: float) -> Callable[[float], bool]:
    return lambda value: value <= bound


def added_p50_check(level: str, prefix: str = "") -> str:
    return f"compute_c{level}_{prefix}added_p50_ms"


def compute_checks(compute: dict[str, Any]) -> dict[str, Check]:
    """The section's targets: the added p50 at each concurrency (p99 is shown beside it), the
    gateway's CPU time per request, and what the relay adds to a paced chunk's p99 over the floor."""
    levels = compute.get("by_concurrency") or {}
    paced = (compute.get("relay") or {}).get("paced") or {}
    judged = judged_figures(levels.get(str(JUDGED_CONCURRENCY)) or {})
    checks: dict[str, Check] = {
        added_p50_check(level): (
            judged_figures(levels.get(level) or {}).get("added_p50_ms"),
            f"at most {bound:g} ms added per request at {level} concurrent requests",
            at_most(bound),
        )
        for level, bound in ADDED_P50_TARGETS_MS.items()
    }
    checks |= {
        added_p50_check(level, "push_"): (
            pair["push_added_p50_ms"],
            f"pushed: at most {ADDED_P50_TARGETS_MS[level]:g} ms added at {level} concurrent requests",
            at_most(ADDED_P50_TARGETS_MS[level]),
        )
        for level, pair in levels.items()
        if level in ADDED_P50_TARGETS_MS and pair.get("push_added_p50_ms") is not None
    }
    checks[CPU_PER_REQUEST] = (
        judged.get("cpu_ms_per_request"),
        f"at most {CPU_TARGET_MS:g} ms of gateway CPU per request",
        at_most(CPU_TARGET_MS),
    )
    checks[RELAY_P99] = (
        paced.get("added_p99_ms"),
        f"relay adds at most {RELAY_TARGET_MS:g} ms per chunk at p99 over the floor",
        at_most(RELAY_TARGET_MS),
    )
    return checks


def judged_figures(pair: dict[str, Any]) -> dict[str, Any]:
    """The default gateway's added p50 and CPU time per request: the medians over the paired rounds
    where the level has them (bench/compute.py, `PAIRED_LEVELS`), else its one measure."""
    if "paired" in pair:
        return dict(pair["paired"])
    gateway = pair.get("gateway") or {}
    return {"added_p50_ms": pair.get("added_p50_ms"), "cpu_ms_per_request": gateway.get("cpu_ms_per_request")}


def compute_rows(compute: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    """The compute path under the table's other rows: the baseline client (or the relay floor) in
    Direct, the gateway in Gateway."""
    rows = []
    for level, pair in compute["by_concurrency"].items():
        rows.extend(level_rows(level, pair, judged))
    for kind, pair in compute["relay"].items():
        rows.extend(relay_rows(kind, pair, judged))
    return rows


def level_rows(level: str, pair: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    rows = side_rows(level, pair, judged, "gateway", "")
    if "paired" in pair:
        rows.extend(paired_rows(level, pair["paired"], judged))
    for side in ("push", "polled"):
        if side in pair:
            rows.extend(side_rows(level, pair, judged, side, f"{side}_"))
    return rows


def side_rows(level: str, pair: dict[str, Any], judged: dict[str, Any], side: str, key: str) -> list[str]:
    """The baseline in Direct; in Gateway the gateway as deployed (results from the queue), the one
    whose function pushes its answers through the relay (`push`), or the one without the queue
    (`polled`)."""
    direct, gateway = pair["direct"], pair.get(side) or {}
    judged_elsewhere = not key and "paired" in pair  # then its checks are on the paired medians' rows
    prefix = f"compute c={level}" + {"push": ", pushed", "polled": ", polled only"}.get(side, "")
    ratio = pair.get(f"{key}rps_ratio")
    share = show(ratio * 100, "% of direct") if ratio is not None else "—"
    rows = [table_row(f"{prefix}: requests/s", direct["rps"], gateway.get("rps"), share, "")]
    for rank in ("p50", "p99"):
        check = judged.get(added_p50_check(level, key)) if rank == "p50" and not judged_elsewhere else None
        added = show(pair.get(f"{key}added_{rank}_ms"), " ms")
        rows.append(
            table_row(
                f"{prefix}: {rank}", direct[f"{rank}_ms"], gateway.get(f"{rank}_ms"), added, " ms", check
            )
        )
    added_cpu = show(pair.get(f"{key}added_cpu_ms_per_request"), " ms")
    cpu = (direct["cpu_ms_per_request"], gateway.get("cpu_ms_per_request"))
    judged_cpu = level == str(JUDGED_CONCURRENCY) and not key and not judged_elsewhere
    cpu_check = judged.get(CPU_PER_REQUEST) if judged_cpu else None
    rows.append(table_row(f"{prefix}: CPU 1 time per request", *cpu, added_cpu, " ms", cpu_check))
    cycle = direct.get("poll_cycle_ms")
    calls = (round(1000 / cycle, 1) if cycle else None, gateway.get("status_calls_per_s"))
    rows.append(table_row(f"{prefix}: status calls/s", *calls, "", ""))
    durations = (cycle, gateway.get("status_call_ms"))
    rows.append(table_row(f"{prefix}: status call, mean (baseline: one poll cycle)", *durations, "", " ms"))
    rows.extend(cpu_rows(prefix, direct, gateway))
    if "front" in pair:
        rows.extend(front_rows(prefix, pair["front"], gateway, pair, key))
    return rows


def paired_rows(level: str, paired: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    """The judged medians, each pair's figure listed in the Target column's place."""
    prefix = f"compute c={level}, median of {paired['pairs']} pairs measured in turn"
    each = ", ".join(show(value, "") for value in paired["added_p50_ms_each"])
    cpu_each = ", ".join(show(value, "") for value in paired["cpu_ms_per_request_each"])
    client_cpu = ", ".join(show(value, "") for value in paired["direct_cpu_ms_per_request_each"])
    cpu_check = judged.get(CPU_PER_REQUEST) if level == str(JUDGED_CONCURRENCY) else None
    return [
        table_row(
            f"{prefix}: added p50 (each: {each})",
            None,
            None,
            show(paired["added_p50_ms"], " ms"),
            "",
            judged.get(added_p50_check(level)),
        ),
        table_row(
            f"{prefix}: gateway CPU 1 time per request (each: {cpu_each}; the client's: {client_cpu})",
            None,
            paired["cpu_ms_per_request"],
            "",
            " ms",
            cpu_check,
        ),
    ]


def front_rows(
    prefix: str, front: dict[str, Any], gateway: dict[str, Any], pair: dict[str, Any], key: str
) -> list[str]:
    """The same gateway against the baseline behind the least HTTP front (bench/compute_front.py), in
    Direct: the load generator then shares CPU 0 with the fake service in both measures."""
    added = show(pair.get(f"{key}added_over_front_p50_ms"), " ms")
    added_cpu = show(pair.get(f"{key}added_over_front_cpu_ms_per_request"), " ms")
    label = f"{prefix}, against the baseline behind an HTTP front"
    return [
        table_row(f"{label}: requests/s", front["rps"], gateway.get("rps"), "", ""),
        table_row(f"{label}: p50", front["p50_ms"], gateway.get("p50_ms"), added, " ms"),
        table_row(
            f"{label}: CPU 1 time per request",
            front["cpu_ms_per_request"],
            gateway.get("cpu_ms_per_request"),
            added_cpu,
            " ms",
        ),
        *cpu_rows(label, front, gateway),
    ]


def relay_rows(kind: str, pair: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    """Direct is the relay floor; receive minus send through the gateway is what its relay adds."""
    floor, gateway = pair["direct"], pair.get("gateway") or {}
    delay = floor["chunk_delay_s"]
    pace = f"{delay * 1000:g} ms apart" if delay else "back to back"
    prefix = f"relay, {kind}: {floor['streams']} streams of {floor['chunks_per_stream']} chunks {pace}"
    ratio = pair.get("chunks_per_s_ratio")
    share = show(ratio * 100, "% of floor") if ratio is not None else "—"
    rows = [table_row(f"{prefix}: chunks/s", floor["chunks_per_s"], gateway.get("chunks_per_s"), share, "")]
    for rank in ("p50", "p99"):
        check = judged.get(RELAY_P99) if (kind, rank) == ("paced", "p99") else None
        latencies = (floor[f"latency_{rank}_ms"], gateway.get(f"latency_{rank}_ms"))
        added = show(pair.get(f"added_{rank}_ms"), " ms vs floor")
        rows.append(table_row(f"{prefix}: latency per chunk {rank}", *latencies, added, " ms", check))
    cpu = (floor["cpu_ms_per_chunk"], gateway.get("cpu_ms_per_chunk"))
    added_cpu = show(difference(cpu[1], cpu[0]), " ms")
    rows.append(table_row(f"{prefix}: relay's CPU 1 time per chunk", *cpu, added_cpu, " ms"))
    rows.extend(cpu_rows(prefix, floor, gateway))
    return rows


def cpu_rows(prefix: str, direct: dict[str, Any], gateway: dict[str, Any]) -> list[str]:
    """Which CPU was the limit, and how much of the two other processes took."""

    def busy(side: dict[str, Any]) -> str:
        if "cpu0_busy_share" not in side:
            return "—"
        return f"{side['cpu0_busy_share']:.0%} / {side['cpu1_busy_share']:.0%}"

    def others(side: dict[str, Any]) -> str:
        return f"{side['other_cpu_share']:.0%}" if "other_cpu_share" in side else "—"

    return [
        table_row(f"{prefix}: CPU 0 / CPU 1 busy", busy(direct), busy(gateway), "—", ""),
        table_row(f"{prefix}: CPUs 0-1 taken by other processes", others(direct), others(gateway), "—", ""),
    ]


def compute_failures(compute: dict[str, Any]) -> list[str]:
    """Measures with errors or unfinished streams, whose figures would mislead if read alone."""
    found = [
        f"{name}: {summary['status_counts']}"
        for name, summary in level_measures(compute).items()
        if summary.get("errors")
    ]
    for kind, pair in (compute.get("relay") or {}).items():
        for side in ("direct", "gateway"):
            relayed = pair.get(side) or {}
            if relayed.get("errors") or relayed.get("short_streams"):
                found.append(
                    f"relay {kind} {side}: {relayed['status_counts']}, {relayed['short_streams']} short"
                )
    return found


def level_measures(compute: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every measure of the levels by name, those of the paired rounds included."""
    measures = {}
    for level, pair in (compute.get("by_concurrency") or {}).items():
        for side in ("direct", "front", "gateway", "push", "polled"):
            measures[f"compute c={level} {side}"] = pair.get(side) or {}
        for number, paired in enumerate(pair.get("rounds") or (), start=1):
            for side in ("direct", "gateway"):
                measures[f"compute c={level} {side}, paired round {number}"] = paired[side]
    return measures


def compute_disturbances(compute: dict[str, Any], threshold: float) -> list[str]:
    """Measures during which other processes took more than `threshold` of CPUs 0-1."""
    measures = level_measures(compute)
    measures |= {
        f"relay {kind} {'floor' if side == 'direct' else side}": pair.get(side) or {}
        for kind, pair in (compute.get("relay") or {}).items()
        for side in ("direct", "gateway")
    }
    return [
        f"{name}: {summary['other_cpu_share']:.0%}"
        for name, summary in measures.items()
        if summary.get("other_cpu_share", 0) > threshold
    ]
