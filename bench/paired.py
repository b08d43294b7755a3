"""Two gateways under load at the same time, to judge a change by a few microseconds of CPU per request.

    python -m bench.paired [--a MODE[@CHECKOUT]] [--b MODE[@CHECKOUT]] [--a-python PYTHON]
        [--b-python PYTHON] [--rounds R] [--seconds S]

MODE is `deployed` (request records on stdout and in SQLite, metrics on) or `all_off` (both off);
CHECKOUT is the root of another checkout of the gateway (for instance a `git worktree` of the commit
before a change), by default this one. PYTHON is the interpreter a gateway runs under, by default
this one: another virtualenv's `bin/python` with the same packages installed, to judge an
interpreter build (`make install PYTHON=/usr/bin/python3.11 VENV=.venv-system` makes one). Both
gateways share CPU 1, and each gets its own load generator on CPU 0, both running at once. Whatever
else slows this machine down (other tenants of the host, the CPU's frequency) then slows both alike,
so the difference of their CPU time per request holds to a few microseconds, where runs taken one
after the other scatter by tens (bench/observability.py's section saw an all-off gateway take 326 to
527 µs per request within one hour).

The figures are for comparing the two, not throughput: two gateways sharing a CPU each pay more per
request than one gateway alone. The round's first-started load generator alternates between the two,
so neither gateway always gets the head start. The result goes to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.alternating import GATEWAY_PATH, SERIAL_WARM_REQUESTS
from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    MODEL,
    ROOT,
    TOKEN,
    Service,
    chat_body,
    process_cpu_seconds,
    start_service,
    wait_ready,
    warm,
    write_gateway_config,
)
from bench.observability import METRICS_OFF, RECORDS_OFF
from testing.ports import free_port

MODES: Final[dict[str, dict[str, Any]]] = {
    "deployed": {},
    "all_off": {"request_log": RECORDS_OFF, "metrics": METRICS_OFF},
}
"""The settings of bench.observability's section, as deployed and with both off."""
CONCURRENCY: Final = 64
WARM_REQUESTS: Final = 2000


@dataclass
class Side:
    label: str
    mode: str
    checkout: Path
    python: str
    gateway: Service | None = None
    url: str = ""


def parse_side(label: str, text: str, python: str | None = None) -> Side:
    mode, _, checkout = text.partition("@")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"--{label}: mode {mode!r} is not one of {', '.join(MODES)}")
    path = Path(checkout).resolve() if checkout else ROOT
    if not (path / "proxy" / "__main__.py").is_file():
        raise argparse.ArgumentTypeError(f"--{label}: {path} is not a checkout of the gateway")
    interpreter = python or sys.executable
    if not os.access(interpreter, os.X_OK) or not Path(interpreter).is_file():
        raise argparse.ArgumentTypeError(f"--{label}-python: {interpreter} is not an executable file")
    return Side(label, mode, path, interpreter)


def start_gateway(side: Side, workdir: Path, backend_port: int, services: ExitStack) -> None:
    """Its stdout goes to a file, as the deployed records go to journald; its `proxy` package comes
    from its checkout, which is the working directory `python -m` searches first."""
    port = free_port()
    settings = {"database_url": f"sqlite:///{workdir / f'{side.label}.db'}", **MODES[side.mode]}
    config = write_gateway_config(workdir, port, backend_port, name=f"{side.label}.yaml", settings=settings)
    args = ["-m", "proxy", "--config", str(config)]
    stdout = workdir / f"{side.label}.stdout"
    side.gateway = start_service(
        f"gateway-{side.label}",
        GATEWAY_CPU,
        args,
        workdir,
        stdout=stdout,
        cwd=side.checkout,
        python=side.python,
    )
    services.callback(side.gateway.stop)
    base = f"http://127.0.0.1:{port}"
    wait_ready(side.gateway, f"{base}/resource_server/health")
    side.url = f"{base}{GATEWAY_PATH}"
    warm(side.url, SERIAL_WARM_REQUESTS)


def start_load(url: str, *options: str) -> subprocess.Popen[bytes]:
    command = ["taskset", "-c", LOADGEN_CPU, sys.executable, "-m", "bench.loadgen", "--url", url]
    command += ["--body", chat_body(), "--token", TOKEN, "--concurrency", str(CONCURRENCY), *options]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)


def finish(load: subprocess.Popen[bytes], limit: float) -> dict[str, Any]:
    output, _ = load.communicate(timeout=limit)
    if load.returncode != 0:
        raise RuntimeError(f"a load generator failed with status {load.returncode}")
    result: dict[str, Any] = json.loads(output)
    return result


def measure_round(sides: Sequence[Side], seconds: float) -> dict[str, dict[str, float]]:
    """Both load generators at once; each gateway's CPU time over its requests."""
    pids = {side.label: side.gateway.process.pid for side in sides if side.gateway}
    before = {label: process_cpu_seconds(pid) for label, pid in pids.items()}
    loads = {side.label: start_load(side.url, "--duration", str(seconds), "--warmup", "0") for side in sides}
    summaries = {label: finish(load, seconds + 90) for label, load in loads.items()}
    time.sleep(1.5)  # the database's thread finishes its batch
    figures = {}
    for label, pid in pids.items():
        requests = summaries[label]["requests"]
        used = process_cpu_seconds(pid) - before[label]
        figures[label] = {
            "rps": summaries[label]["rps"],
            "p99_ms": summaries[label]["p99_ms"],
            "requests": requests,
            "cpu_us_per_request": round(used * 1e6 / requests, 1) if requests else float("nan"),
        }
    return figures


def compare(a: Side, b: Side, rounds: int, seconds: float) -> dict[str, Any]:
    with ExitStack() as services, tempfile.TemporaryDirectory(prefix="paired-") as directory:
        workdir = Path(directory)
        backend_port = free_port()
        backend_args = ["-m", "testing.fake_vllm", "--port", str(backend_port), "--model", MODEL]
        backend = start_service("backend", LOADGEN_CPU, backend_args, workdir)
        services.callback(backend.stop)
        wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
        for side in (a, b):
            start_gateway(side, workdir, backend_port, services)
        for load in [start_load(side.url, "--requests", str(WARM_REQUESTS)) for side in (a, b)]:
            finish(load, 300)
        runs = []
        for number in range(rounds):
            order = (a, b) if number % 2 == 0 else (b, a)
            runs.append(measure_round(order, seconds))
            print(f"round {number + 1}: {runs[-1]}", file=sys.stderr)
    p99 = {label: statistics.median(run[label]["p99_ms"] for run in runs) for label in ("a", "b")}
    return summarize(a, b, runs, seconds, CONCURRENCY) | {"median_p99_ms": p99}


def summarize(
    a: Side, b: Side, runs: list[dict[str, dict[str, float]]], seconds: float, concurrency: int
) -> dict[str, Any]:
    """The rounds of two sides' CPU time per request, and their differences (b minus a)."""
    differences = [run["b"]["cpu_us_per_request"] - run["a"]["cpu_us_per_request"] for run in runs]
    return {
        "a": f"{a.mode}@{a.checkout}",
        "b": f"{b.mode}@{b.checkout}",
        "python": {"a": os.path.realpath(a.python), "b": os.path.realpath(b.python)},
        "rounds": len(runs),
        "seconds_per_round": seconds,
        "concurrency": concurrency,
        "b_minus_a_cpu_us_per_request": [round(value, 1) for value in differences],
        "median_b_minus_a_cpu_us_per_request": round(statistics.median(differences), 1),
        "median_cpu_us_per_request": {
            label: statistics.median(run[label]["cpu_us_per_request"] for run in runs) for label in ("a", "b")
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="all_off", help="MODE[@CHECKOUT] (default: all_off)")
    parser.add_argument("--b", default="deployed", help="MODE[@CHECKOUT] (default: deployed)")
    parser.add_argument("--a-python", help="the interpreter gateway a runs under (default: this one)")
    parser.add_argument("--b-python", help="the interpreter gateway b runs under (default: this one)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        a, b = parse_side("a", args.a, args.a_python), parse_side("b", args.b, args.b_python)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 60:
        parser.error("--rounds must be in [1, 20] and --seconds in (0, 60]")
    print(json.dumps(compare(a, b, args.rounds, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
