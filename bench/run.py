"""One benchmark run: the fake backend directly against the same backend through the gateway.

    python -m bench.run [--seconds S] [--streams N] [--auth-seconds S] [--auth-rounds R]
        [--observability-seconds S] [--observability-rounds R] [--only SECTION ...] [--skip-compute]
        [--direct-only] [--output FILE]

The backend and the load generator share CPU 0 and the gateway has CPU 1 to itself, so that the
gateway's figures are not disturbed by the processes that feed it. The run prints a markdown
table with the targets beside the figures and writes every figure to bench/results/latest.json.

Then comes the cost of authentication: a gateway with the `static` provider against one with the
`globus` provider and a warm cache, each started alone on CPU 1 in turn (static, globus, static,
globus, ...), with a local fake of Globus on CPU 0.

Then the cost of request records and metrics, built the same way: a gateway as deployed (the defaults:
a JSON line per request on its stdout, sent to a file as to journald, the same records in its SQLite
database, metrics on) against one with both off (`request_log: {stdout: false, store: false}`,
`metrics: {enabled: false}`), alternating.

It ends with the Globus Compute path (bench/compute.py): a fake Globus Compute on CPU 0, a client that
does the gateway's SDK work alone on CPU 1 against a gateway with a compute endpoint on CPU 1, and the
gateway's stream relay fed by the fake's function.

Sections: overhead (direct against gateway, streams, slow streams), auth, observability, federation
(bench/federation.py: the cluster-explicit route against the federated one), batches
(bench/openai_batches.py: a 10,000-line OpenAI batch against its lines sent live, and live requests
during it), deployment
(bench/deployment.py: nginx, one and two workers, 5,000 held streams), compute; `--only`
runs the ones named (each needs only the backend it starts itself) and `--skip-compute` leaves out the
slowest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    MODEL,
    ROOT,
    STATIC_AUTH,
    TOKEN,
    Service,
    chat_body,
    difference,
    free_port,
    loadgen,
    memory_kb,
    other_cpu_use,
    process_cpu_seconds,
    read_announcement,
    rss_sampler,
    show,
    start_service,
    table_row,
    wait_ready,
    warm,
    write_gateway_config,
)
from bench.compute import (
    ComputeBench,
    compute_checks,
    compute_disturbances,
    compute_failures,
    compute_rows,
)
from bench.deployment import DeploymentBench, deployment_checks, deployment_failures, deployment_rows
from bench.federation import FederationBench, federation_checks, federation_failures, federation_rows
from bench.openai_batches import BatchBench, batch_checks, batch_failures, batch_rows

DEFAULT_OUTPUT: Final = ROOT / "bench" / "results" / "latest.json"
CONCURRENCIES: Final = (1, 16, 64)
STREAM_CONCURRENCY: Final = 16
SLOW_STREAM_DIRECTIVES: Final = "[[chunks=30]][[chunk_delay=0.5]]"
STREAM_KINDS: Final = {
    "paced": "[[chunks=20]][[chunk_delay=0.02]]",
    "saturated": "",
}
"""Paced streams generate like a model (50 tokens/s), so the time to first chunk is the gateway's
own delay; saturated streams send everything at once and measure queueing at full load."""
HOLD_LIMIT_SECONDS: Final = 60.0
C1_ADDED_P50: Final = "c1_added_p50_ms"
C64_RPS_RATIO: Final = "c64_rps_ratio"
TTFC_ADDED_P50: Final = f"ttfc{STREAM_CONCURRENCY}_added_p50_ms"
SLOW_STREAMS_RSS: Final = "slow_streams_peak_rss_mb"
AUTH_PROVIDERS: Final = ("static", "globus")
AUTH_CONCURRENCIES: Final = (64, 16)
AUTH_SECONDS: Final = 4.0
AUTH_ROUNDS: Final = 3
AUTH_WARM_REQUESTS: Final = 5
"""Requests sent one by one before measuring: the first makes the globus gateway introspect the token
and cache the user, so the measures see only the warm path."""
GLOBUS_C64_RPS_RATIO: Final = "globus_c64_rps_ratio"
GLOBUS_INTROSPECTIONS: Final = "globus_introspections_per_gateway"
GATEWAY_PATH: Final = "/resource_server/local/vllm/v1/chat/completions"
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
SECTIONS: Final = ("overhead", "auth", "observability", "federation", "batches", "deployment", "compute")
OTHER_CPU_WARNING: Final = 0.05
"""Beyond this share of CPUs 0 and 1 taken by other processes, a measure may be off by more than the
5% the auth comparison judges."""


class Bench:
    """The measurements of one run, direct first and then through the gateway for each load."""

    def __init__(self, backend_port: int, gateway_port: int | None, seconds: float) -> None:
        self.direct_url = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}{GATEWAY_PATH}" if gateway_port else None
        self.seconds = seconds

    def _pair(self, body: str, *extra: str) -> dict[str, Any]:
        limit = self.seconds + 90
        options = ["--duration", str(self.seconds), *extra]
        pair = {"direct": loadgen(self.direct_url, body, *options, token=None, limit=limit)}
        if self.gateway_url:
            pair["gateway"] = loadgen(self.gateway_url, body, *options, token=TOKEN, limit=limit)
        return pair

    def non_streaming(self) -> dict[str, Any]:
        results = {}
        for concurrency in CONCURRENCIES:
            warmup = str(max(100, concurrency * 20))
            pair = self._pair(chat_body(), "--concurrency", str(concurrency), "--warmup", warmup)
            if "gateway" in pair:
                direct, gateway = pair["direct"], pair["gateway"]
                pair["added_p50_ms"] = difference(gateway["p50_ms"], direct["p50_ms"])
                pair["added_p99_ms"] = difference(gateway["p99_ms"], direct["p99_ms"])
                pair["rps_ratio"] = round(gateway["rps"] / direct["rps"], 3) if direct["rps"] else None
            results[str(concurrency)] = pair
            print(f"non-streaming, concurrency {concurrency}: done", file=sys.stderr)
        return results

    def streaming(self) -> dict[str, Any]:
        concurrency = str(STREAM_CONCURRENCY)
        results = {}
        for kind, directives in STREAM_KINDS.items():
            body = chat_body(f"Say hello {directives}", stream=True)
            pair = self._pair(body, "--stream", "--concurrency", concurrency, "--warmup", "64")
            if "gateway" in pair:
                direct, gateway = pair["direct"], pair["gateway"]
                pair["added_ttfc_p50_ms"] = difference(gateway["ttfc_p50_ms"], direct["ttfc_p50_ms"])
                pair["added_ttfc_p99_ms"] = difference(gateway["ttfc_p99_ms"], direct["ttfc_p99_ms"])
            results[kind] = pair
            print(f"streaming ({kind}), concurrency {concurrency}: done", file=sys.stderr)
        return results

    def slow_streams(self, gateway_pid: int, streams: int) -> dict[str, Any]:
        """Hold many slow streams through the gateway and watch its resident memory."""
        assert self.gateway_url
        before = memory_kb(gateway_pid)
        body = chat_body(f"Say hello {SLOW_STREAM_DIRECTIVES}", stream=True)
        options = ["--hold-streams", str(streams), "--hold-seconds", str(HOLD_LIMIT_SECONDS)]
        with rss_sampler(lambda: memory_kb(gateway_pid)["VmRSS"]) as samples:
            held = loadgen(self.gateway_url, body, *options, token=TOKEN, limit=HOLD_LIMIT_SECONDS + 30)
        after = memory_kb(gateway_pid)
        print(f"{streams} slow streams: done", file=sys.stderr)
        return {
            "streams": streams,
            "directives": SLOW_STREAM_DIRECTIVES,
            "loadgen": held,
            "rss_before_mb": round(before["VmRSS"] / 1024, 1),
            "peak_rss_mb": round(max(samples, default=after["VmRSS"]) / 1024, 1),
            "vm_hwm_mb": round(after["VmHWM"] / 1024, 1),
            "rss_samples": len(samples),
        }


def globus_calls(service: Service) -> dict[str, int]:
    """The fake Globus's count of calls per API, which it prints when stopped."""
    service.stop()
    for line in reversed(service.log.read_text(errors="replace").splitlines()):
        if line.startswith('{"counts"'):
            calls: dict[str, int] = json.loads(line)["counts"]
            return calls
    raise RuntimeError(f"the {service.name} did not report its calls:\n{service.log_tail()}")


def globus_auth(fake: dict[str, Any]) -> dict[str, Any]:
    """The gateway's `auth` section pointing at the fake; the cache keeps its default lifetime (10 min)."""
    keys = ("client_id", "client_secret", "scope", "auth_url", "groups_url")
    settings = {key: fake[key] for key in keys} | {"authorized_idp_domains": ["example.org"]}
    return {"provider": "globus", "globus": settings}


class AuthBench:
    """Static against warm-cache globus auth: one gateway at a time on the gateway's CPU, alternating."""

    def __init__(
        self, workdir: Path, backend: Service, backend_port: int, seconds: float, rounds: int
    ) -> None:
        self.workdir = workdir
        self.backend_pid = backend.process.pid
        self.backend_port = backend_port
        self.seconds = seconds
        self.rounds = rounds

    def compare(self) -> dict[str, Any]:
        runs = []
        for round_number in range(1, self.rounds + 1):
            for provider in AUTH_PROVIDERS:
                runs.append({"provider": provider, "round": round_number, **self._run(provider)})
                print(f"auth ({provider}), round {round_number}: done", file=sys.stderr)
        return summarize_auth(runs, self.seconds, self.rounds)

    def _run(self, provider: str) -> dict[str, Any]:
        """Start a fresh gateway (and fake Globus) for one run, measure each concurrency, stop them."""
        with ExitStack() as services:
            auth = STATIC_AUTH
            fake: Service | None = None
            if provider == "globus":
                fake_args = ["-m", "bench.fake_globus_server", "--token", TOKEN]
                fake = start_service("fake-globus", LOADGEN_CPU, fake_args, self.workdir)
                services.callback(fake.stop)
                auth = globus_auth(read_announcement(fake))
            gateway, port = self._start_gateway(provider, auth, services)
            url = f"http://127.0.0.1:{port}{GATEWAY_PATH}"
            warm(url, AUTH_WARM_REQUESTS)
            ours = [self.backend_pid, gateway.process.pid] + ([fake.process.pid] if fake else [])
            measured = {
                str(level): measure_chat(url, level, self.seconds, ours) for level in AUTH_CONCURRENCIES
            }
            if gateway.process.poll() is not None:
                raise RuntimeError(f"the {gateway.name} stopped during the run:\n{gateway.log_tail()}")
            gateway.stop()
            run: dict[str, Any] = {"by_concurrency": measured}
            if fake is not None:
                run["globus_calls"] = globus_calls(fake)
            return run

    def _start_gateway(self, provider: str, auth: dict[str, Any], services: ExitStack) -> tuple[Service, int]:
        port = free_port()
        config = write_gateway_config(
            self.workdir, port, self.backend_port, auth=auth, name=f"gateway-{provider}.yaml"
        )
        args = ["-m", "proxy", "--config", str(config)]
        gateway = start_service(f"gateway-{provider}", GATEWAY_CPU, args, self.workdir)
        services.callback(gateway.stop)
        wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
        return gateway, port


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


def best_of(runs: list[dict[str, Any]], side: str, level: str, key: str = "provider") -> dict[str, Any]:
    """The run with the most requests/s, since noise (other processes, CPU frequency) only slows a run."""
    measured = [run["by_concurrency"][level] for run in runs if run[key] == side]
    best = dict(max(measured, key=lambda summary: float(summary["rps"])))
    rps = [summary["rps"] for summary in measured]
    return best | {"rps_runs": rps, "rps_median": statistics.median(rps)}


def summarize_auth(runs: list[dict[str, Any]], seconds: float, rounds: int) -> dict[str, Any]:
    """Compare the best run of each provider per concurrency; every run stays in the figures."""
    by_concurrency = {}
    for level in map(str, AUTH_CONCURRENCIES):
        static, globus = best_of(runs, "static", level), best_of(runs, "globus", level)
        by_concurrency[level] = {
            "static": static,
            "globus": globus,
            "rps_ratio": round(globus["rps"] / static["rps"], 3) if static["rps"] else None,
            "median_rps_ratio": (
                round(globus["rps_median"] / static["rps_median"], 3) if static["rps_median"] else None
            ),
            "added_p50_ms": difference(globus["p50_ms"], static["p50_ms"]),
            "added_p99_ms": difference(globus["p99_ms"], static["p99_ms"]),
        }
    introspections = [run["globus_calls"]["introspections"] for run in runs if "globus_calls" in run]
    return {
        "comparison": f"best of {rounds} alternating runs",
        "seconds_per_measure": seconds,
        "rounds": rounds,
        "order": [f"{run['provider']} {run['round']}" for run in runs],
        "warm_requests": AUTH_WARM_REQUESTS,
        "by_concurrency": by_concurrency,
        "globus_introspections": introspections,
        "introspections_per_gateway": max(introspections, default=None),
        "runs": runs,
    }


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
            warm(url, AUTH_WARM_REQUESTS)
            ours = [self.backend_pid, gateway.process.pid]
            measured = {
                str(level): measure_chat(url, level, self.seconds, ours, gateway.process.pid)
                for level in OBSERVABILITY_CONCURRENCIES
            }
            if gateway.process.poll() is not None:
                raise RuntimeError(f"the {gateway.name} stopped during the run:\n{gateway.log_tail()}")
            gateway.stop()
        sent = AUTH_WARM_REQUESTS + sum(
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
        "warm_requests": AUTH_WARM_REQUESTS,
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


def machine() -> dict[str, Any]:
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
    }


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its figure; a target without a gateway figure stays unjudged (None)."""
    plain = results.get("non_streaming") or {}
    streams = (results.get("streaming") or {}).get("paced") or {}
    slow = results.get("slow_streams") or {}
    auth = results.get("auth") or {}
    auth_c64 = auth.get("by_concurrency", {}).get("64", {})
    records_c64 = (results.get("observability") or {}).get("by_concurrency", {}).get("64", {})
    checks: dict[str, tuple[float | None, str, Callable[[float], bool]]] = {
        C1_ADDED_P50: (plain.get("1", {}).get("added_p50_ms"), "≤ 1 ms added", lambda v: v <= 1),
        C64_RPS_RATIO: (plain.get("64", {}).get("rps_ratio"), "≥ 30% of direct", lambda v: v >= 0.3),
        TTFC_ADDED_P50: (streams.get("added_ttfc_p50_ms"), "≤ 1 ms added", lambda v: v <= 1),
        SLOW_STREAMS_RSS: (slow.get("peak_rss_mb"), "< 200 MB", lambda v: v < 200),
        GLOBUS_C64_RPS_RATIO: (auth_c64.get("rps_ratio"), "≥ 95% of static", lambda v: v >= 0.95),
        GLOBUS_INTROSPECTIONS: (auth.get("introspections_per_gateway"), "1 (warm cache)", lambda v: v == 1),
        RECORDS_C64_RPS_RATIO: (
            records_c64.get("rps_ratio"),
            "records and metrics cost at most 10% of throughput",
            lambda v: v >= 0.9,
        ),
        **compute_checks(results.get("compute") or {}),
        **federation_checks(results.get("federation") or {}),
        **batch_checks(results.get("batches") or {}),
        **deployment_checks(results.get("deployment") or {}),
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
    ]

    def add(
        measure: str,
        direct: Any,
        gateway: Any,
        difference: str,
        unit: str,
        check: dict[str, Any] | None = None,
    ) -> None:
        lines.append(table_row(measure, direct, gateway, difference, unit, check))

    for level, pair in results.get("non_streaming", {}).items():
        direct, gateway = pair["direct"], pair.get("gateway", {})
        ratio = pair.get("rps_ratio")
        share = show(ratio * 100, "% of direct") if ratio is not None else "—"
        add(
            f"c={level}: requests/s",
            direct["rps"],
            gateway.get("rps"),
            share,
            "",
            judged.get(f"c{level}_rps_ratio"),
        )
        for rank in ("p50", "p99"):
            add(
                f"c={level}: {rank}",
                direct[f"{rank}_ms"],
                gateway.get(f"{rank}_ms"),
                show(pair.get(f"added_{rank}_ms"), " ms"),
                " ms",
                judged.get(f"c{level}_added_{rank}_ms"),
            )
    for kind, pair in results.get("streaming", {}).items():
        direct, gateway = pair["direct"], pair.get("gateway", {})
        for rank in ("p50", "p99"):
            add(
                f"{STREAM_CONCURRENCY} {kind} streams: time to first chunk {rank}",
                direct[f"ttfc_{rank}_ms"],
                gateway.get(f"ttfc_{rank}_ms"),
                show(pair.get(f"added_ttfc_{rank}_ms"), " ms"),
                " ms",
                judged.get(TTFC_ADDED_P50) if (kind, rank) == ("paced", "p50") else None,
            )
    slow = results.get("slow_streams")
    if slow:
        count = f"{slow['streams']:,} slow streams"
        add(f"{count}: gateway peak RSS", None, slow["peak_rss_mb"], "—", " MB", judged[SLOW_STREAMS_RSS])
        completed = f"{slow['loadgen']['completed']}/{slow['streams']}"
        add(f"{count}: completed", None, completed, "—", "")
    auth = results.get("auth")
    if auth:
        for level, pair in auth["by_concurrency"].items():
            lines.extend(auth_rows(level, pair, auth["comparison"], judged))
        introspections = auth["introspections_per_gateway"]
        add(
            "globus: introspections per gateway run",
            None,
            introspections,
            "—",
            "",
            judged[GLOBUS_INTROSPECTIONS],
        )
    observability = results.get("observability")
    if observability:
        for level, pair in observability["by_concurrency"].items():
            lines.extend(observability_rows(level, pair, observability, judged))
    federation = results.get("federation")
    if federation:
        lines.extend(federation_rows(federation, judged))
    batches = results.get("batches")
    if batches:
        lines.extend(batch_rows(batches, judged))
    deployment = results.get("deployment")
    if deployment:
        lines.extend(deployment_rows(deployment, judged))
    compute = results.get("compute")
    if compute:
        lines.extend(compute_rows(compute, judged))
    return "\n".join(lines)


def auth_rows(level: str, pair: dict[str, Any], comparison: str, judged: dict[str, Any]) -> list[str]:
    """Static and globus one under the other in the Gateway column: the Direct column does not apply."""
    static, globus = pair["static"], pair["globus"]
    ratio = pair.get("rps_ratio")
    share = show(ratio * 100, "% of static") if ratio is not None else "—"
    prefix = f"c={level}, {comparison}"
    rows = [
        table_row(f"{prefix}: static auth requests/s", None, static["rps"], "—", ""),
        table_row(
            f"{prefix}: globus auth (warm cache) requests/s",
            None,
            globus["rps"],
            share,
            "",
            judged.get(f"globus_c{level}_rps_ratio"),
        ),
    ]
    for rank in ("p50", "p99"):
        added = show(pair.get(f"added_{rank}_ms"), " ms vs static")
        rows.append(table_row(f"{prefix}: static auth {rank}", None, static[f"{rank}_ms"], "—", " ms"))
        rows.append(table_row(f"{prefix}: globus auth {rank}", None, globus[f"{rank}_ms"], added, " ms"))
    shares = f"{static['other_cpu_share']:.0%} / {globus['other_cpu_share']:.0%}"
    rows.append(
        table_row(f"{prefix}: CPUs 0-1 taken by other processes, static / globus", None, shares, "—", "")
    )
    return rows


def observability_rows(
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


def run(workdir: Path, services: ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers (stopped by `services`), measure the sections asked for, and gather every figure."""
    sections, gateways = args.sections, not args.direct_only
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "sections": list(sections),
            "seconds_per_measure": args.seconds,
            "cpus": {"backend": LOADGEN_CPU, "loadgen": LOADGEN_CPU, "gateway": GATEWAY_CPU},
            "body": json.loads(chat_body()),
            "slow_streams": args.streams,
            "auth_seconds_per_measure": args.auth_seconds,
            "auth_rounds": args.auth_rounds,
            "observability_seconds_per_measure": args.observability_seconds,
            "observability_rounds": args.observability_rounds,
            "compute_seconds_per_measure": args.seconds,
        },
    }
    if {"overhead", "auth", "observability"} & set(sections):
        backend_port = free_port()
        backend_args = ["-m", "bench.backend", "--port", str(backend_port), "--model", MODEL]
        backend = start_service("backend", LOADGEN_CPU, backend_args, workdir)
        services.callback(backend.stop)
        wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
        if "overhead" in sections:
            results |= overhead(workdir, services, backend, backend_port, args)
        # Each later gateway has CPU 1 to itself, as the overhead section's had.
        if gateways and "auth" in sections:
            auth = AuthBench(workdir, backend, backend_port, args.auth_seconds, args.auth_rounds)
            results["auth"] = auth.compare()
            check_running(backend)
        if gateways and "observability" in sections:
            observability = ObservabilityBench(
                workdir, backend, backend_port, args.observability_seconds, args.observability_rounds
            )
            results["observability"] = observability.compare()
            check_running(backend)
    if gateways and "federation" in sections:
        results["federation"] = FederationBench(workdir, args.seconds).run()
    if gateways and "batches" in sections:
        results["batches"] = BatchBench(workdir, args.seconds).run()
    if gateways and "deployment" in sections:
        results["deployment"] = DeploymentBench(workdir, args.seconds).run()
    # Last, when no other gateway holds CPU 1: the compute baseline, relay floor and gateway need it alone.
    if "compute" in sections:
        results["compute"] = ComputeBench(workdir, args.seconds, with_gateway=gateways).run()
    results["targets"] = targets(results)
    return results


def overhead(
    workdir: Path, services: ExitStack, backend: Service, backend_port: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The backend directly against through one gateway, which is stopped at the end to free CPU 1."""
    gateway: Service | None = None
    gateway_port: int | None = None
    if not args.direct_only:
        gateway_port = free_port()
        config = write_gateway_config(workdir, gateway_port, backend_port)
        gateway = start_service("gateway", GATEWAY_CPU, ["-m", "proxy", "--config", str(config)], workdir)
        services.callback(gateway.stop)
        wait_ready(gateway, f"http://127.0.0.1:{gateway_port}/resource_server/health")
    bench = Bench(backend_port, gateway_port, args.seconds)
    results = {"non_streaming": bench.non_streaming(), "streaming": bench.streaming()}
    if gateway is not None:
        results["slow_streams"] = bench.slow_streams(gateway.process.pid, args.streams)
        for service in (backend, gateway):
            check_running(service)
        gateway.stop()
    return results


def check_running(service: Service) -> None:
    if service.process.poll() is not None:
        raise RuntimeError(f"the {service.name} stopped during the run:\n{service.log_tail()}")


def failed_runs(results: dict[str, Any]) -> list[str]:
    """Measurements with errors, since their figures would be misleading if read alone."""
    found = []
    for kind in ("non_streaming", "streaming"):
        for level, pair in results.get(kind, {}).items():
            for side in ("direct", "gateway"):
                if pair.get(side, {}).get("errors"):
                    found.append(f"{kind} c={level} {side}: {pair[side]['status_counts']}")
    slow = results.get("slow_streams")
    if slow and slow["loadgen"]["completed"] != slow["streams"]:
        found.append(f"slow streams: {slow['loadgen']['status_counts']}")
    for run in (results.get("auth") or {}).get("runs", []):
        for level, summary in run["by_concurrency"].items():
            if summary.get("errors"):
                found.append(f"auth {run['provider']} {run['round']} c={level}: {summary['status_counts']}")
    for run in (results.get("observability") or {}).get("runs", []):
        for level, summary in run["by_concurrency"].items():
            if summary.get("errors"):
                found.append(
                    f"observability {run['mode']} {run['round']} c={level}: {summary['status_counts']}"
                )
    return (
        found
        + compute_failures(results.get("compute") or {})
        + federation_failures(results.get("federation") or {})
        + batch_failures(results.get("batches") or {})
        + deployment_failures(results.get("deployment") or {})
    )


def missing_records(results: dict[str, Any]) -> list[str]:
    """Gateway runs as deployed that did not record every request (the database sink drops records when
    its buffer is full), or runs with records off that recorded some: either would make the comparison
    measure something else."""
    found = []
    for run in (results.get("observability") or {}).get("runs", []):
        records = run["records"]
        expected = records["requests_sent"] if run["mode"] == "deployed" else 0
        if records["stdout_lines"] != expected or records["stored"] != expected:
            found.append(
                f"observability {run['mode']} {run['round']}: {records['requests_sent']:,} requests sent, "
                f"{records['stdout_lines']:,} lines on stdout, {records['stored']:,} rows stored"
            )
    return found


def disturbed_runs(results: dict[str, Any]) -> list[str]:
    """Auth, observability and compute measures that other processes disturbed enough to blur a 5%
    difference."""
    found = []
    for section, key in (("auth", "provider"), ("observability", "mode")):
        for run in (results.get(section) or {}).get("runs", []):
            for level, summary in run["by_concurrency"].items():
                share = summary["other_cpu_share"]
                if share > OTHER_CPU_WARNING:
                    found.append(f"{section} {run[key]} {run['round']} c={level}: {share:.0%}")
    return found + compute_disturbances(results.get("compute") or {}, OTHER_CPU_WARNING)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _raise_open_file_limit() -> None:
    """The children inherit it: 1,000 streams need more sockets than the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measure")
    parser.add_argument("--streams", type=int, default=1000, help="slow streams held at once")
    parser.add_argument(
        "--auth-seconds", type=float, default=AUTH_SECONDS, help="length of each static/globus measure"
    )
    parser.add_argument(
        "--auth-rounds", type=int, default=AUTH_ROUNDS, help="static/globus pairs of gateway runs"
    )
    parser.add_argument(
        "--observability-seconds",
        type=float,
        default=OBSERVABILITY_SECONDS,
        help="length of each records on/off measure",
    )
    parser.add_argument(
        "--observability-rounds",
        type=int,
        default=OBSERVABILITY_ROUNDS,
        help="records on/off pairs of gateway runs",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    parser.add_argument("--skip-compute", action="store_true", help="leave out the (slow) compute section")
    parser.add_argument(
        "--direct-only", action="store_true", help="measure the backend alone (no auth or observability)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    chosen = set(args.only or SECTIONS) - ({"compute"} if args.skip_compute else set())
    args.sections = [section for section in SECTIONS if section in chosen]
    if not args.sections:
        parser.error("no section left to run")
    if not 0 < args.seconds <= 60 or not 0 < args.streams <= 5000:
        parser.error("--seconds must be in (0, 60] and --streams in (0, 5000]")
    if not 0 < args.auth_seconds <= 60 or not 1 <= args.auth_rounds <= 5:
        parser.error("--auth-seconds must be in (0, 60] and --auth-rounds in [1, 5]")
    if not 0 < args.observability_seconds <= 60 or not 1 <= args.observability_rounds <= 5:
        parser.error("--observability-seconds must be in (0, 60] and --observability-rounds in [1, 5]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not {0, 1} <= os.sched_getaffinity(0):
        print("the benchmark needs CPUs 0 and 1 (backend and gateway apart)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _raise_open_file_limit()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, ExitStack() as services:
        try:
            results = run(Path(tmp), services, args)
        except (RuntimeError, OSError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    print(markdown(results))
    for problem in failed_runs(results):
        print(f"\nwarning: errors in {problem}")
    for problem in missing_records(results):
        print(f"\nwarning: request records do not match the requests in {problem}")
    disturbed = disturbed_runs(results)
    if disturbed:
        print(f"\nwarning: other processes took this share of CPUs 0-1 during {'; '.join(disturbed)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nall figures: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
