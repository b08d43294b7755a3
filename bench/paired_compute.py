"""Two gateways' CPU time per Globus Compute request, measured at the same time.

    python -m bench.paired_compute [--a CHECKOUT] [--b CHECKOUT] [--a-python PYTHON]
        [--b-python PYTHON] [--rounds N] [--seconds S] [--concurrency C]

What bench.paired does for the direct path, for the Compute path. Each side has its own fake
Globus Auth and Compute with its RabbitMQ result queue (bench.fake_compute_server, on CPU 0) and
its gateway as the Compute section deploys it (bench/compute_config.py: the result queue, records
and metrics on; on CPU 1). Both are loaded at once by wrk (CPU 0), C requests in flight each.
Whatever slows the machine then slows both alike: paired rounds differ by a few tens of µs where
rounds taken one after the other scatter by a hundred (docs/performance.md, 2026-12-05 09:40).

CHECKOUT is the root of a checkout of the gateway (a `git worktree` of the commit before a change),
by default this one; its `proxy` package is what that gateway runs. The configuration is written
by this checkout's bench, so both checkouts must read the same settings. The figures compare the
two: each gateway shares CPU 1 with the other and each fake shares CPU 0, so neither is a
figure of the gateway alone (bench.compute's section gives those).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    TOKEN,
    Service,
    chat_body,
    process_cpu_seconds,
    read_announcement,
    start_service,
    wait_ready,
)
from bench.compute_config import COMPUTE_PATH, write_compute_config
from bench.paired import Side, parse_side, summarize
from bench.wrk import wrk_load
from testing.ports import free_port

BODY: Final = chat_body("Say hello")
WARM_SECONDS: Final = 5.0
SLACK_SECONDS: Final = 90.0


def start_side(side: Side, workdir: Path, services: ExitStack) -> Service:
    """The side's fake service, then its gateway; the gateway's URL is left in `side.url`."""
    fake_args = ["-m", "bench.fake_compute_server", "--result-queue", str(workdir / "rabbitmq")]
    fake = start_service(f"fake-compute-{side.label}", LOADGEN_CPU, fake_args, workdir)
    services.callback(fake.stop)
    port = free_port()
    config = write_compute_config(workdir, port, read_announcement(fake))
    args = ["-m", "proxy", "--config", str(config)]
    gateway = start_service(
        f"gateway-compute-{side.label}", GATEWAY_CPU, args, workdir, cwd=side.checkout, python=side.python
    )
    services.callback(gateway.stop)
    wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
    side.gateway, side.url = gateway, f"http://127.0.0.1:{port}{COMPUTE_PATH}"
    return gateway


def load(side: Side, workdir: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    summary = wrk_load(
        side.url,
        BODY,
        concurrency=concurrency,
        seconds=seconds,
        token=TOKEN,
        workdir=workdir,
        limit=SLACK_SECONDS,
    )
    if summary["errors"]:
        raise RuntimeError(f"gateway {side.label} failed requests: {summary['status_counts']}")
    return summary


def measure_round(
    sides: list[tuple[Side, Path]], concurrency: int, seconds: float, pool: ThreadPoolExecutor
) -> dict[str, dict[str, float]]:
    """Both loads at once; each gateway's CPU time over the requests it served."""
    pids = [side.gateway.process.pid if side.gateway else 0 for side, _ in sides]
    before = [process_cpu_seconds(pid) for pid in pids]
    running = [pool.submit(load, side, workdir, concurrency, seconds) for side, workdir in sides]
    summaries = [future.result() for future in running]
    figures = {}
    for (side, _), pid, start, summary in zip(sides, pids, before, summaries, strict=True):
        used, served = process_cpu_seconds(pid) - start, summary["requests"]
        figures[side.label] = {
            "rps": summary["rps"],
            "p50_ms": summary["p50_ms"],
            "requests": served,
            "cpu_us_per_request": round(used * 1e6 / served, 1) if served else float("nan"),
        }
    return figures


def compare(a: Side, b: Side, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    with ExitStack() as services, tempfile.TemporaryDirectory(prefix="paired-compute-") as directory:
        sides = [(side, Path(directory) / side.label) for side in (a, b)]
        for side, workdir in sides:
            workdir.mkdir()
            start_side(side, workdir, services)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for side, workdir in sides:
                load(side, workdir, concurrency, WARM_SECONDS)
            runs = []
            for number in range(rounds):
                runs.append(measure_round(sides, concurrency, seconds, pool))
                print(f"round {number + 1}: {runs[-1]}", file=sys.stderr)
        for side, _ in sides:
            if side.gateway is not None:
                side.gateway.check_running()
    return summarize(a, b, runs, seconds, concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="", help="CHECKOUT of gateway a (default: this one)")
    parser.add_argument("--b", default="", help="CHECKOUT of gateway b (default: this one)")
    parser.add_argument("--a-python", help="the interpreter gateway a runs under (default: this one)")
    parser.add_argument("--b-python", help="the interpreter gateway b runs under (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        a = parse_side("a", f"deployed@{args.a}" if args.a else "deployed", args.a_python)
        b = parse_side("b", f"deployed@{args.b}" if args.b else "deployed", args.b_python)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 60 or not 1 <= args.concurrency <= 1000:
        parser.error("--rounds must be in [1, 20], --seconds in (0, 60] and --concurrency in [1, 1000]")
    print(json.dumps(compare(a, b, args.rounds, args.seconds, args.concurrency), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
