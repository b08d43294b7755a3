"""The benchmark's Globus Compute section: the compute path with and without the gateway, and the relay.

A fake Globus Auth and Globus Compute run in one process on CPU 0 (bench.fake_compute_server), whose
function answers at once (or after the prompt's `[[delay=S]]`). Then, with CPU 1 for the measured
side each time:

1. the baseline: bench.compute_client on CPU 1 submits through the SDK (the submissions of a moment
   in one call) and learns of results the fastest way the fake allows (its AMQP result queue: the
   fake publishes to a RabbitMQ broker it starts on CPU 0, as the service publishes), at each of
   `LEVELS`: the fake's own latency cancels out, any wait of the gateway's for a result does not;
   then the same client behind the least HTTP front (bench.compute_front), loaded from CPU 0 as the
   gateway is, at `FRONT_LEVELS`;
2. the relay's floor: bench.relay_floor on CPU 1, a relay without any of the gateway's checks, fed by
   the same function, read by bench.stream_client on CPU 0 (see 4);
3. a gateway on CPU 1 with a `GlobusComputeEndpoint` for that fake at its default settings (results
   from the queue, polls as the safety net), and wrk (bench/wrk.py) on CPU 0 with the same requests
   in flight; the difference is what the gateway adds per request, and the fake's counts say how
   many status calls per second it made; after (4), at `PAIRED_LEVELS`, the client and this
   gateway in turn, `PAIRED_ROUNDS` more times;
4. the stream relay of that gateway: bench.stream_client on CPU 0 opens 16 streams whose function
   POSTs every chunk to the gateway's callback route with its send time, paced like a model (for the
   added latency per chunk) and all at once (for the chunks per second the relay sustains);
5. a second gateway on CPU 1 whose endpoint speaks our function's protocol, so that the function
   pushes each answer to the callback route (adaptors/compute_push.py), at `PUSH_LEVELS` against
   the same baseline;
6. a third gateway on CPU 1 without the result queue (`result_queue: false`), whose results are
   only polled (adaptive, under the budget of status calls), at `POLLED_LEVELS`: what the queue saves.

Both sides of (1) and (3) also report the CPU time they spent per request: with many requests in
flight CPU 1 can be the limit, and then latency is the queue for it rather than the wait for a poll.
Against the client, the load generator's share of CPU 0 (the limit at 100 and 1,000 in flight) does
not cancel out: hence wrk, a sixth of bench.loadgen's cost (bench/wrk.py); against the front it does.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    MODEL,
    TOKEN,
    Service,
    busy_shares,
    chat_body,
    difference,
    loadgen,
    other_cpu_use,
    process_cpu_seconds,
    read_announcement,
    run_client,
    start_service,
    wait_ready,
)
from bench.compute_config import ADAPTOR_THREADS, COMPUTE_PATH, write_compute_config
from bench.compute_counts import calls_so_far, fake_calls, status_call_seconds
from bench.wrk import wrk_load
from testing.ports import free_port


@dataclass(frozen=True)
class Level:
    """One comparison: requests in flight, how long the fake's function takes (`[[delay=S]]` in the
    prompt), and the requests each side sends first (the token, connections, the poller's estimate
    of when results come)."""

    concurrency: int
    task_seconds: float = 0.0
    warm_requests: int = 500

    @property
    def key(self) -> str:
        tasks = f", tasks of {self.task_seconds:g} s" if self.task_seconds else ""
        return f"{self.concurrency}{tasks}"

    @property
    def body(self) -> str:
        return chat_body(f"Say hello [[delay={self.task_seconds:g}]]" if self.task_seconds else "Say hello")


LEVELS: Final = (Level(1), Level(1, 0.2, 20), Level(100), Level(1000))
"""Tasks of 0.2 s at c=1 show the poller where its budget does not bind on every request: one
request every 5 ms (the instant function) cannot each get a status call at 20 calls a second."""
PUSH_LEVELS: Final = (LEVELS[0], LEVELS[2], LEVELS[3])
"""Measured again through a gateway whose function pushes its answers (adaptors/compute_push.py),
against the same baseline."""
POLLED_LEVELS: Final = (LEVELS[0], LEVELS[2])
"""Measured again through a gateway without the result queue."""
BASELINE_POLL_INTERVAL: Final = 0.0
"""Without a queue the baseline would ask again as soon as an answer came; with it, it only
consumes the queue (bench/compute_client.py)."""
FRONT_LEVELS: Final = (LEVELS[0], LEVELS[2], LEVELS[3])
"""Measured again through bench.compute_front (the baseline behind the least HTTP front), with wrk on
CPU 0 as for the gateway."""
PAIRED_LEVELS: Final = (LEVELS[2], LEVELS[3])
PAIRED_ROUNDS: Final = 3
"""After its first measures, the baseline client and the default gateway are measured in turn this many
more times at each of `PAIRED_LEVELS`, each pair within seconds. At those levels a run's figures moved
by a fifth between runs minutes apart (2026-12-05); within a pair, such drift falls on both sides
alike. The issue's checks there take the median over all pairs (`paired` in the summary)."""
VARIANTS: Final = {"push": PUSH_LEVELS, "polled": POLLED_LEVELS}
"""The other gateways, after the default one, each with the levels it is measured at."""
RELAY_STREAMS: Final = 16
RELAY_KINDS: Final = {"paced": (200, 0.02), "saturated": (1000, 0.0)}
"""(chunks per stream, seconds between chunks). Paced streams post like a model generating 50 tokens/s,
so a chunk's latency is the relay's and not a queue behind other chunks; saturated streams post as fast
as the relay answers, which measures how many chunks per second it sustains (and its queue then)."""
RELAY_WARMUP_CHUNKS: Final = 10
CLIENT_SLACK_SECONDS: Final = 90.0


@dataclass
class ComputeBench:
    """One fake service for the whole section. The baseline client and the relay floor run before the
    gateway starts, so that each has CPU 1 to itself as the gateway will."""

    workdir: Path
    seconds: float
    with_gateway: bool
    relay_only: bool = False
    """Only the relay's measures (floor and gateway), for work on the relay alone."""

    @property
    def levels(self) -> tuple[Level, ...]:
        return () if self.relay_only else LEVELS

    def run(self) -> dict[str, Any]:
        with ExitStack() as services:
            fake_args = ["-m", "bench.fake_compute_server", "--result-queue", str(self.workdir / "rabbitmq")]
            fake = start_service("fake-compute", LOADGEN_CPU, fake_args, self.workdir)
            services.callback(fake.stop)
            announced = read_announcement(fake)
            # A file, so that the service account's secret stays off the command lines.
            service_file = self.workdir / "fake-compute.json"
            service_file.write_text(json.dumps(announced))
            ours = [fake.process.pid]
            levels: dict[str, dict[str, Any]] = {
                level.key: {"direct": self._direct(service_file, level, ours)} for level in self.levels
            }
            if not self.relay_only:
                for key, front in self._front(service_file, services, ours, fake).items():
                    levels[key]["front"] = front
            floors = self._floor(service_file, services, ours)
            relay = {kind: {"direct": floor} for kind, floor in floors.items()}
            if self.with_gateway:
                gateway, url = self._start_gateway(announced, services)
                ours.append(gateway.process.pid)
                for level in self.levels:
                    levels[level.key]["gateway"] = self._through_gateway(url, level, gateway, ours, fake)
                for kind, pair in relay.items():
                    target = ["--url", url, "--token", TOKEN]
                    pair["gateway"] = self._relay(kind, "gateway", target, ours, gateway)
                for level in () if self.relay_only else PAIRED_LEVELS:
                    levels[level.key]["rounds"] = [
                        {
                            "direct": self._direct(service_file, level, ours),
                            "gateway": self._through_gateway(url, level, gateway, ours, fake),
                        }
                        for _ in range(PAIRED_ROUNDS)
                    ]
                gateway.check_running()
                gateway.stop()
            for variant, variant_levels in (
                VARIANTS.items() if self.with_gateway and not self.relay_only else ()
            ):
                other, other_url = self._start_gateway(announced, services, variant)
                ours[-1] = other.process.pid
                for level in variant_levels:
                    levels[level.key][variant] = self._through_gateway(other_url, level, other, ours, fake)
                other.check_running()
                other.stop()
            fake.check_running()
            calls = fake_calls(fake)
        return summarize_compute(levels, relay, calls, self.seconds)

    def _direct(self, service_file: Path, level: Level, ours: list[int]) -> dict[str, Any]:
        """The baseline client in the gateway's place on CPU 1."""
        args = ["--service", str(service_file), "--concurrency", str(level.concurrency), "--body", level.body]
        args += ["--duration", str(self.seconds), "--warmup", str(level.warm_requests)]
        args += ["--poll-interval", str(BASELINE_POLL_INTERVAL), "--threads", str(ADAPTOR_THREADS)]
        args += ["--result-queue"] if "result_broker_url" in json.loads(service_file.read_text()) else []
        limit = self.seconds + CLIENT_SLACK_SECONDS
        with other_cpu_use(ours) as disturbance, busy_shares() as busy:
            summary = run_client("compute client", GATEWAY_CPU, "bench.compute_client", args, limit)
        print(f"compute, concurrency {level.key}, direct: done", file=sys.stderr)
        return summary | disturbance | busy

    def _front(
        self, service_file: Path, services: ExitStack, ours: list[int], fake: Service
    ) -> dict[str, dict[str, Any]]:
        """The baseline behind the least HTTP front on CPU 1, loaded as the gateway is, at each of
        `FRONT_LEVELS`; then it leaves CPU 1 to the next."""
        port = free_port()
        args = ["-m", "bench.compute_front", "--service", str(service_file), "--port", str(port)]
        args += ["--threads", str(ADAPTOR_THREADS)]
        args += ["--result-queue"] if "result_broker_url" in json.loads(service_file.read_text()) else []
        front = start_service("compute-front", GATEWAY_CPU, args, self.workdir)
        services.callback(front.stop)
        wait_ready(front, f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}{COMPUTE_PATH}"
        with_front = [*ours, front.process.pid]
        measured = {
            level.key: self._through_gateway(url, level, front, with_front, fake) for level in FRONT_LEVELS
        }
        front.check_running()
        front.stop()
        return measured

    def _floor(self, service_file: Path, services: ExitStack, ours: list[int]) -> dict[str, dict[str, Any]]:
        """Each kind of relay measure against the floor, which then leaves CPU 1 to the gateway."""
        port = free_port()
        floor = start_service(
            "relay-floor", GATEWAY_CPU, ["-m", "bench.relay_floor", "--port", str(port)], self.workdir
        )
        services.callback(floor.stop)
        wait_ready(floor, f"http://127.0.0.1:{port}/health")
        args = ["--url", f"http://127.0.0.1:{port}", "--floor-service", str(service_file)]
        measured = {kind: self._relay(kind, "floor", args, ours, floor) for kind in RELAY_KINDS}
        floor.check_running()
        floor.stop()
        return measured

    def _start_gateway(
        self, announced: dict[str, Any], services: ExitStack, variant: str = ""
    ) -> tuple[Service, str]:
        port = free_port()
        config = write_compute_config(self.workdir, port, announced, variant)
        gateway_args = ["-m", "proxy", "--config", str(config)]
        name = f"gateway-compute-{variant}" if variant else "gateway-compute"
        gateway = start_service(name, GATEWAY_CPU, gateway_args, self.workdir)
        services.callback(gateway.stop)
        wait_ready(gateway, f"http://127.0.0.1:{port}/resource_server/health")
        return gateway, f"http://127.0.0.1:{port}{COMPUTE_PATH}"

    def _through_gateway(
        self, url: str, level: Level, gateway: Service, ours: list[int], fake: Service
    ) -> dict[str, Any]:
        """Warm up in a run of its own, so that the gateway's CPU time (and the fake's count of its
        status calls) counts the measured requests only."""
        limit = self.seconds + CLIENT_SLACK_SECONDS
        concurrency = ["--concurrency", str(level.concurrency)]
        warm = ["--requests", str(level.warm_requests)]
        warmed = loadgen(url, level.body, *warm, *concurrency, token=TOKEN, limit=limit)
        if warmed["errors"]:
            raise RuntimeError(f"warming the compute gateway failed: {warmed['status_counts']}")
        gateway_side = gateway.name.startswith("gateway")
        counts_before, started = calls_so_far(fake), time.monotonic()
        calls_before = status_call_seconds(url) if gateway_side else (0.0, 0.0)
        before = process_cpu_seconds(gateway.process.pid)
        with other_cpu_use(ours) as disturbance, busy_shares() as busy:
            summary = wrk_load(
                url,
                level.body,
                concurrency=level.concurrency,
                seconds=self.seconds,
                token=TOKEN,
                workdir=self.workdir,
                limit=limit,
            )
        cpu = process_cpu_seconds(gateway.process.pid) - before
        counts, elapsed = calls_so_far(fake), time.monotonic() - started
        for count, key in (("status_polls", "status_calls_per_s"), ("submits", "submits_per_s")):
            summary[key] = round((counts.get(count, 0) - counts_before.get(count, 0)) / elapsed, 1)
        calls_after = status_call_seconds(url) if gateway_side else (0.0, 0.0)
        calls, call_seconds = calls_after[0] - calls_before[0], calls_after[1] - calls_before[1]
        summary["status_call_ms"] = round(call_seconds / calls * 1000, 2) if calls else None
        served = summary["status_counts"].get("200", 0)
        per_request = round(cpu / served * 1000, 3) if served else None
        side = {"push": "pushing gateway", "polled": "polling gateway", "front": "baseline's HTTP front"}.get(
            gateway.name.rsplit("-", 1)[-1], "gateway"
        )
        print(f"compute, concurrency {level.key}, through the {side}: done", file=sys.stderr)
        return summary | {"cpu_s": round(cpu, 3), "cpu_ms_per_request": per_request} | disturbance | busy

    def _relay(
        self, kind: str, side: str, target: list[str], ours: list[int], relay: Service
    ) -> dict[str, Any]:
        """One kind of relay measure; `target` says where the streams go (the gateway or the floor). The
        relay's CPU time per chunk counts all its work meanwhile: warm-up chunks, and for the gateway the
        submits and the polls for the tasks' ends."""
        chunks, delay = RELAY_KINDS[kind]
        args = [*target, "--model", MODEL, "--streams", str(RELAY_STREAMS), "--chunks", str(chunks)]
        args += ["--chunk-delay", str(delay), "--warmup-chunks", str(RELAY_WARMUP_CHUNKS)]
        args += ["--timeout", str(CLIENT_SLACK_SECONDS)]
        limit = 2 * CLIENT_SLACK_SECONDS + 30
        before = process_cpu_seconds(relay.process.pid)
        with other_cpu_use(list({*ours, relay.process.pid})) as disturbance, busy_shares() as busy:
            summary = run_client("stream client", LOADGEN_CPU, "bench.stream_client", args, limit)
        cpu = process_cpu_seconds(relay.process.pid) - before
        relayed = summary["chunks"] + summary["warmup_chunks"]
        per_chunk = round(cpu / relayed * 1000, 4) if relayed else None
        print(f"relay ({kind}), {RELAY_STREAMS} streams, {side}: done", file=sys.stderr)
        return summary | {"relay_cpu_s": round(cpu, 3), "cpu_ms_per_chunk": per_chunk} | disturbance | busy


def paired(pair: dict[str, Any]) -> dict[str, Any]:
    """The medians over the first measures and the paired rounds: the gateway's added p50 and its CPU
    time per request, with every pair's figures beside them."""
    pairs = [{"direct": pair["direct"], "gateway": pair["gateway"]}, *pair["rounds"]]
    added = [difference(each["gateway"]["p50_ms"], each["direct"]["p50_ms"]) for each in pairs]
    cpu = [each["gateway"]["cpu_ms_per_request"] for each in pairs]
    return {
        "pairs": len(pairs),
        "added_p50_ms": median_of(added),
        "cpu_ms_per_request": median_of(cpu),
        "added_p50_ms_each": added,
        "cpu_ms_per_request_each": cpu,
        "direct_cpu_ms_per_request_each": [each["direct"]["cpu_ms_per_request"] for each in pairs],
    }


def median_of(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return round(statistics.median(known), 3) if len(known) == len(values) and known else None


def summarize_compute(
    levels: dict[str, dict[str, Any]],
    relay: dict[str, dict[str, Any]],
    calls: dict[str, int],
    seconds: float,
) -> dict[str, Any]:
    """The settings, and the differences beside the raw figures of both sides."""
    for pair in levels.values():
        for side, prefix in (("gateway", ""), ("push", "push_"), ("polled", "polled_"), ("front", "front_")):
            if side not in pair:
                continue
            direct, gateway = pair["direct"], pair[side]
            pair[f"{prefix}added_p50_ms"] = difference(gateway["p50_ms"], direct["p50_ms"])
            pair[f"{prefix}added_p99_ms"] = difference(gateway["p99_ms"], direct["p99_ms"])
            pair[f"{prefix}added_cpu_ms_per_request"] = difference(
                gateway["cpu_ms_per_request"], direct["cpu_ms_per_request"]
            )
            pair[f"{prefix}rps_ratio"] = round(gateway["rps"] / direct["rps"], 3) if direct["rps"] else None
            if "front" in pair and side != "front":
                pair[f"{prefix}added_over_front_p50_ms"] = difference(
                    gateway["p50_ms"], pair["front"]["p50_ms"]
                )
                pair[f"{prefix}added_over_front_cpu_ms_per_request"] = difference(
                    gateway["cpu_ms_per_request"], pair["front"]["cpu_ms_per_request"]
                )
    for pair in levels.values():
        if "rounds" in pair:
            pair["paired"] = paired(pair)
    for pair in relay.values():
        if "gateway" in pair:
            floor, gateway = pair["direct"], pair["gateway"]
            pair["added_p50_ms"] = difference(gateway["latency_p50_ms"], floor["latency_p50_ms"])
            pair["added_p99_ms"] = difference(gateway["latency_p99_ms"], floor["latency_p99_ms"])
            rates = floor["chunks_per_s"], gateway["chunks_per_s"]
            pair["chunks_per_s_ratio"] = round(rates[1] / rates[0], 3) if all(rates) else None
    return {
        "direct_is": "bench.compute_client on CPU 1: the gateway's SDK calls and poller, without the gateway",
        "relay_direct_is": "bench.relay_floor on CPU 1: a relay without the gateway's checks, same function",
        "baseline_results": "from the fake's AMQP result queue (bench/compute_client.py --result-queue)",
        "front_is": "bench.compute_front on CPU 1: the baseline behind the least HTTP front, loaded by wrk",
        "load_generator": "wrk on CPU 0 (bench/wrk.py) for the gateways and the front",
        "gateway_results": "default settings: the result queue, polls as the safety net; `polled`: no queue",
        "adaptor_threads": ADAPTOR_THREADS,
        "seconds_per_measure": seconds,
        "warm_requests": {level.key: level.warm_requests for level in LEVELS},
        "cpus": {
            "fake_service_and_function": LOADGEN_CPU,
            "load_generator_and_stream_client": LOADGEN_CPU,
            "direct_client_relay_floor_and_gateway": GATEWAY_CPU,
        },
        "by_concurrency": levels,
        "relay": relay,
        "fake_calls": calls,
    }
