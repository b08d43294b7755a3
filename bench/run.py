"""One benchmark run: the fake backend directly against the same backend through the gateway.

    python -m bench.run [--seconds S] [--streams N] [--direct-only] [--output FILE]

The backend and the load generator share CPU 0 and the gateway has CPU 1 to itself, so that the
gateway's figures are not disturbed by the processes that feed it. The run prints a markdown
table with the targets beside the figures and writes every figure to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT: Final = ROOT / "bench" / "results" / "latest.json"
MODEL: Final = "bench/model"
TOKEN: Final = "bench-token"
LOADGEN_CPU: Final = "0"
GATEWAY_CPU: Final = "1"
CONCURRENCIES: Final = (1, 16, 64)
STREAM_CONCURRENCY: Final = 16
SLOW_STREAM_DIRECTIVES: Final = "[[chunks=30]][[chunk_delay=0.5]]"
STREAM_KINDS: Final = {
    "paced": "[[chunks=20]][[chunk_delay=0.02]]",
    "saturated": "",
}
"""Paced streams generate like a model (50 tokens/s), so the time to first chunk is the gateway's
own delay; saturated streams send everything at once and measure queueing at full load."""
START_SECONDS: Final = 30.0
HOLD_LIMIT_SECONDS: Final = 60.0
RSS_SAMPLE_SECONDS: Final = 0.2
C1_ADDED_P50: Final = "c1_added_p50_ms"
C64_RPS_RATIO: Final = "c64_rps_ratio"
TTFC_ADDED_P50: Final = f"ttfc{STREAM_CONCURRENCY}_added_p50_ms"
SLOW_STREAMS_RSS: Final = "slow_streams_peak_rss_mb"


def chat_body(content: str = "Say hello", *, stream: bool = False) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A server started by the run, in its own process group so that it can be stopped whole."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue


def start_service(name: str, cpu: str, args: list[str], workdir: Path) -> Service:
    log = workdir / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["taskset", "-c", cpu, sys.executable, *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name, process, log)


def wait_ready(service: Service, url: str, seconds: float = START_SECONDS) -> None:
    """Poll until the service answers 200, failing early with its output if it exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"the {service.name} exited with status {service.process.returncode}:\n{service.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"the {service.name} did not answer 200 at {url} within {seconds:g} s:\n{service.log_tail()}"
    )


def write_gateway_config(workdir: Path, gateway_port: int, backend_port: int) -> Path:
    backend = f"http://127.0.0.1:{backend_port}"
    documents: dict[str, Any] = {
        "gateway.yaml": {
            "server": {"host": "127.0.0.1", "port": gateway_port},
            "auth": {"provider": "static", "static": {"tokens_file": "tokens.yaml"}},
            "endpoints_file": "endpoints.yaml",
            "clusters_file": "clusters.yaml",
        },
        "tokens.yaml": {
            "tokens": [
                {
                    "token": TOKEN,
                    "user": {
                        "id": "00000000-0000-4000-8000-0000000000b1",
                        "username": "bench@example.org",
                        "name": "Bench",
                        "groups": [],
                    },
                }
            ]
        },
        "endpoints.yaml": [
            {
                "cluster": "local",
                "framework": "vllm",
                "model": MODEL,
                "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
                "config": {"api_url": f"{backend}/v1"},
            }
        ],
        "clusters.yaml": [
            {
                "cluster_name": "local",
                "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
                "frameworks": ["vllm"],
                "openai_endpoints": ["chat/completions", "completions", "embeddings"],
                "config": {"status_url": f"{backend}/jobs"},
            }
        ],
    }
    for name, document in documents.items():
        (workdir / name).write_text(yaml.safe_dump(document, sort_keys=False))
    return workdir / "gateway.yaml"


def loadgen(url: str, body: str, *extra: str, token: str | None, limit: float) -> dict[str, Any]:
    """Run the load generator on the backend's CPU and return its JSON summary."""
    args = ["taskset", "-c", LOADGEN_CPU, sys.executable, "-m", "bench.loadgen", "--url", url]
    args += ["--body", body, *extra]
    if token:
        args += ["--token", token]
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the load generator did not finish within {limit:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{done.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in kB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


@contextmanager
def rss_sampler(pid: int) -> Iterator[list[int]]:
    """Sample a process's VmRSS in the background while the block runs."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(memory_kb(pid)["VmRSS"])
            except (OSError, KeyError):
                return
            stop.wait(RSS_SAMPLE_SECONDS)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def difference(gateway: float | None, direct: float | None) -> float | None:
    if gateway is None or direct is None:
        return None
    return round(gateway - direct, 3)


class Bench:
    """The measurements of one run, direct first and then through the gateway for each load."""

    def __init__(self, backend_port: int, gateway_port: int | None, seconds: float) -> None:
        self.direct_url = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
        self.gateway_url = (
            f"http://127.0.0.1:{gateway_port}/resource_server/local/vllm/v1/chat/completions"
            if gateway_port
            else None
        )
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
        with rss_sampler(gateway_pid) as samples:
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
    plain = results["non_streaming"]
    streams = results["streaming"]["paced"]
    slow = results.get("slow_streams") or {}
    checks: dict[str, tuple[float | None, str, Callable[[float], bool]]] = {
        C1_ADDED_P50: (plain["1"].get("added_p50_ms"), "≤ 1 ms added", lambda v: v <= 1),
        C64_RPS_RATIO: (plain["64"].get("rps_ratio"), "≥ 30% of direct", lambda v: v >= 0.3),
        TTFC_ADDED_P50: (streams.get("added_ttfc_p50_ms"), "≤ 1 ms added", lambda v: v <= 1),
        SLOW_STREAMS_RSS: (slow.get("peak_rss_mb"), "< 200 MB", lambda v: v < 200),
    }
    return {
        key: {"figure": figure, "target": target, "met": None if figure is None else passes(figure)}
        for key, (figure, target, passes) in checks.items()
    }


def show(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if abs(value) < 100 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"


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
        goal = check["target"] if check else ""
        met = {True: "yes", False: "**no**", None: "—"}[check["met"]] if check else ""
        lines.append(
            f"| {measure} | {show(direct, unit)} | {show(gateway, unit)} | {difference} | {goal} | {met} |"
        )

    for level, pair in results["non_streaming"].items():
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
    for kind, pair in results["streaming"].items():
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
    return "\n".join(lines)


def run(workdir: Path, services: ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers (stopped by `services`), measure, and gather every figure."""
    backend_port = free_port()
    backend_args = ["-m", "bench.backend", "--port", str(backend_port), "--model", MODEL]
    backend = start_service("backend", LOADGEN_CPU, backend_args, workdir)
    services.callback(backend.stop)
    wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
    gateway: Service | None = None
    gateway_port: int | None = None
    if not args.direct_only:
        gateway_port = free_port()
        config = write_gateway_config(workdir, gateway_port, backend_port)
        gateway = start_service("gateway", GATEWAY_CPU, ["-m", "proxy", "--config", str(config)], workdir)
        services.callback(gateway.stop)
        wait_ready(gateway, f"http://127.0.0.1:{gateway_port}/resource_server/health")
    bench = Bench(backend_port, gateway_port, args.seconds)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "seconds_per_measure": args.seconds,
            "cpus": {"backend": LOADGEN_CPU, "loadgen": LOADGEN_CPU, "gateway": GATEWAY_CPU},
            "body": json.loads(chat_body()),
            "slow_streams": args.streams,
        },
        "non_streaming": bench.non_streaming(),
        "streaming": bench.streaming(),
    }
    if gateway is not None:
        results["slow_streams"] = bench.slow_streams(gateway.process.pid, args.streams)
        for service in (backend, gateway):
            if service.process.poll() is not None:
                raise RuntimeError(f"the {service.name} stopped during the run:\n{service.log_tail()}")
    results["targets"] = targets(results)
    return results


def failed_runs(results: dict[str, Any]) -> list[str]:
    """Measurements with errors, since their figures would be misleading if read alone."""
    found = []
    for kind in ("non_streaming", "streaming"):
        for level, pair in results[kind].items():
            for side in ("direct", "gateway"):
                if pair.get(side, {}).get("errors"):
                    found.append(f"{kind} c={level} {side}: {pair[side]['status_counts']}")
    slow = results.get("slow_streams")
    if slow and slow["loadgen"]["completed"] != slow["streams"]:
        found.append(f"slow streams: {slow['loadgen']['status_counts']}")
    return found


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
    parser.add_argument("--direct-only", action="store_true", help="measure the backend alone")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 60 or not 0 < args.streams <= 5000:
        parser.error("--seconds must be in (0, 60] and --streams in (0, 5000]")
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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nall figures: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
