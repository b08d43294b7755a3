"""What every part of the benchmark shares: its servers as pinned processes, the load generator, and the
meter of CPU time taken by processes outside the benchmark.

The load generator and the fake services share CPU 0 and the gateway has CPU 1 to itself, so that the
gateway's figures are not disturbed by the processes that feed it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
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

from testing.services.base import stopped_with_parent

ROOT: Final = Path(__file__).resolve().parent.parent
MODEL: Final = "bench/model"
TOKEN: Final = "bench-token"
LOADGEN_CPU: Final = "0"
GATEWAY_CPU: Final = "1"
START_SECONDS: Final = 30.0
STATIC_AUTH: Final = {"provider": "static", "static": {"tokens_file": "tokens.yaml"}}
NO_LIMITS: Final = {"requests_per_second": 0, "concurrent_per_user": 0}
"""The load generator is one user sending thousands of requests a second: per-user limits off."""
RSS_SAMPLE_SECONDS: Final = 0.2
BENCH_CPUS: Final = (int(LOADGEN_CPU), int(GATEWAY_CPU))
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
Check = tuple[float | None, str, Callable[[float], bool]]
"""A target of the run: its figure (None when not measured), how it reads, and whether a figure meets it."""


def tokens_document() -> dict[str, Any]:
    """The static provider's tokens file: the one client every gateway of a run knows."""
    return {
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
    }


def chat_body(content: str = "Say hello", *, stream: bool = False) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body)


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

    def check_running(self) -> None:
        """A server that died during a measure makes its figures meaningless: the run stops."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the {self.name} stopped during the run:\n{self.log_tail()}")

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


def start_service(
    name: str,
    cpu: str,
    args: list[str],
    workdir: Path,
    *,
    stdout: Path | None = None,
    cwd: Path = ROOT,
    python: str = sys.executable,
) -> Service:
    """Start `args` under `python` (this one by default) on `cpu` in `cwd`; its output goes to a log
    in `workdir`, or only its stderr if `stdout` names another file for its standard output. A run
    killed outright stops it too (SIGTERM, as `Service.stop` sends first)."""
    log = workdir / f"{name}.log"
    with ExitStack() as files:
        output = files.enter_context(log.open("wb"))
        process = subprocess.Popen(
            [*stopped_with_parent(signal.SIGTERM), "taskset", "-c", cpu, python, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=files.enter_context(stdout.open("wb")) if stdout else output,
            stderr=output if stdout else subprocess.STDOUT,
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


def run_client(name: str, cpu: str, module: str, args: list[str], limit: float) -> dict[str, Any]:
    """Run a measuring client to its end on `cpu` and return the JSON object it prints."""
    command = ["taskset", "-c", cpu, sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {name} did not finish within {limit:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"the {name} failed:\n{done.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def loadgen(url: str, body: str, *extra: str, token: str | None, limit: float) -> dict[str, Any]:
    """Run the load generator on the backend's CPU and return its JSON summary."""
    args = ["--url", url, "--body", body, *extra]
    if token:
        args += ["--token", token]
    return run_client("load generator", LOADGEN_CPU, "bench.loadgen", args, limit)


def difference(gateway: float | None, direct: float | None) -> float | None:
    if gateway is None or direct is None:
        return None
    return round(gateway - direct, 3)


def read_announcement(service: Service, seconds: float = START_SECONDS) -> dict[str, Any]:
    """The fakes of Globus services have no health route and pick their own ports: they print their URLs
    once listening."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in service.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and "auth_url" in line:
                announced: dict[str, Any] = json.loads(line)
                return announced
        if service.process.poll() is not None:
            raise RuntimeError(
                f"the {service.name} exited with status {service.process.returncode}:\n{service.log_tail()}"
            )
        time.sleep(0.1)
    raise RuntimeError(f"the {service.name} did not announce its URLs within {seconds:g} s")


def warm(url: str, count: int) -> None:
    """A few requests one at a time: the first fills the auth cache, so no measure pays for Globus."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    for _ in range(count):
        request = urllib.request.Request(url, data=chat_body().encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"warming {url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(f"warming {url} failed: {exc}") from None


def busy_cpu_seconds(cpus: tuple[int, ...]) -> float:
    """Time the CPUs spent on anything but idling, steal included (the hypervisor's other guests)."""
    names = {f"cpu{cpu}" for cpu in cpus}
    busy = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name in names:
                # user nice system idle iowait irq softirq steal; guest time is already in user and nice.
                values = [int(value) for value in fields[:8]]
                busy += sum(values) - values[3] - values[4]
    return busy / CLOCK_TICKS


def own_cpu_seconds(pids: list[int]) -> float:
    """CPU time of the benchmark: this process, its reaped children (the load generator) and `pids`."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + sum(process_cpu_seconds(pid) for pid in pids)


def process_cpu_seconds(pid: int) -> float:
    """CPU time a running process has used so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime and stime


@contextmanager
def busy_shares() -> Iterator[dict[str, float]]:
    """How busy each of CPUs 0 and 1 was while the block ran (by anyone, interrupts and steal included):
    a CPU near 1.0 is what limited the measure. The kernel samples these times at each tick, and a
    mostly idle tickless CPU can miss short bursts, so a low figure says "not the limit" rather than
    an exact share."""
    figures: dict[str, float] = {}
    started = time.monotonic()
    before = {cpu: busy_cpu_seconds((cpu,)) for cpu in BENCH_CPUS}
    yield figures
    elapsed = time.monotonic() - started
    for cpu, busy in before.items():
        figures[f"cpu{cpu}_busy_share"] = round((busy_cpu_seconds((cpu,)) - busy) / elapsed, 3)


@contextmanager
def other_cpu_use(pids: list[int]) -> Iterator[dict[str, float]]:
    """The share of CPUs 0 and 1 that processes outside the benchmark took while the block ran: on a
    shared machine they can move a measure by more than the difference being judged."""
    figures: dict[str, float] = {}
    started, busy, own = time.monotonic(), busy_cpu_seconds(BENCH_CPUS), own_cpu_seconds(pids)
    yield figures
    other = busy_cpu_seconds(BENCH_CPUS) - busy - (own_cpu_seconds(pids) - own)
    elapsed = time.monotonic() - started
    figures["other_cpu_share"] = round(max(0.0, other) / (len(BENCH_CPUS) * elapsed), 3)


def show(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if abs(value) < 100 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"


def table_row(
    measure: str,
    direct: Any,
    gateway: Any,
    difference: str,
    unit: str,
    check: dict[str, Any] | None = None,
) -> str:
    """One line of the table, shared by every section's rows."""
    goal = check["target"] if check else ""
    met = {True: "yes", False: "**no**", None: "—"}[check["met"]] if check else ""
    return f"| {measure} | {show(direct, unit)} | {show(gateway, unit)} | {difference} | {goal} | {met} |"


def write_documents(workdir: Path, documents: dict[str, Any]) -> None:
    """A gateway's configuration files, each document as YAML under its file name in `workdir`."""
    for filename, document in documents.items():
        (workdir / filename).write_text(yaml.safe_dump(document, sort_keys=False))


def write_gateway_config(
    workdir: Path,
    gateway_port: int,
    backend_port: int,
    *,
    auth: dict[str, Any] = STATIC_AUTH,
    name: str = "gateway.yaml",
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write a gateway configuration as `name`, with `settings` added to its top level; every gateway of a
    run shares the other documents."""
    backend = f"http://127.0.0.1:{backend_port}"
    documents: dict[str, Any] = {
        name: {
            "server": {"host": "127.0.0.1", "port": gateway_port},
            "auth": auth,
            "limits": NO_LIMITS,
            "endpoints_file": "endpoints.yaml",
            "clusters_file": "clusters.yaml",
            **(settings or {}),
        },
        "tokens.yaml": tokens_document(),
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
    write_documents(workdir, documents)
    return workdir / name


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
def rss_sampler(measure: Callable[[], int]) -> Iterator[list[int]]:
    """Sample resident memory (`measure`, in kB) in the background while the block runs, until the
    block ends or the process is gone."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(measure())
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
