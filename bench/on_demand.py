"""The benchmark's on-demand section: what the pilot's mTLS hop adds to a request, beside the
gateway's direct path and its Globus Compute path, at the same load in the same run (issue 21).

    python -m bench.on_demand [--seconds S] [--rounds R] [--output FILE]

One gateway on CPU 1 serves the benchmark's model three ways: `local` (a direct-API endpoint to a
fake vLLM), `ondemand` (a deployment with one replica kept up: the local scheduler starts the real
pilot, which runs its own fake vLLM, and the gateway forwards over mutual TLS) and `hpc` (a Globus
Compute endpoint against the fake Compute service, as bench/compute.py runs it). The backend, the
pilot and its model server, the fake Compute service and the load generator share CPU 0, as a
compute node's processes would share it apart from the gateway's host. Every round measures every
path in turn, its order rotated each round, at c=1 and c=16 (non-streamed), then paced streams at
c=16 for the time to first chunk: whatever slows the machine meanwhile slows every path of a round.

Each figure is the median over rounds; each difference is the median of the rounds' differences
(paired within a round). The targets: the on-demand path adds at most 1 ms at p50 over the direct
path, and what the Compute path adds over the backend alone is at least 10 times what the
on-demand path adds over it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from adaptors.schedulers.local_job import session_members
from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    MODEL,
    NO_LIMITS,
    ROOT,
    STATIC_AUTH,
    TOKEN,
    Service,
    busy_shares,
    chat_body,
    loadgen,
    other_cpu_use,
    process_cpu_seconds,
    read_announcement,
    start_service,
    tokens_document,
    wait_ready,
    write_documents,
)
from bench.compute_client import API_PORT
from bench.compute_config import ADAPTOR_THREADS, compute_access
from bench.on_demand_report import CONCURRENCIES, STREAMS
from mtls.certificates import Role, create_ca, issue, write
from testing.ports import free_port

PATHS: Final = ("backend", "direct", "on_demand", "compute")
ROUTES: Final = {
    "direct": "/resource_server/local/vllm/v1/chat/completions",
    "on_demand": "/resource_server/ondemand/vllm/v1/chat/completions",
    "compute": "/resource_server/hpc/vllm/v1/chat/completions",
}
PACED: Final = "[[chunks=20]][[chunk_delay=0.02]]"
"""Streams generated like a model (20 chunks 20 ms apart), as the overhead section's paced ones."""
ROUNDS: Final = 3
SECONDS: Final = 3.0
DEPLOYMENT: Final = "bench-on-demand"
READY_SECONDS: Final = 120.0
CLIENT_SLACK_SECONDS: Final = 90.0


def warmup_requests(path: str, level: int) -> int:
    """Connections, caches, the Compute endpoint's status; fewer for Compute at c=1, where a request
    takes tens of milliseconds."""
    return max(20, level * 5) if path == "compute" else max(100, level * 20)


def write_site(directory: Path) -> Path:
    """A site CA with the pilot's and the gateway's certificates, as `python -m mtls` would make."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_ca("Bench Site CA", "Bench", days=2)
    (directory / "ca.pem").write_bytes(ca.certificate)
    for role in (Role.pilot, Role.gateway):
        write(
            issue(ca, role, role.value, days=2),
            directory / f"{role.value}.pem",
            directory / f"{role.value}.key",
        )
    return directory


def write_config(workdir: Path, port: int, backend_port: int, fake: dict[str, Any]) -> Path:
    """The gateway with its three ways to the model; the pilot and its model server pinned to CPU 0."""
    site = write_site(workdir / "site")
    pin = ["taskset", "-c", LOADGEN_CPU]
    access = compute_access(fake)
    scheduler = {
        "adapter": "adaptors.schedulers.local.LocalScheduler",
        "config": {"state_dir": str(workdir / "jobs")},
        "pilot_command": [*pin, sys.executable, "-m", "pilot"],
        "pilot_certificate": str(site / "pilot.pem"),
        "pilot_key": str(site / "pilot.key"),
        "pilot_ca": str(site / "ca.pem"),
        "listen_host": "127.0.0.1",
        "environment": {"PYTHONPATH": str(ROOT)},  # the fake vLLM is the tests', not installed
    }
    model_command = [sys.executable, "-m", "testing.fake_vllm", "--host", "127.0.0.1"]
    model_command += ["--port", "{port}", "--model", MODEL]
    endpoints = [
        {
            "cluster": "local",
            "framework": "vllm",
            "model": MODEL,
            "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
            "config": {"api_url": f"http://127.0.0.1:{backend_port}/v1"},
        },
        {
            "cluster": "ondemand",
            "framework": "vllm",
            "model": MODEL,
            "endpoint_adapter": "adaptors.deployment.DeploymentEndpoint",
            "config": {
                "deployment": DEPLOYMENT,
                "scheduler": "local",
                "model_command": model_command,
                "min_replicas": 1,
                "expected_start_seconds": 30,
            },
        },
        {
            "cluster": "hpc",
            "framework": "vllm",
            "model": MODEL,
            "endpoint_adapter": "adaptors.globus_compute.GlobusComputeEndpoint",
            "config": {
                "api_port": API_PORT,
                "endpoint_uuid": fake["endpoint_uuid"],
                "function_uuid": fake["function_uuid"],
                **access,
            },
        },
    ]
    clusters = [
        {
            "cluster_name": "local",
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm"],
            "openai_endpoints": ["chat/completions"],
            "config": {"status_url": f"http://127.0.0.1:{backend_port}/jobs"},
        },
        {
            "cluster_name": "ondemand",
            "cluster_adapter": "adaptors.deployment.DeploymentCluster",
            "frameworks": ["vllm"],
            "openai_endpoints": ["chat/completions"],
            "config": {},
        },
        {
            "cluster_name": "hpc",
            "cluster_adapter": "adaptors.globus_compute.GlobusComputeCluster",
            "frameworks": ["vllm"],
            "openai_endpoints": ["chat/completions"],
            "config": {
                "qstat_endpoint_uuid": fake["endpoint_uuid"],
                "qstat_function_uuid": fake["qstat_function_uuid"],
                **access,
            },
        },
    ]
    documents: dict[str, Any] = {
        "on-demand.yaml": {
            "server": {"host": "127.0.0.1", "port": port, "adaptor_threads": ADAPTOR_THREADS},
            "auth": STATIC_AUTH,
            "limits": NO_LIMITS,
            "endpoints_file": "on-demand-endpoints.yaml",
            "clusters_file": "on-demand-clusters.yaml",
            "database_url": f"sqlite:///{workdir / 'on-demand.db'}",
            "streaming": {
                "internal_secret": fake["callback_secret"],
                "callback_url": f"http://127.0.0.1:{port}",
            },
            "on_demand": {
                "enabled": True,
                "ca_file": str(site / "ca.pem"),
                "gateway_certificate": str(site / "gateway.pem"),
                "gateway_key": str(site / "gateway.key"),
                "schedulers": {"local": scheduler},
            },
        },
        "tokens.yaml": tokens_document(),
        "on-demand-endpoints.yaml": endpoints,
        "on-demand-clusters.yaml": clusters,
    }
    write_documents(workdir, documents)
    return workdir / "on-demand.yaml"


def until_answered(url: str, gateway: Service, seconds: float = READY_SECONDS) -> None:
    """A request held until the deployment's replica is ready (the controller starts it at start-up,
    min_replicas 1), then answered."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        gateway.check_running()
        request = urllib.request.Request(url, data=chat_body().encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=seconds) as response:
                response.read()
                return
        except urllib.error.HTTPError as exc:
            last = f"{exc.code}: {exc.read().decode(errors='replace')[:300]}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"the on-demand deployment did not answer within {seconds:g} s: {last}")


def job_sessions(workdir: Path) -> list[int]:
    """The local scheduler's jobs: each wrapper leads a session holding the pilot and its model server."""
    return [
        int(json.loads(pid_file.read_text())["pid"])
        for pid_file in (workdir / "jobs" / "jobs").glob("*/pid.json")
    ]


def pilot_pid(workdir: Path) -> int:
    """The one pilot of the run (the wrapper writes its pid once started)."""
    [started] = (workdir / "jobs" / "jobs").glob("*/started.json")
    return int(json.loads(started.read_text())["pid"])


def end_jobs(workdir: Path) -> None:
    """Jobs outlive their gateway on purpose (a restarted one adopts them): the run ends its own."""
    for session in job_sessions(workdir):
        for pid in [session, *session_members(session)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


class OnDemandBench:
    def __init__(self, workdir: Path, seconds: float = SECONDS, rounds: int = ROUNDS) -> None:
        self.workdir, self.seconds, self.rounds = workdir, seconds, rounds
        self.hops: dict[str, int] = {}
        """The gateway's and the pilot's pids, whose CPU time per request each measure reports."""

    def run(self) -> dict[str, Any]:
        with ExitStack() as services:
            fake = start_service(
                "on-demand-compute", LOADGEN_CPU, ["-m", "bench.fake_compute_server"], self.workdir
            )
            services.callback(fake.stop)
            announced = read_announcement(fake)
            backend_port, port = free_port(), free_port()
            backend_args = ["-m", "testing.fake_vllm", "--port", str(backend_port), "--model", MODEL]
            backend = start_service("on-demand-backend", LOADGEN_CPU, backend_args, self.workdir)
            services.callback(backend.stop)
            wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
            config = write_config(self.workdir, port, backend_port, announced)
            gateway = start_service(
                "on-demand-gateway", GATEWAY_CPU, ["-m", "proxy", "--config", str(config)], self.workdir
            )
            services.callback(end_jobs, self.workdir)
            services.callback(gateway.stop)
            wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
            urls = {path: f"http://127.0.0.1:{port}{route}" for path, route in ROUTES.items()}
            urls["backend"] = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
            until_answered(urls["on_demand"], gateway)
            ours = [fake.process.pid, backend.process.pid, gateway.process.pid]
            for session in job_sessions(self.workdir):
                ours += [session, *session_members(session)]
            self.hops = {"gateway": gateway.process.pid, "pilot": pilot_pid(self.workdir)}
            runs = []
            for round_number in range(self.rounds):
                order = PATHS[round_number % len(PATHS) :] + PATHS[: round_number % len(PATHS)]
                for kind in (*map(str, CONCURRENCIES), "stream"):
                    for path in order:
                        summary = self._measure(urls[path], path, kind, ours)
                        runs.append({"path": path, "round": round_number + 1, "kind": kind, **summary})
                        for service in (fake, backend, gateway):
                            service.check_running()
                print(f"on demand, round {round_number + 1}: done", file=sys.stderr)
        return summarize(runs, self.seconds, self.rounds)

    def _measure(self, url: str, path: str, kind: str, ours: list[int]) -> dict[str, Any]:
        stream = kind == "stream"
        level = STREAMS if stream else int(kind)
        body = chat_body(PACED, stream=True) if stream else chat_body()
        options = ["--duration", str(self.seconds), "--concurrency", str(level)]
        options += ["--warmup", str(warmup_requests(path, level)), *(["--stream"] if stream else [])]
        before = {hop: process_cpu_seconds(pid) for hop, pid in self.hops.items()}
        with other_cpu_use(ours) as disturbance, busy_shares() as busy:
            summary = loadgen(url, body, *options, token=TOKEN, limit=self.seconds + CLIENT_SLACK_SECONDS)
        served = summary["requests"] + warmup_requests(path, level)
        for hop, pid in self.hops.items():
            used = process_cpu_seconds(pid) - before[hop]
            summary[f"{hop}_cpu_us_per_request"] = round(used * 1e6 / served, 1)
        return summary | disturbance | busy


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def _paired(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str) -> float | None:
    """The median of the rounds' differences, `runs` minus `baseline` (the same round's, paired)."""
    pairs = zip(runs, baseline, strict=True)
    return _median([a[key] - b[key] if a[key] is not None and b[key] is not None else None for a, b in pairs])


def summarize(runs: list[dict[str, Any]], seconds: float, rounds: int) -> dict[str, Any]:
    """Per kind of load: each path's median p50 and p99 (time to first chunk for streams), and the
    medians of the rounds' paired differences."""
    by_kind: dict[str, Any] = {}
    for kind in (*map(str, CONCURRENCIES), "stream"):
        key = "ttfc_p50_ms" if kind == "stream" else "p50_ms"
        high = "ttfc_p99_ms" if kind == "stream" else "p99_ms"
        runs_of = {
            path: [run for run in runs if run["kind"] == kind and run["path"] == path] for path in PATHS
        }
        figures = {
            path: {
                "p50_ms": _median([run[key] for run in measured]),
                "p99_ms": _median([run[high] for run in measured]),
                "rps": _median([run["rps"] for run in measured]),
                "gateway_cpu_us_per_request": _median(
                    [run["gateway_cpu_us_per_request"] for run in measured]
                ),
                "pilot_cpu_us_per_request": _median([run["pilot_cpu_us_per_request"] for run in measured]),
                "cpu0_busy_share": _median([run["cpu0_busy_share"] for run in measured]),
                "cpu1_busy_share": _median([run["cpu1_busy_share"] for run in measured]),
                "other_cpu_share": _median([run["other_cpu_share"] for run in measured]),
                "p50_runs_ms": [run[key] for run in measured],
            }
            for path, measured in runs_of.items()
        }

        entry: dict[str, Any] = {
            "paths": figures,
            "on_demand_over_direct_ms": _paired(runs_of["on_demand"], runs_of["direct"], key),
            "on_demand_over_backend_ms": _paired(runs_of["on_demand"], runs_of["backend"], key),
            "direct_over_backend_ms": _paired(runs_of["direct"], runs_of["backend"], key),
            "compute_over_backend_ms": _paired(runs_of["compute"], runs_of["backend"], key),
        }
        on_demand, compute = entry["on_demand_over_backend_ms"], entry["compute_over_backend_ms"]
        entry["compute_to_on_demand_ratio"] = (
            round(compute / on_demand, 1) if on_demand and compute is not None and on_demand > 0 else None
        )
        by_kind[kind] = entry
    return {
        "comparison": f"medians of {rounds} rounds, every path measured in each, order rotated",
        "seconds_per_measure": seconds,
        "stream_directives": PACED,
        "cpus": {"gateway": GATEWAY_CPU, "backend_pilot_fake_compute_and_loadgen": LOADGEN_CPU},
        "by_kind": by_kind,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    """This section alone, reported as `python -m bench.run --only on_demand` would."""
    from bench.run import main as run_main

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    extra = ["--output", str(args.output)] if args.output else []
    return run_main(
        [
            "--only",
            "on_demand",
            "--seconds",
            str(args.seconds),
            "--on-demand-rounds",
            str(args.rounds),
            *extra,
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
