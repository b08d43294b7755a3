"""The dashboard on a year of records: seed N request records (default 10 million) into SQLite or
PostgreSQL, sum them into the rollup tables, then time every page's JSON endpoint.

    python -m bench.dashboard [--records N] [--database URL] [--keep] [--rounds R] [--output FILE]

The records are made by the database itself (one INSERT ... SELECT over a generated series), so
seeding 10 million takes minutes, not hours: a year of traffic from 2,000 users, most of it from a
few (the product of two uniform draws), over 3 clusters and 8 models, 3% refused or failed, a third
streamed. Each page is asked `--rounds` times as the browser asks it (a 30-day and a 365-day period,
the users page with and without a search, one user's history) through the dashboard's own query
functions; the table shows the median and the slowest. Target: under 500 ms each.

`--postgres` keeps its throwaway server's data in /dev/shm when there is one (tests/postgres_server.py):
about 3 GB of memory for 10 million records, freed when the run ends; stop a run with Ctrl-C, not
SIGKILL, or its server stays behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.dashboard import live, performance, queries
from proxy.metrics.prometheus import Metrics
from proxy.records import schema
from proxy.records.database import Database
from proxy.records.usage_rollups import roll_up, summed_until

TARGET_MS = 500
YEAR = 365 * 86400
MODELS = (
    ("polaris", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
    ("polaris", "meta-llama/Meta-Llama-3.1-70B-Instruct"),
    ("polaris", "mistralai/Mistral-7B-Instruct-v0.3"),
    ("sophia", "meta-llama/Meta-Llama-3.1-405B-Instruct"),
    ("sophia", "Qwen/Qwen2.5-72B-Instruct"),
    ("sophia", "intfloat/e5-mistral-7b-instruct"),
    ("aurora", "google/gemma-2-27b-it"),
    ("aurora", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
)


def _seed_sql(dialect: str, size: int, start: float, step: float, prefix: str) -> str:
    """``size`` records from ``start``, one every ``step`` seconds. Users come and go: in any three
    days about 120 of the 2,000 are active (a few of them heavily), each mostly on two or three of
    the models; so a day has a few hundred (user, model) pairs, as a centre's logs show, rather than
    every user on every model every day."""
    # Draws from a multiplicative hash of the row number, not random(): SQLite evaluates random()
    # anew at each use of a column of a flattened subquery, so one row's draws would disagree.
    draws = ", ".join(
        f"((n * {m} + {i * 7919}) % 1000003) / 1000003.0 AS r{i}"
        for i, m in ((1, 2654435761), (2, 40503), (3, 2246822519))
    )
    if dialect == "postgresql":
        series = f"(SELECT n, {draws} FROM generate_series(0::bigint, {size - 1}) AS n) AS s"
        integer = "::bigint"
    else:
        series = (
            f"(WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < {size - 1})"
            f" SELECT n, {draws} FROM seq) AS s"
        )
        integer = ""
    at = f"({start} + n * {step})"

    def whole(expression: str) -> str:
        return f"CAST(FLOOR({expression}) AS BIGINT)" if integer else f"CAST({expression} AS INTEGER)"

    rank = f"(({whole(f'{at} / 259200')} * 37 + {whole('r1 * r2 * 120')}) % 2000)"
    pick = f"(({rank} + {whole('r3 * r3 * 3')}) % 8)"
    model_case = " ".join(f"WHEN {i} THEN '{model}'" for i, (_, model) in enumerate(MODELS))
    cluster_case = " ".join(f"WHEN {i} THEN '{cluster}'" for i, (cluster, _) in enumerate(MODELS))
    status = "CASE WHEN r2 < 0.02 THEN 429 WHEN r2 > 0.99 THEN 500 ELSE 200 END"
    prompt, completion = whole("50 + r3 * 2000"), whole("10 + r1 * 800")
    answered = f"{status} = 200"
    return (
        "INSERT INTO requests (request_id, started_at, duration_ms, ttfc_ms, method, route, path, status,"
        " user_id, username, cluster, framework, model, endpoint_slug, stream, prompt_tokens,"
        " completion_tokens, total_tokens, task_id, client_ip, error)"
        f" SELECT '{prefix}' || n, {at}, 150 + r2 * r3 * 20000, CASE WHEN r1 < 0.33 THEN 80 + r3 * 3000 END,"
        " 'POST', '/resource_server/{cluster}/{framework}/v1/{openai_path}',"
        " '/resource_server/x/vllm/v1/chat/completions',"
        f" {status}, 'id-' || {rank}, 'user' || {rank} || '@uni.edu', CASE {pick} {cluster_case} END, 'vllm',"
        f" CASE {pick} {model_case} END, NULL, CASE WHEN r1 < 0.33 THEN 1 ELSE 0 END,"
        f" CASE WHEN {answered} THEN {prompt} END, CASE WHEN {answered} THEN {completion} END,"
        f" CASE WHEN {answered} THEN {prompt} + {completion} END, NULL, '10.0.0.1', NULL"
        f" FROM {series}"
    )


async def seed(database: Database, count: int, now: float) -> float:
    """In chunks of a million, each its own statement (PostgreSQL's statement timeout, SQLite's
    journal)."""
    existing = await database.fetchone("SELECT COUNT(*) AS n FROM requests")
    if existing is not None and int(existing["n"]) >= count:
        return 0.0
    started = time.perf_counter()
    chunk, step = 1_000_000, YEAR / count
    for offset in range(0, count, chunk):
        size = min(chunk, count - offset)
        await database.execute(
            _seed_sql(database.dialect, size, now - YEAR + offset * step, step, f"seed-{offset}-")
        )
        print(f"  seeded {offset + size:,} records ({time.perf_counter() - started:.0f} s)", flush=True)
    await database.execute("ANALYZE requests")  # as autovacuum would after such a load (PostgreSQL)
    return time.perf_counter() - started


async def measure(database: Database, rounds: int) -> dict[str, list[float]]:
    metrics = Metrics(True)
    now = time.time()
    watermark = await summed_until(database)
    month, year = queries.Span.last_days(30, now, watermark), queries.Span.last_days(365, now, watermark)
    top = await queries.users(database, month)
    someone = top["tables"]["users"]["rows"][0][0]
    pages: dict[str, Callable[[], Awaitable[Any]]] = {
        "overview (30 days)": lambda: queries.overview(database, month),
        "overview (365 days)": lambda: queries.overview(database, year),
        "users (30 days)": lambda: queries.users(database, month),
        "users (365 days)": lambda: queries.users(database, year),
        "users, searched (365 days)": lambda: queries.users(database, year, "user12"),
        "one user (365 days)": lambda: queries.user_history(database, year, someone),
        "models and clusters (30 days)": lambda: performance.performance(database, month),
        "models and clusters (365 days)": lambda: performance.performance(database, year),
        "live": lambda: live.live(database, metrics),
        "batches": lambda: live.batches(database),
    }
    timings: dict[str, list[float]] = {}
    for name, page in pages.items():
        await page()  # warm: the first read of a table pulls it into the cache
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            json.dumps(await page())  # what the endpoint does with it too
            times.append((time.perf_counter() - started) * 1000)
        timings[name] = times
    return timings


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--database", help="sqlite:///... or postgresql://... (default: a new SQLite file)")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="start a throwaway PostgreSQL (tests/postgres_server.py) and use it",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("bench/results/dashboard.json"))
    args = parser.parse_args(argv)
    if args.postgres:
        from testing.services.postgres_server import PostgresServer

        async with PostgresServer(Path(tempfile.mkdtemp(prefix="dashboard-bench-pg-"))) as server:
            return await run(await server.create_database("dashboard_bench"), args)
    return await run(
        args.database or f"sqlite:///{tempfile.mkdtemp(prefix='dashboard-bench-')}/gateway.db", args
    )


async def run(url: str, args: argparse.Namespace) -> int:
    database = await schema.connect(url, statement_timeout=3600, timeout=60)
    try:
        now = time.time()
        print(f"seeding {args.records:,} records into {url.split('@')[-1]}", flush=True)
        seeding = await seed(database, args.records, now)
        started = time.perf_counter()
        await roll_up(database, delay=7200, now=now)
        rolling = time.perf_counter() - started
        print(f"seeded in {seeding:.0f} s, summed into the rollups in {rolling:.0f} s", flush=True)
        timings = await measure(database, args.rounds)
    finally:
        await database.close()
    print(
        f"\n| page ({args.records:,} records, {url.split(':')[0]}) | median ms | slowest ms"
        f" | under {TARGET_MS} ms |"
    )
    print("|---|---:|---:|---|")
    for name, times in timings.items():
        print(
            f"| {name} | {statistics.median(times):.0f} | {max(times):.0f}"
            f" | {'yes' if max(times) < TARGET_MS else 'NO'} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "records": args.records,
                "database": url.split(":")[0],
                "seed_seconds": seeding,
                "rollup_seconds": rolling,
                "timings_ms": timings,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
