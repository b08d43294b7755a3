"""The benchmark's batches section: an OpenAI batch of 10,000 lines against the same lines sent live,
and what a running batch does to live requests.

One gateway on CPU 1 and the fake backend on CPU 0. Three measures, in order:
- live requests alone, at a low concurrency (`LIVE_CONCURRENCY`): their p50;
- the batch's 10,000 lines sent live at the batch's concurrency (`concurrent_per_batch`): the
  throughput the runner is compared with;
- the batch itself, uploaded and run by the gateway's runner, while the same live requests as in
  the first measure run beside it (for a little less time than the batch takes, so that every live
  request meets the batch): the batch's lines per second, and the live p50 during it.

Target: the live p50 during the batch within 20% of the live p50 alone.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

import openai

from bench.common import (
    GATEWAY_CPU,
    LOADGEN_CPU,
    MODEL,
    TOKEN,
    Check,
    chat_body,
    loadgen,
    show,
    start_service,
    table_row,
    wait_ready,
    warm,
    write_gateway_config,
)
from testing.ports import free_port

LINES: Final = 10_000
BATCH_CONCURRENCY: Final = 16
LIVE_CONCURRENCY: Final = 4
LIVE_P50_RATIO: Final = "batches_live_p50_ratio"
TARGET_RATIO: Final = 1.2


class BatchBench:
    def __init__(self, workdir: Path, seconds: float, lines: int = LINES) -> None:
        self.workdir = workdir
        self.seconds = seconds
        self.lines = lines

    def run(self) -> dict[str, Any]:
        with ExitStack() as services:
            backend_port, gateway_port = free_port(), free_port()
            backend_args = ["-m", "testing.fake_vllm", "--port", str(backend_port), "--model", MODEL]
            backend = start_service("batches-backend", LOADGEN_CPU, backend_args, self.workdir)
            services.callback(backend.stop)
            wait_ready(backend, f"http://127.0.0.1:{backend_port}/health")
            limits = {
                f"concurrent_{scope}": BATCH_CONCURRENCY for scope in ("per_batch", "per_user", "total")
            }
            settings = {
                "database_url": f"sqlite:///{self.workdir / 'batches.db'}",
                "openai_batches": {**limits, "poll_seconds": 0.2, "storage_dir": "batch-files"},
            }
            config = write_gateway_config(
                self.workdir, gateway_port, backend_port, name="batches-gateway.yaml", settings=settings
            )
            gateway_args = ["-m", "proxy", "--config", str(config)]
            gateway = start_service("batches-gateway", GATEWAY_CPU, gateway_args, self.workdir)
            services.callback(gateway.stop)
            base = f"http://127.0.0.1:{gateway_port}/resource_server"
            wait_ready(gateway, f"{base}/health")
            url = f"{base}/local/vllm/v1/chat/completions"
            warm(url, 50)
            alone = self._live(url, self.seconds, LIVE_CONCURRENCY)
            print("batches: live alone done", file=sys.stderr)
            options = ["--requests", str(self.lines), "--concurrency", str(BATCH_CONCURRENCY)]
            lines_live = loadgen(url, chat_body(), *options, token=TOKEN, limit=600)
            print("batches: lines sent live done", file=sys.stderr)
            during, batch = self._batch(base, url, float(lines_live["elapsed_s"]))
            print("batches: batch done", file=sys.stderr)
        return summarize(alone, lines_live, during, batch, self.lines)

    def _live(self, url: str, seconds: float, concurrency: int) -> dict[str, Any]:
        options = ["--duration", str(seconds), "--concurrency", str(concurrency), "--warmup", "20"]
        return loadgen(url, chat_body(), *options, token=TOKEN, limit=seconds + 90)

    def _batch(self, base: str, url: str, live_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
        api = openai.OpenAI(base_url=f"{base}/local/vllm/v1", api_key=TOKEN, max_retries=0)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
        text = "".join(
            json.dumps({"custom_id": f"n{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            + "\n"
            for i in range(self.lines)
        )
        uploaded = api.files.create(file=("bench.jsonl", text.encode()), purpose="batch")
        batch = api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            while api.batches.retrieve(batch.id).status == "validating":
                time.sleep(0.05)
            live = pool.submit(self._live, url, max(1.0, live_seconds * 0.8), LIVE_CONCURRENCY)
            while (current := api.batches.retrieve(batch.id)).status not in (
                "completed",
                "failed",
                "cancelled",
            ):
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            during = live.result()
        counts = current.request_counts
        report = {
            "status": current.status,
            "elapsed_s": round(elapsed, 3),
            "lines_per_s": round(self.lines / elapsed, 1),
            "completed": counts.completed if counts else None,
            "failed": counts.failed if counts else None,
        }
        return during, report


def summarize(
    alone: dict[str, Any],
    lines_live: dict[str, Any],
    during: dict[str, Any],
    batch: dict[str, Any],
    lines: int,
) -> dict[str, Any]:
    ratio = (
        round(during["p50_ms"] / alone["p50_ms"], 3) if during.get("p50_ms") and alone.get("p50_ms") else None
    )
    return {
        "lines": lines,
        "batch_concurrency": BATCH_CONCURRENCY,
        "live_concurrency": LIVE_CONCURRENCY,
        "live_alone": alone,
        "lines_sent_live": lines_live,
        "live_during_batch": during,
        "batch": batch,
        "live_p50_ratio": ratio,
    }


def batch_checks(batches: dict[str, Any]) -> dict[str, Check]:
    target = f"live p50 during a batch ≤ {TARGET_RATIO:g} times without"
    return {LIVE_P50_RATIO: (batches.get("live_p50_ratio"), target, lambda v: v <= TARGET_RATIO)}


def batch_rows(batches: dict[str, Any], judged: dict[str, Any]) -> list[str]:
    """Lines sent live under Direct, the batch under Gateway."""
    live, batch = batches["lines_sent_live"], batches["batch"]
    share = f"{show(batch['lines_per_s'] / live['rps'] * 100, '%')} of live" if live["rps"] else "—"
    prefix = f"batch of {batches['lines']} lines, c={batches['batch_concurrency']}, live → batch"
    alone, during = batches["live_alone"], batches["live_during_batch"]
    ratio = batches.get("live_p50_ratio")
    return [
        table_row(f"{prefix}: lines/s", live["rps"], batch["lines_per_s"], share, ""),
        table_row(
            f"live p50 c={batches['live_concurrency']}, alone → during the batch",
            alone["p50_ms"],
            during["p50_ms"],
            "—" if ratio is None else f"x{ratio:g}",
            " ms",
            judged.get(LIVE_P50_RATIO),
        ),
    ]


def batch_failures(batches: dict[str, Any]) -> list[str]:
    found = [
        f"batches {name}: {batches[name]['status_counts']}"
        for name in ("live_alone", "lines_sent_live", "live_during_batch")
        if batches.get(name, {}).get("errors")
    ]
    batch = batches.get("batch") or {}
    if batch and (batch.get("status") != "completed" or batch.get("failed")):
        found.append(f"batches batch: {batch}")
    return found
