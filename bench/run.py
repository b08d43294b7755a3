"""One benchmark run: the fake backend directly against the same backend through the gateway.

    python -m bench.run [--seconds S] [--streams N] [--auth-seconds S] [--auth-rounds R]
        [--observability-seconds S] [--observability-rounds R] [--only SECTION ...] [--skip-compute]
        [--relay-only] [--direct-only] [--output FILE]

The backend and the load generator share CPU 0 and the gateway has CPU 1 to itself, so that the
gateway's figures are not disturbed by the processes that feed it. The run prints a markdown
table with the targets beside the figures and writes every figure to bench/results/latest.json
(bench/report.py).

Sections, each in its own module, in the order they run: overhead (bench/overhead.py: direct against
gateway, streams, slow streams), auth (bench/auth.py: static against globus auth with a warm cache),
observability (bench/observability.py: request records and metrics as deployed against off),
federation (bench/federation.py: the cluster-explicit route against the federated one), batches
(bench/openai_batches.py: a 10,000-line OpenAI batch against its lines sent live, and live requests
during it), deployment
(bench/deployment.py: nginx, one and two workers, 5,000 held streams), on_demand (bench/on_demand.py:
the pilot's mTLS hop against the direct and Globus Compute paths), compute (bench/compute.py:
the Globus Compute path and its stream relay). `--only` runs the ones named (each needs only the
backend it starts itself) and `--skip-compute` leaves out the slowest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from bench.auth import AUTH_ROUNDS, AUTH_SECONDS, AuthBench
from bench.common import GATEWAY_CPU, LOADGEN_CPU, MODEL, ROOT, chat_body, start_service, wait_ready
from bench.compute import ComputeBench
from bench.deployment import DeploymentBench
from bench.federation import FederationBench
from bench.observability import OBSERVABILITY_ROUNDS, OBSERVABILITY_SECONDS, ObservabilityBench
from bench.on_demand import ROUNDS as ON_DEMAND_ROUNDS
from bench.on_demand import OnDemandBench
from bench.openai_batches import BatchBench
from bench.overhead import overhead
from bench.report import machine, report, targets
from testing.ports import free_port

DEFAULT_OUTPUT: Final = ROOT / "bench" / "results" / "latest.json"
SECTIONS: Final = (
    "overhead",
    "auth",
    "observability",
    "federation",
    "batches",
    "deployment",
    "on_demand",
    "compute",
)


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
            "on_demand_rounds": args.on_demand_rounds,
        },
    }
    if {"overhead", "auth", "observability"} & set(sections):
        backend_port = free_port()
        backend_args = ["-m", "testing.fake_vllm", "--port", str(backend_port), "--model", MODEL]
        backend = start_service("backend", LOADGEN_CPU, backend_args, workdir)
        services.callback(backend.stop)
        wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
        if "overhead" in sections:
            results |= overhead(
                workdir,
                services,
                backend,
                backend_port,
                seconds=args.seconds,
                streams=args.streams,
                with_gateway=gateways,
            )
        # Each later gateway has CPU 1 to itself, as the overhead section's had.
        if gateways and "auth" in sections:
            auth = AuthBench(workdir, backend, backend_port, args.auth_seconds, args.auth_rounds)
            results["auth"] = auth.compare()
            backend.check_running()
        if gateways and "observability" in sections:
            observability = ObservabilityBench(
                workdir, backend, backend_port, args.observability_seconds, args.observability_rounds
            )
            results["observability"] = observability.compare()
            backend.check_running()
    if gateways and "federation" in sections:
        results["federation"] = FederationBench(workdir, args.seconds).run()
    if gateways and "batches" in sections:
        results["batches"] = BatchBench(workdir, args.seconds).run()
    if gateways and "deployment" in sections:
        results["deployment"] = DeploymentBench(workdir, args.seconds).run()
    if gateways and "on_demand" in sections:
        results["on_demand"] = OnDemandBench(workdir, args.seconds, args.on_demand_rounds).run()
    # Last, when no other gateway holds CPU 1: the compute baseline, relay floor and gateway need it alone.
    if "compute" in sections:
        compute = ComputeBench(workdir, args.seconds, with_gateway=gateways, relay_only=args.relay_only)
        results["compute"] = compute.run()
    results["targets"] = targets(results)
    return results


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
        "--on-demand-rounds",
        type=int,
        default=ON_DEMAND_ROUNDS,
        help="rounds of the on-demand section, each measuring every path",
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
        "--relay-only", action="store_true", help="of the compute section, measure only the stream relay"
    )
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
    if not 1 <= args.on_demand_rounds <= 10:
        parser.error("--on-demand-rounds must be in [1, 10]")
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
    report(results, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
