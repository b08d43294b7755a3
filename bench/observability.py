"""The benchmark's observability section: what request records and metrics cost a request.

A gateway as deployed (the defaults: a JSON line per request on its stdout, sent to a file as to
journald, the same records in its SQLite database, metrics on) against one with both off
(`request_log: {stdout: false, store: false}`, `metrics: {enabled: false}`), each started alone on
CPU 1 in turn, as the auth section does. Every run also counts the records its gateway left, since a
comparison with records missing would measure something else.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from bench.alternating import (
    GATEWAY_PATH,
    SERIAL_WARM_REQUESTS,
    best_of,
    measure_chat,
    run_disturbances,
    run_failures,
    warmup_requests,
)
from bench.common import (
    GATEWAY_CPU,
    Check,
    Service,
    difference,
    show,
    start_service,
    table_row,
    wait_ready,
    warm,
    write_gateway_config,
)
from testing.ports import free_port

OBSERVABILITY_MODES: Final = ("deployed", "all_off")
"""Records to stdout and the database with metrics (the defaults), then records and metrics off."""
OBSERVABILITY_LABELS: Final = {
    "deployed": "as deployed (records to stdout file and SQLite, metrics)",
    "all_off": "records and metrics off",
}
OBSERVABILITY_CONCURRENCIES: Final = (16, 64)
OBSERVABILITY_SECONDS: Final = 4.0
OBSERVABILITY_ROUNDS: Final = 3
OBSERVABILITY_DATABASE: Final = "obs.db"
RECORDS_OFF: Final = {"stdout": False, "store": False}
METRICS_OFF: Final = {"enabled": False}
RECORDS_C64_RPS_RATIO: Final = "records_c64_rps_ratio"


class ObservabilityBench:
    """Request records and metrics as deployed against records off: one gateway at a time on the gateway's
    CPU, alternating, as AuthBench does. Both write to the same SQLite database in the run's directory."""

    def __init__(
        self, workdir: Path, backend: Service, backend_port: int, seconds: float, rounds: int
    ) -> None:
        self.workdir = workdir
        self.backend_pid = backend.process.pid
        self.backend_port = backend_port
        self.seconds = seconds
        self.rounds = rounds
        self.database = workdir / OBSERVABILITY_DATABASE

    def compare(self) -> dict[str, Any]:
        runs = []
        for round_number in range(1, self.rounds + 1):
            for mode in OBSERVABILITY_MODES:
                runs.append({"mode": mode, "round": round_number, **self._run(mode, round_number)})
                print(f"observability ({mode}), round {round_number}: done", file=sys.stderr)
        return summarize_observability(runs, self.seconds, self.rounds)

    def _run(self, mode: str, round_number: int) -> dict[str, Any]:
        """Start a fresh gateway for one run, measure each concurrency, stop it (which flushes its database
        sink), then count the records it left on stdout and in the database."""
        settings: dict[str, Any] = {"database_url": f"sqlite:///{self.database}"}
        if mode == "all_off":
            settings |= {"request_log": RECORDS_OFF, "metrics": METRICS_OFF}
        stdout = self.workdir / f"gateway-{mode}-{round_number}.stdout"
        stored_before = stored_records(self.database)
        with ExitStack() as services:
            port = free_port()
            config = write_gateway_config(
                self.workdir, port, self.backend_port, name=f"gateway-{mode}.yaml", settings=settings
            )
            args = ["-m", "proxy", "--config", str(config)]
            gateway = start_service(f"gateway-{mode}", GATEWAY_CPU, args, self.workdir, stdout=stdout)
            services.callback(gateway.stop)
            wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
            url = f"http://127.0.0.1:{port}{GATEWAY_PATH}"
            warm(url, SERIAL_WARM_REQUESTS)
            ours = [self.backend_pid, gateway.process.pid]
            measured = {
                str(level): measure_chat(url, level, self.seconds, ours, gateway.process.pid)
                for level in OBSERVABILITY_CONCURRENCIES
            }
            gateway.check_running()
            gateway.stop()
        sent = SERIAL_WARM_REQUESTS + sum(
            warmup_requests(int(level)) + summary["requests"] for level, summary in measured.items()
        )
        records = {
            "requests_sent": sent,
            "stdout_lines": count_lines(stdout),
            "stored": stored_records(self.database) - stored_before,
        }
        return {"by_concurrency": measured, "records": records}


def stored_records(database: Path) -> int:
    """Rows in the gateway's table of request records, 0 before the first gateway has created it."""
    if not database.exists():
        return 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def count_lines(path: Path) -> int:
    with path.open("rb") as lines:
        return sum(1 for _ in lines)


def summarize_observability(runs: list[dict[str, Any]], seconds: float, rounds: int) -> dict[str, Any]:
    """Compare the best (and the median) run of each mode per concurrency; every run stays in the figures."""
    by_concurrency = {}
    for level in map(str, OBSERVABILITY_CONCURRENCIES):
        on, off = (best_of(runs, mode, level, key="mode") for mode in OBSERVABILITY_MODES)
        by_concurrency[level] = {
            "deployed": on,
            "all_off": off,
            "rps_ratio": round(on["rps"] / off["rps"], 3) if off["rps"] else None,
            "median_rps_ratio": (
                round(on["rps_median"] / off["rps_median"], 3) if off["rps_median"] else None
            ),
            "added_p50_ms": difference(on["p50_ms"], off["p50_ms"]),
            "added_p99_ms": difference(on["p99_ms"], off["p99_ms"]),
            **cpu_per_request(runs, level),
        }
    return {
        "comparison": f"best of {rounds} alternating runs",
        "seconds_per_measure": seconds,
        "rounds": rounds,
        "modes": {
            "deployed": "defaults: request records on stdout (to a file) and in SQLite, metrics on",
            "all_off": f"request_log: {RECORDS_OFF}, metrics: {METRICS_OFF}",
        },
        "order": [f"{run['mode']} {run['round']}" for run in runs],
        "warm_requests": SERIAL_WARM_REQUESTS,
        "by_concurrency": by_concurrency,
        "runs": runs,
    }


def cpu_per_request(runs: list[dict[str, Any]], level: str) -> dict[str, Any]:
    """The gateway's CPU time per request, median of each mode's runs, and the throughput it allows
    as deployed against all off: on its one CPU, a gateway at full load serves 1/CPU per request."""
    medians = {}
    for mode in OBSERVABILITY_MODES:
        figures = [
            run["by_concurrency"][level].get("gateway_cpu_us_per_request")
            for run in runs
            if run["mode"] == mode
        ]
        known = [figure for figure in figures if figure is not None]
        medians[mode] = statistics.median(known) if known else None
    on, off = medians["deployed"], medians["all_off"]
    return {
        "cpu_us_per_request": medians,
        "cpu_rps_ratio": round(off / on, 3) if on and off else None,
    }


def observability_checks(observability: dict[str, Any]) -> dict[str, Check]:
    records_c64 = observability.get("by_concurrency", {}).get("64", {})
    return {
        RECORDS_C64_RPS_RATIO: (
            records_c64.get("rps_ratio"),
            "records and metrics cost at most 10% of throughput",
            lambda v: v >= 0.9,
        ),
    }


def observability_rows(observability: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    rows = []
    for level, pair in observability["by_concurrency"].items():
        rows.extend(_level_rows(level, pair, observability, judged))
    return rows


def _level_rows(
    level: str, pair: dict[str, Any], observability: dict[str, Any], judged: dict[str, Any]
) -> list[str]:
    """All off and as deployed one under the other in the Gateway column, best run and median."""
    off, on = pair["all_off"], pair["deployed"]
    prefix = f"records c={level}, {observability['comparison']}"
    ratio, median_ratio = pair.get("rps_ratio"), pair.get("median_rps_ratio")
    share = "—"
    if ratio is not None and median_ratio is not None:
        share = f"{show(ratio * 100, '%')} of all off (median {show(median_ratio * 100, '%')})"

    def rps(summary: dict[str, Any]) -> str:
        return f"{show(summary['rps'])} (median {show(summary['rps_median'])})"

    off_label, on_label = (OBSERVABILITY_LABELS[mode] for mode in ("all_off", "deployed"))
    rows = [
        table_row(f"{prefix}: {off_label} requests/s", None, rps(off), "—", ""),
        table_row(
            f"{prefix}: {on_label} requests/s",
            None,
            rps(on),
            share,
            "",
            judged.get(f"records_c{level}_rps_ratio"),
        ),
    ]
    for rank in ("p50", "p99"):
        added = show(pair.get(f"added_{rank}_ms"), " ms vs all off")
        rows.append(table_row(f"{prefix}: all off {rank}", None, off[f"{rank}_ms"], "—", " ms"))
        rows.append(table_row(f"{prefix}: as deployed {rank}", None, on[f"{rank}_ms"], added, " ms"))
    cpu = pair.get("cpu_us_per_request") or {}
    if cpu.get("deployed") and cpu.get("all_off") and pair.get("cpu_rps_ratio"):
        rows.append(
            table_row(
                f"{prefix}: gateway CPU per request, all off / as deployed (median of runs)",
                None,
                f"{show(cpu['all_off'])} / {show(cpu['deployed'])} µs",
                f"{show(pair['cpu_rps_ratio'] * 100, '%')} of all off's requests/s at full load",
                "",
            )
        )
    shares = f"{on['other_cpu_share']:.0%} / {off['other_cpu_share']:.0%}"
    rows.append(
        table_row(
            f"{prefix}: CPUs 0-1 taken by other processes, as deployed / all off", None, shares, "—", ""
        )
    )
    if level == str(OBSERVABILITY_CONCURRENCIES[-1]):
        written = [
            f"{run['records']['stdout_lines']:,} / {run['records']['stored']:,} of "
            f"{run['records']['requests_sent']:,}"
            for run in observability["runs"]
            if run["mode"] == "deployed"
        ]
        rows.append(
            table_row(
                "records: as deployed, lines on stdout / rows in SQLite of requests sent, per gateway run",
                None,
                "; ".join(written),
                "—",
                "",
            )
        )
    return rows


def observability_failures(observability: dict[str, Any]) -> list[str]:
    return run_failures("observability", observability, "mode")


def observability_disturbances(observability: dict[str, Any], threshold: float) -> list[str]:
    return run_disturbances("observability", observability, "mode", threshold)


def missing_records(observability: dict[str, Any]) -> list[str]:
    """Gateway runs as deployed that did not record every request (the database sink drops records when
    its buffer is full), or runs with records off that recorded some: either would make the comparison
    measure something else."""
    found = []
    for run in observability.get("runs", []):
        records = run["records"]
        expected = records["requests_sent"] if run["mode"] == "deployed" else 0
        if records["stdout_lines"] != expected or records["stored"] != expected:
            found.append(
                f"observability {run['mode']} {run['round']}: {records['requests_sent']:,} requests sent, "
                f"{records['stdout_lines']:,} lines on stdout, {records['stored']:,} rows stored"
            )
    return found
