"""The benchmark's deployment section: the gateway as it runs in production, in one run.

Five ways to the same fake backend, each measured at the same concurrencies: directly, through nginx
alone (the shipped proxying rules in front of the backend), through the gateway with one worker and
with two, and through nginx in front of the two-worker gateway. Nothing is pinned here: two workers
need both CPUs, so every process (load generator and backend included) may run on either, and the
figures show what this 2-CPU machine can do as a whole. Each measure is taken in every round, in
turn, and the best round counts (noise only ever slows a run).

Then resident memory of the two-worker gateway (supervisor and workers summed) while it holds 1,000
and then 5,000 slow streams at once.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, Final

from bench.common import (
    MODEL,
    TOKEN,
    Check,
    Service,
    busy_shares,
    chat_body,
    difference,
    memory_kb,
    process_cpu_seconds,
    rss_sampler,
    run_client,
    show,
    start_service,
    table_row,
    wait_ready,
    warm,
    write_gateway_config,
)
from testing.ports import free_port
from testing.processes import children
from testing.services.nginx import NginxServer

ANY_CPU: Final = "0,1"
PATHS: Final = {
    "direct": "/v1/chat/completions",
    "gateway": "/resource_server/local/vllm/v1/chat/completions",
}
WAYS: Final = ("direct", "nginx", "gateway_1", "gateway_2", "nginx_gateway_2")
LABELS: Final = {
    "direct": "direct to the backend",
    "nginx": "nginx alone",
    "gateway_1": "gateway, 1 worker",
    "gateway_2": "gateway, 2 workers",
    "nginx_gateway_2": "nginx + gateway, 2 workers",
}
CONCURRENCIES: Final = (16, 64)
PACED_STREAM: Final = "[[chunks=20]][[chunk_delay=0.02]]"
SLOW_STREAM: Final = "[[chunks=10]][[chunk_delay=3]]"
"""Held streams, as in real use: a chunk every few seconds (5,000 of them still send 1,700 a second)."""
HELD_STREAMS: Final = (1000, 5000)
HOLD_SECONDS: Final = 180.0
OPENED_PER_SECOND: Final = 1000
"""Held streams are opened over a few seconds: 5,000 connections in one instant overflow this
machine's accept queue (net.core.somaxconn = 4096) whatever server listens."""
ROUNDS: Final = 2
WORKERS_RATIO: Final = "workers_2_vs_1_rps_ratio"
NGINX_ADDED_P99: Final = "nginx_gateway_c16_added_p99_ms"
HOP_P99_RATIO: Final = "gateway_over_nginx_c64_p99_ratio"
"""The gateway (one worker) in nginx's place as the one hop to the backend, p99 at c=64 (issue 20)."""
STREAMS_5000_RSS: Final = "streams_5000_rss_mb"


def family_rss_kb(pid: int) -> int:
    """VmRSS of a process and its children (the workers); shared pages count once per process, so
    the sum errs high."""
    total = 0
    for each in [pid, *children(pid)]:
        with suppress(OSError, KeyError):
            total += memory_kb(each)["VmRSS"]
    return total


def family_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far; warm-up requests count too, so the figure
    per measured request errs high."""
    return sum(process_cpu_seconds(each) for each in [pid, *children(pid)])


class DeploymentBench:
    def __init__(self, workdir: Path, seconds: float) -> None:
        self.workdir = workdir
        self.seconds = seconds

    def run(self) -> dict[str, Any]:
        with ExitStack() as services:
            backend_port = free_port()
            backend_args = ["-m", "testing.fake_vllm", "--port", str(backend_port), "--model", MODEL]
            backend = self._start(services, "backend", backend_args)
            wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
            gateways = {workers: self._gateway(services, backend_port, workers) for workers in (1, 2)}
            return asyncio.run(self._measure(backend_port, gateways))

    def _start(self, services: ExitStack, name: str, args: list[str]) -> Service:
        service = start_service(name, ANY_CPU, args, self.workdir)
        services.callback(service.stop)
        return service

    def _gateway(self, services: ExitStack, backend_port: int, workers: int) -> tuple[Service, int]:
        port = free_port()
        config = write_gateway_config(
            self.workdir,
            port,
            backend_port,
            name=f"gateway-workers-{workers}.yaml",
            settings={
                "server": {"host": "127.0.0.1", "port": port, "workers": workers},
                "database_url": f"sqlite:///deployment-{workers}.db",
            },
        )
        gateway = self._start(services, f"gateway-{workers}", ["-m", "proxy", "--config", str(config)])
        wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
        return gateway, port

    async def _measure(self, backend_port: int, gateways: dict[int, tuple[Service, int]]) -> dict[str, Any]:
        nginx_dir = self.workdir / "nginx"
        backend = f"127.0.0.1:{backend_port}"
        two = f"127.0.0.1:{gateways[2][1]}"
        async with (
            NginxServer(nginx_dir / "alone", [backend], port=free_port()) as alone,
            NginxServer(nginx_dir / "front", [two], port=free_port()) as front,
        ):
            urls = {
                "direct": f"http://{backend}{PATHS['direct']}",
                "nginx": f"{alone.url}{PATHS['direct']}",
                "gateway_1": f"http://127.0.0.1:{gateways[1][1]}{PATHS['gateway']}",
                "gateway_2": f"http://{two}{PATHS['gateway']}",
                "nginx_gateway_2": f"{front.url}{PATHS['gateway']}",
            }
            for way in WAYS:
                warm(urls[way], 20)
            pids = {
                "gateway_1": gateways[1][0].process.pid,
                "gateway_2": gateways[2][0].process.pid,
                "nginx_gateway_2": gateways[2][0].process.pid,
            }
            measures = await asyncio.to_thread(self._throughput, urls, pids)
            held = await asyncio.to_thread(self._held_streams, gateways[2][0], urls["gateway_2"])
        return summarize(measures, held, self.seconds)

    def _throughput(self, urls: dict[str, str], pids: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
        runs: dict[str, list[dict[str, Any]]] = {}
        plain, paced = chat_body(), chat_body(f"Say hello {PACED_STREAM}", stream=True)
        for round_number in range(1, ROUNDS + 1):
            for way in WAYS:
                for level in CONCURRENCIES:
                    options = ["--concurrency", str(level), "--warmup", str(level * 10)]
                    measured = self._load(urls[way], plain, options, pids.get(way))
                    runs.setdefault(f"{way} c{level}", []).append(measured)
                options = ["--concurrency", "16", "--warmup", "32", "--stream"]
                runs.setdefault(f"{way} stream", []).append(self._load(urls[way], paced, options, None))
                print(f"deployment ({LABELS[way]}), round {round_number}: done", file=sys.stderr)
        return runs

    def _load(self, url: str, body: str, options: list[str], gateway: int | None) -> dict[str, Any]:
        """With how busy both CPUs were and, for a gateway, its CPU time per request (all its
        processes): together they show whether the gateway or the machine was the limit."""
        args = ["--url", url, "--body", body, "--duration", str(self.seconds), "--token", TOKEN, *options]
        spent = family_cpu_seconds(gateway) if gateway else 0.0
        with busy_shares() as busy:
            summary = run_client("load generator", ANY_CPU, "bench.loadgen", args, self.seconds + 120)
        if gateway and summary["requests"]:
            used = family_cpu_seconds(gateway) - spent
            summary["gateway_cpu_ms_per_request"] = round(used * 1000 / summary["requests"], 3)
        return summary | busy

    def _held_streams(self, gateway: Service, url: str) -> dict[str, Any]:
        body = chat_body(f"Say hello {SLOW_STREAM}", stream=True)
        results = {}
        for streams in HELD_STREAMS:
            before = family_rss_kb(gateway.process.pid)
            args = ["--url", url, "--body", body, "--token", TOKEN]
            args += ["--hold-streams", str(streams), "--hold-seconds", str(HOLD_SECONDS)]
            args += ["--ramp-seconds", str(streams / OPENED_PER_SECOND)]
            with rss_sampler(lambda: family_rss_kb(gateway.process.pid)) as samples:
                held = run_client("load generator", ANY_CPU, "bench.loadgen", args, HOLD_SECONDS + 60)
            results[str(streams)] = {
                "completed": held["completed"],
                "unfinished": held["unfinished"],
                "errors": held["errors"],
                "status_counts": held.get("status_counts"),
                "ttfc_p99_ms": held.get("ttfc_p99_ms"),
                "rss_before_mb": round(before / 1024, 1),
                "peak_rss_mb": round(max(samples, default=before) / 1024, 1),
            }
            print(f"deployment: {streams} held streams: done", file=sys.stderr)
        return results


def summarize(runs: dict[str, list[dict[str, Any]]], held: dict[str, Any], seconds: float) -> dict[str, Any]:
    best = {key: max(measured, key=lambda summary: float(summary["rps"])) for key, measured in runs.items()}
    one, two = best["gateway_1 c64"]["rps"], best["gateway_2 c64"]["rps"]
    nginx, front = best["nginx c16"], best["nginx_gateway_2 c16"]
    return {
        "comparison": f"best of {ROUNDS} rounds, {seconds:g} s per measure, no CPU pinning",
        "best": best,
        "rps_runs": {key: [summary["rps"] for summary in measured] for key, measured in runs.items()},
        WORKERS_RATIO: round(two / one, 3) if one else None,
        NGINX_ADDED_P99: difference(front["p99_ms"], nginx["p99_ms"]),
        HOP_P99_RATIO: _ratio(best["gateway_1 c64"]["p99_ms"], best["nginx c64"]["p99_ms"]),
        "held_streams": held,
        STREAMS_5000_RSS: held.get("5000", {}).get("peak_rss_mb"),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator is not None and denominator else None


def deployment_checks(results: dict[str, Any]) -> dict[str, Check]:
    return {
        HOP_P99_RATIO: (
            results.get(HOP_P99_RATIO),
            "gateway ≤ 2x nginx's p99 as the hop (c=64)",
            lambda v: v <= 2,
        ),
        WORKERS_RATIO: (results.get(WORKERS_RATIO), "2 workers ≥ 1.6x 1 worker (c=64)", lambda v: v >= 1.6),
        NGINX_ADDED_P99: (
            results.get(NGINX_ADDED_P99),
            "≤ 3 ms at p99 over nginx alone (c=16)",
            lambda v: v <= 3,
        ),
        STREAMS_5000_RSS: (results.get(STREAMS_5000_RSS), "< 1 GB for 5,000 streams", lambda v: v < 1024),
    }


def deployment_failures(results: dict[str, Any]) -> list[str]:
    found = [
        f"deployment {key}: {summary.get('status_counts')}"
        for key, summary in results.get("best", {}).items()
        if summary.get("errors")
    ]
    for streams, held in results.get("held_streams", {}).items():
        if held["completed"] != int(streams):
            found.append(f"deployment {streams} held streams: {held['status_counts']}")
    return found


def deployment_rows(results: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    best = results["best"]
    rows = []
    for level in CONCURRENCIES:
        for way in WAYS:
            summary = best[f"{way} c{level}"]
            rows.append(
                table_row(
                    f"deployment c={level}: {LABELS[way]}, requests/s (p50 / p99 ms: "
                    f"{show(summary['p50_ms'])} / {show(summary['p99_ms'])})",
                    None,
                    summary["rps"],
                    "—",
                    "",
                    judged.get(WORKERS_RATIO) if (way, level) == ("gateway_2", 64) else None,
                )
            )
    for way in WAYS:
        summary = best[f"{way} stream"]
        rows.append(
            table_row(
                f"deployment paced streams c=16: {LABELS[way]}, first chunk p50 / p99",
                None,
                f"{show(summary['ttfc_p50_ms'])} / {show(summary['ttfc_p99_ms'])}",
                "—",
                " ms",
            )
        )
    one, two = best["gateway_1 c64"], best["gateway_2 c64"]
    rows.append(
        table_row(
            "deployment c=64: gateway CPU per request, 1 worker / 2 workers (CPU 0, CPU 1 busy)",
            None,
            f"{show(one.get('gateway_cpu_ms_per_request'))} ms ({one['cpu0_busy_share']:.0%}, "
            f"{one['cpu1_busy_share']:.0%}) / {show(two.get('gateway_cpu_ms_per_request'))} ms "
            f"({two['cpu0_busy_share']:.0%}, {two['cpu1_busy_share']:.0%})",
            "—",
            "",
        )
    )
    rows.append(
        table_row(
            "deployment c=16: nginx + gateway (2 workers) p99 minus nginx alone p99",
            None,
            results[NGINX_ADDED_P99],
            "—",
            " ms",
            judged.get(NGINX_ADDED_P99),
        )
    )
    rows.append(
        table_row(
            "deployment c=64: gateway (1 worker) p99 / nginx alone p99, each the one hop to the backend",
            None,
            results.get(HOP_P99_RATIO),
            "—",
            "x",
            judged.get(HOP_P99_RATIO),
        )
    )
    for streams, held in results["held_streams"].items():
        rows.append(
            table_row(
                f"deployment: {streams} slow streams held, gateway (2 workers) peak RSS",
                None,
                held["peak_rss_mb"],
                f"{held['completed']} completed",
                " MB",
                judged.get(STREAMS_5000_RSS) if streams == "5000" else None,
            )
        )
    return rows
