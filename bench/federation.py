"""The benchmark's federation section: what choosing the endpoint costs a request.

One gateway on CPU 1 and one fake backend on CPU 0, which three clusters share, each with an endpoint
for the benchmark's model and each reporting it running. The load generator alternates, at each
concurrency and round, between the cluster-explicit route (`/local/vllm/v1/chat/completions`) and
the federated route (`/v1/chat/completions`), so both see the same gateway, backend and machine.
The federated route ranks three candidates on every request (job reports from the cache, requests
in flight), so its extra cost is the ranking's, not a single lookup's.

The cost per request is read two ways: the p50 latency difference at c=1, where the gateway is idle
between requests, and at c=16, where CPU 1 is the limit, the difference in CPU time per request that
the throughputs imply (1000/rps federated minus 1000/rps explicit, in ms).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    MODEL,
    NO_LIMITS,
    STATIC_AUTH,
    TOKEN,
    Check,
    chat_body,
    difference,
    loadgen,
    other_cpu_use,
    show,
    start_service,
    table_row,
    tokens_document,
    wait_ready,
    warm,
    write_documents,
)
from testing.ports import free_port

CLUSTERS: Final = ("local", "second", "third")
ROUTES: Final = {
    "explicit": "/resource_server/local/vllm/v1/chat/completions",
    "federated": "/resource_server/v1/chat/completions",
}
CONCURRENCIES: Final = (1, 16)
SATURATED: Final = "16"
ROUNDS: Final = 2
WARM_REQUESTS: Final = 20
"""Per route before measuring: the first federated request fetches the clusters' job reports."""
ADDED_P50: Final = "federation_c1_added_p50_ms"
ADDED_CPU: Final = f"federation_c{SATURATED}_added_ms_per_request"
TARGET_MS: Final = 0.2


def write_config(workdir: Path, gateway_port: int, backend_port: int) -> Path:
    backend = f"http://127.0.0.1:{backend_port}"
    clusters = [
        {
            "cluster_name": name,
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm"],
            "openai_endpoints": ["chat/completions"],
            "config": {"status_url": f"{backend}/jobs"},
        }
        for name in CLUSTERS
    ]
    endpoints = [
        {
            "cluster": name,
            "framework": "vllm",
            "model": MODEL,
            "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
            "config": {"api_url": f"{backend}/v1"},
        }
        for name in CLUSTERS
    ]
    documents: dict[str, Any] = {
        "federation.yaml": {
            "server": {"host": "127.0.0.1", "port": gateway_port},
            "auth": STATIC_AUTH,
            "limits": NO_LIMITS,
            "request_log": {"stdout": False, "store": False},
            "endpoints_file": "federation-endpoints.yaml",
            "clusters_file": "federation-clusters.yaml",
        },
        "tokens.yaml": tokens_document(),
        "federation-endpoints.yaml": endpoints,
        "federation-clusters.yaml": clusters,
    }
    write_documents(workdir, documents)
    return workdir / "federation.yaml"


class FederationBench:
    def __init__(self, workdir: Path, seconds: float, rounds: int = ROUNDS) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.rounds = rounds

    def run(self) -> dict[str, Any]:
        with ExitStack() as services:
            backend_port, gateway_port = free_port(), free_port()
            backend_args = ["-m", "testing.fake_vllm", "--port", str(backend_port), "--model", MODEL]
            backend = start_service("federation-backend", LOADGEN_CPU, backend_args, self.workdir)
            services.callback(backend.stop)
            wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
            config = write_config(self.workdir, gateway_port, backend_port)
            gateway_args = ["-m", "proxy", "--config", str(config)]
            gateway = start_service("federation-gateway", GATEWAY_CPU, gateway_args, self.workdir)
            services.callback(gateway.stop)
            wait_ready(gateway, f"http://127.0.0.1:{gateway_port}/resource_server/health")
            urls = {route: f"http://127.0.0.1:{gateway_port}{path}" for route, path in ROUTES.items()}
            for url in urls.values():
                warm(url, WARM_REQUESTS)
            ours = [backend.process.pid, gateway.process.pid]
            runs = []
            for level in CONCURRENCIES:
                for round_number in range(1, self.rounds + 1):
                    for route, url in urls.items():
                        summary = self._measure(url, level, ours)
                        runs.append({"route": route, "round": round_number, "level": level, **summary})
                print(f"federation, concurrency {level}: done", file=sys.stderr)
        return summarize(runs, self.seconds, self.rounds)

    def _measure(self, url: str, level: int, ours: list[int]) -> dict[str, Any]:
        options = ["--duration", str(self.seconds), "--concurrency", str(level)]
        options += ["--warmup", str(max(50, level * 10))]
        with other_cpu_use(ours) as disturbance:
            summary = loadgen(url, chat_body(), *options, token=TOKEN, limit=self.seconds + 90)
        return summary | disturbance


def summarize(runs: list[dict[str, Any]], seconds: float, rounds: int) -> dict[str, Any]:
    """The best run of each route per concurrency (noise only slows a run); every run stays listed."""
    by_concurrency = {}
    for level in CONCURRENCIES:

        def best(route: str, level: int = level) -> dict[str, Any]:
            measured = [run for run in runs if run["route"] == route and run["level"] == level]
            return max(measured, key=lambda run: float(run["rps"]))

        explicit, federated = best("explicit"), best("federated")
        by_concurrency[str(level)] = {
            "explicit": explicit,
            "federated": federated,
            "added_p50_ms": difference(federated["p50_ms"], explicit["p50_ms"]),
            "added_ms_per_request": _added_ms(explicit["rps"], federated["rps"]),
            "rps_ratio": round(federated["rps"] / explicit["rps"], 3) if explicit["rps"] else None,
        }
    return {
        "comparison": f"best of {rounds} alternating runs",
        "seconds_per_measure": seconds,
        "candidates": len(CLUSTERS),
        "by_concurrency": by_concurrency,
        "runs": runs,
    }


def _added_ms(explicit_rps: float, federated_rps: float) -> float | None:
    if not explicit_rps or not federated_rps:
        return None
    return round(1000 / federated_rps - 1000 / explicit_rps, 3)


def federation_checks(federation: dict[str, Any]) -> dict[str, Check]:
    levels = federation.get("by_concurrency") or {}
    target = f"≤ {TARGET_MS} ms per request more than the explicit route"
    return {
        ADDED_P50: ((levels.get("1") or {}).get("added_p50_ms"), target, lambda v: v <= TARGET_MS),
        ADDED_CPU: (
            (levels.get(SATURATED) or {}).get("added_ms_per_request"),
            target,
            lambda v: v <= TARGET_MS,
        ),
    }


def federation_rows(federation: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    """The explicit route under Direct, the federated one under Gateway."""
    rows = []
    for level, pair in federation["by_concurrency"].items():
        explicit, federated = pair["explicit"], pair["federated"]
        prefix = f"federation c={level}, {len(CLUSTERS)} candidates, explicit → federated"
        ratio = pair.get("rps_ratio")
        share = show(ratio * 100, "% of explicit") if ratio is not None else "—"
        check = judged.get(ADDED_CPU) if level == SATURATED else None
        per_request = f"{share}, {show(pair.get('added_ms_per_request'), ' ms')} per request"
        rows.append(
            table_row(f"{prefix}: requests/s", explicit["rps"], federated["rps"], per_request, "", check)
        )
        check = judged.get(ADDED_P50) if level == "1" else None
        added = show(pair.get("added_p50_ms"), " ms")
        rows.append(table_row(f"{prefix}: p50", explicit["p50_ms"], federated["p50_ms"], added, " ms", check))
    return rows


def federation_failures(federation: dict[str, Any]) -> list[str]:
    return [
        f"federation {run['route']} {run['round']} c={run['level']}: {run['status_counts']}"
        for run in federation.get("runs", [])
        if run.get("errors")
    ]
