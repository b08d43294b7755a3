"""Closed-loop load from wrk, the compiled HTTP benchmarking tool (Debian package `wrk`).

Why not bench.loadgen here. The Compute section compares a gateway with a baseline client that drives
itself (bench/compute_client.py), while the gateway needs a load generator on CPU 0, beside the fake
service and its broker. At 100 and 1,000 requests in flight CPU 0 is the limit, so the load
generator's own CPU time per request lengthens every request through the gateway, and none through
the client: measured on the AMD VM at 100 in flight, bench.loadgen spends 0.22 ms of CPU 0 per
request, wrk 0.035 ms. With bench.loadgen the gateway's "added" time was mostly the load generator's.

wrk keeps `concurrency` connections, each with one request in flight, for `seconds`, and reports the
latency of every response (in µs, exact up to the timeout); a Lua script (below) sends the body with
the headers, counts the responses by status, and prints one JSON line. The percentiles, rates and
counts are then given the keys bench.loadgen's summary uses, so that reports read either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

from bench.common import LOADGEN_CPU

SCRIPT: Final = """
wrk.method = "POST"
local file = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
if os.getenv("WRK_TOKEN") ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_TOKEN")
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
statuses = {}
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      counts[#counts + 1] = string.format('"%d": %d', status, count)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"mean_us": %.1f, "connect": %d, "read": %d, "write": %d, "timeout": %d, '
      .. '"status_counts": {%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, e.connect, e.read, e.write, e.timeout,
    table.concat(counts, ", ")))
end
"""
MARK: Final = "WRK "


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_load(
    url: str, body: str, *, concurrency: int, seconds: float, token: str | None, workdir: Path, limit: float
) -> dict[str, Any]:
    """`concurrency` requests in flight for `seconds` from wrk (one thread) on the load generator's
    CPU; the summary has bench.loadgen's keys, and `socket_errors` by kind."""
    if not wrk_available():
        raise RuntimeError(
            "the Compute benchmark needs wrk: run scripts/test-deps --bench (or apt-get install wrk)"
        )
    script, body_file = workdir / "wrk-post.lua", workdir / "wrk-body.json"
    script.write_text(SCRIPT)
    body_file.write_text(body)
    command = ["taskset", "-c", LOADGEN_CPU, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s"]
    command += [f"--timeout={limit:g}s", "-s", str(script), url]
    environment = os.environ | {"WRK_BODY_FILE": str(body_file), "WRK_TOKEN": token or ""}
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=seconds + limit, env=environment, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {seconds + limit:g} s") from None
    output = done.stdout.decode(errors="replace")
    line = next((line for line in output.splitlines() if line.startswith(MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({done.returncode}):\n{output}\n{done.stderr.decode(errors='replace')}"
        )
    return summary_of(json.loads(line[len(MARK) :]), concurrency)


def summary_of(raw: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """wrk's figures under bench.loadgen's keys: a response of 400 or more and a socket error are
    both errors; latencies are of every response."""
    elapsed = raw["duration_us"] / 1e6
    statuses: dict[str, int] = raw["status_counts"]
    socket_errors = {kind: raw[kind] for kind in ("connect", "read", "write", "timeout")}
    failed = sum(count for status, count in statuses.items() if int(status) >= 400)
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "errors": failed + sum(socket_errors.values()),
        "status_counts": statuses,
        "socket_errors": socket_errors,
        "elapsed_s": round(elapsed, 3),
        "rps": round(raw["requests"] / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(raw["p50_us"] / 1000, 3),
        "p90_ms": round(raw["p90_us"] / 1000, 3),
        "p99_ms": round(raw["p99_us"] / 1000, 3),
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "load_generator": "wrk",
    }
