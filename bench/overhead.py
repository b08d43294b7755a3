"""The benchmark's overhead section: the fake backend directly against the same backend through the
gateway, with the same load generator.

The backend and the load generator share CPU 0 and the gateway has CPU 1 to itself. Each load runs
first straight to the backend, then through the gateway: requests at concurrencies 1, 16 and 64,
then streams (paced like a model, and saturated), then many slow streams held at once while the
gateway's resident memory is sampled. The paced streams also go through nginx in the gateway's
place (one worker on CPU 1, the shipped locations), so that every run says what the hop alone adds
to a first chunk: issue 20 judges the gateway's figure beside nginx's. So does the least aiohttp
proxy (`bench/least_proxy.py`, on CPU 1 too), the floor under the gateway's figure in Python. They are
measured in `PACED_ROUNDS` rounds by one load generator that takes the four in turn
(`bench/segments.py`), as a single measure scatters too much to judge 0.5 ms.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final, cast

from bench.alternating import GATEWAY_PATH
from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    TOKEN,
    Check,
    Service,
    chat_body,
    difference,
    loadgen,
    memory_kb,
    rss_sampler,
    run_client,
    show,
    start_service,
    table_row,
    wait_ready,
    write_gateway_config,
)
from testing.ports import free_port
from testing.services.nginx import NginxServer

CONCURRENCIES: Final = (1, 16, 64)
STREAM_CONCURRENCY: Final = 16
SLOW_STREAM_DIRECTIVES: Final = "[[chunks=30]][[chunk_delay=0.5]]"
PACED: Final = "[[chunks=20]][[chunk_delay=0.02]]"
STREAM_KINDS: Final = {"paced": (PACED, 0.0), "paced, spread": (PACED, 0.4), "saturated": ("", 0.0)}
"""(directives, seconds over which the streams start). Paced streams generate like a model (50
tokens/s, 0.4 s a stream); started together they stay in step, so every 0.4 s all 16 start at once
and a first chunk's time is mostly its place in that burst (p50: about eight stream starts of CPU);
one round's added figure ranged from -1.4 to +2.5 ms between identical rounds (2026-12-05). Spread
evenly over a stream's length they start one every 25 ms, and the time to first chunk is the
gateway's own delay. Saturated streams send everything at once and measure queueing at full load."""
PACED_ROUNDS: Final = 12
"""Rounds of each paced kind, each a segment of the backend alone, the gateway, nginx and the least
aiohttp proxy in a rotating order: their added figures are the medians of the rounds' own
differences, which one disturbed round cannot move. A segment's median first chunk still scatters
by about a millisecond, and the median of twelve rounds by a few tenths from run to run
(docs/performance.md, 2026-12-05 19:59)."""
SEGMENT_SECONDS: Final = 2.0
SEGMENT_WARMUP: Final = STREAM_CONCURRENCY
"""Streams before each segment, one per connection: the connections are open from the first round on."""
THROUGH_HOPS: Final = ("paced", "paced, spread")
"""The kinds also measured through nginx and the least aiohttp proxy as the hop: saturated streams
measure queueing, not a hop."""
HOPS: Final = {"nginx": "nginx", "least": "the least aiohttp proxy"}
"""The other hops' sides in a paced kind's results (their added figures prefixed `nginx_`, `least_`),
and how the report names them."""
HOLD_LIMIT_SECONDS: Final = 60.0
C1_ADDED_P50: Final = "c1_added_p50_ms"
C64_RPS_RATIO: Final = "c64_rps_ratio"
TTFC_ADDED_P50: Final = f"ttfc{STREAM_CONCURRENCY}_added_p50_ms"
SLOW_STREAMS_RSS: Final = "slow_streams_peak_rss_mb"


class OverheadBench:
    """The measurements of one run, direct first and then through the gateway for each load."""

    def __init__(
        self, backend_port: int, gateway_port: int | None, seconds: float, hops: dict[str, str] | None = None
    ) -> None:
        """`hops`: the URLs of the other hops in the gateway's place (`HOPS`), for the paced kinds."""
        self.direct_url = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}{GATEWAY_PATH}" if gateway_port else None
        self.hops = hops or {}
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
        for kind, (directives, spread) in STREAM_KINDS.items():
            body = chat_body(f"Say hello {directives}", stream=True)
            if kind in THROUGH_HOPS:
                rounds = self._segments(body, spread)
            else:
                options = ["--stream", "--concurrency", concurrency, "--warmup", "64"]
                options += ["--spread", str(spread)]
                rounds = [self._pair(body, *options)]
            results[kind] = stream_rounds(rounds)
            print(f"streaming ({kind}), concurrency {concurrency}: done", file=sys.stderr)
        return results

    def _segments(self, body: str, spread: float) -> list[dict[str, Any]]:
        """The rounds of a paced kind, each side's segment shaped as one `bench.loadgen` measure."""
        targets = {"direct": self.direct_url, "gateway": self.gateway_url, **self.hops}
        args = ["--body", body, "--concurrency", str(STREAM_CONCURRENCY), "--spread", str(spread)]
        args += ["--rounds", str(PACED_ROUNDS), "--seconds", str(SEGMENT_SECONDS)]
        args += ["--warmup", str(SEGMENT_WARMUP)]
        for name, url in targets.items():
            if url:
                args += ["--target", name, url]
        if self.gateway_url:
            args += ["--bearer", "gateway", TOKEN]
        limit = PACED_ROUNDS * len(targets) * (SEGMENT_SECONDS + 30) + 60
        measured = run_client("load generator", LOADGEN_CPU, "bench.segments", args, limit)
        return [{side: runs[index] for side, runs in measured.items()} for index in range(PACED_ROUNDS)]

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


def stream_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind's rounds as one pair: each side's first-chunk percentiles are the medians over the
    rounds, its errors their sum, and each added figure the median of the rounds' own differences
    (listed under `added_ttfc_p50_rounds_ms`)."""
    pair: dict[str, Any] = {"rounds": len(rounds)}
    for side in rounds[0]:
        runs = [one[side] for one in rounds]
        statuses: Counter[str] = Counter()
        for run in runs:
            statuses.update(run["status_counts"])
        pair[side] = {
            "ttfc_p50_ms": _median([run["ttfc_p50_ms"] for run in runs]),
            "ttfc_p99_ms": _median([run["ttfc_p99_ms"] for run in runs]),
            "errors": sum(run["errors"] for run in runs),
            "status_counts": dict(statuses),
            "runs": runs,
        }
    for side, prefix in (("gateway", ""), *((hop, f"{hop}_") for hop in HOPS)):
        if side not in pair:
            continue
        for rank in ("p50", "p99"):
            key = f"ttfc_{rank}_ms"
            added = [difference(one[side][key], one["direct"][key]) for one in rounds]
            pair[f"{prefix}added_ttfc_{rank}_ms"] = _median(added)
            pair[f"{prefix}added_ttfc_{rank}_rounds_ms"] = added
    return pair


def _median(values: list[float | None]) -> float | None:
    """None if any round lacks the figure: a median of what remains would hide that it failed."""
    if not values or any(value is None for value in values):
        return None
    return round(statistics.median(cast(list[float], values)), 3)


def overhead(
    workdir: Path,
    services: ExitStack,
    backend: Service,
    backend_port: int,
    *,
    seconds: float,
    streams: int,
    with_gateway: bool,
) -> dict[str, Any]:
    """The backend directly against through one gateway, which is stopped at the end to free CPU 1."""
    gateway: Service | None = None
    gateway_port: int | None = None
    if with_gateway:
        gateway_port = free_port()
        config = write_gateway_config(workdir, gateway_port, backend_port)
        gateway = start_service("gateway", GATEWAY_CPU, ["-m", "proxy", "--config", str(config)], workdir)
        services.callback(gateway.stop)
        wait_ready(gateway, f"http://127.0.0.1:{gateway_port}/resource_server/health")
    with ExitStack() as hops:
        urls = {}
        if with_gateway:
            urls = {"nginx": hops.enter_context(nginx_hop(workdir, backend_port))}
            urls["least"] = hops.enter_context(least_hop(workdir, backend_port))
        bench = OverheadBench(backend_port, gateway_port, seconds, urls)
        results = {"non_streaming": bench.non_streaming(), "streaming": bench.streaming()}
    if gateway is not None:
        results["slow_streams"] = bench.slow_streams(gateway.process.pid, streams)
        for service in (backend, gateway):
            service.check_running()
        gateway.stop()
    return results


class _PinnedNginx(NginxServer):
    """nginx with its workers on the gateway's CPU (they inherit the master's affinity)."""

    def command(self, port: int) -> list[str]:
        return ["taskset", "-c", GATEWAY_CPU, *super().command(port)]


@contextmanager
def nginx_hop(workdir: Path, backend_port: int) -> Iterator[str]:
    """nginx (one worker) in the gateway's place in front of the same backend; its URL for the
    backend's chat route, which the shipped locations relay unbuffered."""
    nginx = _PinnedNginx(workdir / "nginx-hop", [f"127.0.0.1:{backend_port}"], port=free_port())
    with asyncio.Runner() as runner:
        runner.run(nginx.start())
        try:
            yield f"{nginx.url}/v1/chat/completions"
        finally:
            runner.run(nginx.close())


@contextmanager
def least_hop(workdir: Path, backend_port: int) -> Iterator[str]:
    """The least aiohttp proxy on the gateway's CPU in front of the same backend; its URL."""
    port = free_port()
    backend = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
    args = ["-m", "bench.least_proxy", "--port", str(port), "--backend", backend]
    proxy = start_service("least aiohttp proxy", GATEWAY_CPU, args, workdir)
    try:
        wait_ready(proxy, f"http://127.0.0.1:{port}/resource_server/health")
        yield f"http://127.0.0.1:{port}{GATEWAY_PATH}"
    finally:
        proxy.stop()


def overhead_checks(results: dict[str, Any]) -> dict[str, Check]:
    """Issue 20's bounds, which tightened issue 2's (1 ms at c=1 and for the first chunk)."""
    plain = results.get("non_streaming") or {}
    streams = (results.get("streaming") or {}).get("paced") or {}
    slow = results.get("slow_streams") or {}
    return {
        C1_ADDED_P50: (plain.get("1", {}).get("added_p50_ms"), "≤ 0.5 ms added", lambda v: v <= 0.5),
        C64_RPS_RATIO: (plain.get("64", {}).get("rps_ratio"), "≥ 30% of direct", lambda v: v >= 0.3),
        TTFC_ADDED_P50: (streams.get("added_ttfc_p50_ms"), "≤ 0.5 ms added", lambda v: v <= 0.5),
        SLOW_STREAMS_RSS: (slow.get("peak_rss_mb"), "< 200 MB", lambda v: v < 200),
    }


def overhead_rows(results: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    rows = []
    for level, pair in results.get("non_streaming", {}).items():
        direct, gateway = pair["direct"], pair.get("gateway", {})
        ratio = pair.get("rps_ratio")
        share = show(ratio * 100, "% of direct") if ratio is not None else "—"
        rows.append(
            table_row(
                f"c={level}: requests/s",
                direct["rps"],
                gateway.get("rps"),
                share,
                "",
                judged.get(f"c{level}_rps_ratio"),
            )
        )
        for rank in ("p50", "p99"):
            rows.append(
                table_row(
                    f"c={level}: {rank}",
                    direct[f"{rank}_ms"],
                    gateway.get(f"{rank}_ms"),
                    show(pair.get(f"added_{rank}_ms"), " ms"),
                    " ms",
                    judged.get(f"c{level}_added_{rank}_ms"),
                )
            )
    for kind, pair in results.get("streaming", {}).items():
        direct, gateway = pair["direct"], pair.get("gateway", {})
        rounds = pair.get("rounds", 1)
        over = f" (median of {rounds} rounds)" if rounds > 1 else ""
        label = f"{STREAM_CONCURRENCY} {kind} streams: time to first chunk"
        for rank in ("p50", "p99"):
            rows.append(
                table_row(
                    f"{label} {rank}{over}",
                    direct[f"ttfc_{rank}_ms"],
                    gateway.get(f"ttfc_{rank}_ms"),
                    show(pair.get(f"added_ttfc_{rank}_ms"), " ms"),
                    " ms",
                    judged.get(TTFC_ADDED_P50) if (kind, rank) == ("paced", "p50") else None,
                )
            )
        for hop in [hop for hop in HOPS if hop in pair]:
            rows.append(
                table_row(
                    f"{label} p50{over}, {HOPS[hop]} as the hop",
                    direct["ttfc_p50_ms"],
                    pair[hop]["ttfc_p50_ms"],
                    show(pair.get(f"{hop}_added_ttfc_p50_ms"), " ms"),
                    " ms",
                )
            )
    slow = results.get("slow_streams")
    if slow:
        count = f"{slow['streams']:,} slow streams"
        peak = slow["peak_rss_mb"]
        rows.append(table_row(f"{count}: gateway peak RSS", None, peak, "—", " MB", judged[SLOW_STREAMS_RSS]))
        completed = f"{slow['loadgen']['completed']}/{slow['streams']}"
        rows.append(table_row(f"{count}: completed", None, completed, "—", ""))
    return rows


def overhead_failures(results: dict[str, Any]) -> list[str]:
    """Measurements with errors, since their figures would be misleading if read alone."""
    found = []
    for kind in ("non_streaming", "streaming"):
        for level, pair in results.get(kind, {}).items():
            for side in ("direct", "gateway", *HOPS):
                if pair.get(side, {}).get("errors"):
                    found.append(f"{kind} c={level} {side}: {pair[side]['status_counts']}")
    slow = results.get("slow_streams")
    if slow and slow["loadgen"]["completed"] != slow["streams"]:
        found.append(f"slow streams: {slow['loadgen']['status_counts']}")
    return found
