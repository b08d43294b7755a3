"""How many request records are kept and for how long (issue 19.16): requests without a user are
sampled, every record is pruned past the retention, by the gateway or `usage prune`, in SQLite and a
real PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.records import record_keeping
from proxy.records.record import RequestRecord
from proxy.records.schema import connect
from proxy.records.usage_store import UsageStore
from tests.support import Server, auth, start_gateway, value, write_gateway_config

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def configured(tmp_path: Path, backend: Server, database_url: str, **request_log: Any) -> Path:
    config = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(config.read_text())
    document |= {"database_url": database_url, "request_log": {"stdout": False, **request_log}}
    config.write_text(yaml.safe_dump(document))
    return config


async def stored(database_url: str) -> list[dict[str, Any]]:
    database = await connect(database_url)
    try:
        return await database.fetch("SELECT request_id, user_id, started_at FROM requests")
    finally:
        await database.close()


async def test_requests_without_a_user_are_sampled(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    config = configured(tmp_path, backend, database_url, unauthenticated_per_minute=5)
    runner, gateway = await start_gateway(config)
    try:
        for number in range(30):
            headers = {"Authorization": "Bearer wrong", "X-Request-ID": f"anon-{number}"}
            async with http.get(f"{gateway.url}/whoami", headers=headers) as response:
                assert response.status == 401
        for number in range(3):
            async with http.get(
                f"{gateway.url}/whoami", headers={**auth(), "X-Request-ID": f"alice-{number}"}
            ):
                pass
        await asyncio.sleep(0.2)
        async with http.get(gateway.url.removesuffix("/resource_server") + "/metrics") as response:
            metrics = await response.text()
    finally:
        await runner.cleanup()
    rows = await stored(database_url)
    anonymous = [row for row in rows if row["user_id"] is None]
    assert 5 <= len(anonymous) <= 6, "a burst of five, then one every twelve seconds"
    assert sorted(row["request_id"] for row in rows if row["user_id"]) == ["alice-0", "alice-1", "alice-2"]
    assert value(metrics, "gateway_log_records_sampled_out_total") == 30 - len(anonymous)
    assert value(metrics, "gateway_requests_total", status_class="4xx") == 30, "all counted in the rates"


def record(request_id: str, started_at: float) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, started_at=started_at, duration_ms=1.0, ttfc_ms=None, method="POST",
        route="/r", path="/p", status=200, user_id="a", username="alice@uni.edu", cluster=None,
        framework=None, model=None, endpoint_slug=None, stream=False, prompt_tokens=1,
        completion_tokens=1, total_tokens=2, task_id=None, client_ip=None, error=None,
    )  # fmt: skip


async def prune_command(config: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "usage", "prune", "--config", str(config), *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_records_past_the_retention_are_deleted(
    backend: Server, tmp_path: Path, database_url: str
) -> None:
    now = time.time()
    database = await connect(database_url)
    try:
        old = [record(f"old-{n}", now - 100 * DAY + n) for n in range(25)]
        await UsageStore(database).add_many([*old, record("month", now - 10 * DAY), record("new", now)])
    finally:
        await database.close()
    config = configured(tmp_path, backend, database_url)
    assert await prune_command(config) == (
        2, "", f"{config}: request_log.retention_days is not set; say --before\n"
    )  # fmt: skip

    kept = configured(tmp_path, backend, database_url, retention_days=30)
    runner, _ = await start_gateway(kept)
    try:
        deadline = time.monotonic() + 5
        while len(await stored(database_url)) > 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    assert sorted(row["request_id"] for row in await stored(database_url)) == ["month", "new"]

    code, out, _ = await prune_command(config, "--before", "7d")
    assert code == 0 and out.startswith("1 request records started before ")
    assert [row["request_id"] for row in await stored(database_url)] == ["new"]


async def test_pruning_goes_in_chunks(database_url: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(record_keeping, "PRUNE_CHUNK", 4)
    database = await connect(database_url)
    try:
        await UsageStore(database).add_many([record(f"r{n}", 1000.0 + n) for n in range(10)])
        assert await record_keeping.prune(database, 1008.0) == 8
        rows = await database.fetch("SELECT request_id FROM requests")
        assert sorted(row["request_id"] for row in rows) == ["r8", "r9"]
    finally:
        await database.close()
