"""The gateway and its PostgreSQL database when the database misbehaves, on a real server with the
deployed defaults: a statement stuck behind another connection's lock is cancelled at the statement
timeout, and a gateway started while the database is down serves inference, answers 503 on the batch
routes, and writes the records it buffered once the database is back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml

from proxy.records.database import DatabaseTimeout
from proxy.records.database_url import DEFAULT_STATEMENT_TIMEOUT
from proxy.records.schema import connect
from testing.services.postgres_server import PostgresServer
from tests.conftest import Server, auth, chat, start_gateway, write_gateway_config
from tests.test_routes import assert_openai_error, call


def postgres_config(directory: Path, backend: Server, database_url: str) -> Path:
    path = write_gateway_config(directory, backend.url)
    document = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**document, "database_url": database_url}))
    return path


async def test_a_locked_table_makes_batch_listing_fail_promptly(
    postgres_server: PostgresServer, backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    url = await postgres_server.create_database("test_outage_locked")
    runner, gateway = await start_gateway(postgres_config(tmp_path, backend, url))
    holder = await asyncpg.connect(url)
    try:
        listing = f"{gateway.url}/v1/batches"
        status, document, _ = await call(http, "GET", listing, headers=auth())
        assert (status, document) == (200, [])
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE batches IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        async with http.get(listing, headers=auth(), timeout=aiohttp.ClientTimeout(total=30)) as response:
            waited = time.monotonic() - started
            assert response.status == 503 and response.headers["Retry-After"].isdigit()
            error = assert_openai_error(await response.json())
        assert error["code"] == "database_timeout" and "did not answer in time" in error["message"]
        assert DEFAULT_STATEMENT_TIMEOUT - 0.5 < waited < DEFAULT_STATEMENT_TIMEOUT + 3
        await transaction.rollback()
        status, document, _ = await call(http, "GET", listing, headers=auth())
        assert (status, document) == (200, [])
    finally:
        await holder.close()
        await runner.cleanup()
        await postgres_server.drop_database("test_outage_locked")


async def stored_ids(url: str) -> set[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT request_id FROM requests")
    except asyncpg.UndefinedTableError:  # the gateway has not reached the database (and migrated) yet
        return set()
    finally:
        await connection.close()
    return {row["request_id"] for row in rows}


async def test_a_gateway_started_without_its_database_serves_and_catches_up(
    postgres_server: PostgresServer, backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    url = await postgres_server.create_database("test_outage_start")
    await postgres_server.stop()
    try:
        runner, gateway = await start_gateway(postgres_config(tmp_path, backend, url))
    except BaseException:
        await postgres_server.start()
        raise
    try:
        ids = [f"while-down-{n}" for n in range(3)]
        for request_id in ids:
            status, document, _ = await call(
                http,
                "POST",
                f"{gateway.url}/local/vllm/v1/chat/completions",
                json=chat(),
                headers={**auth(), "X-Request-ID": request_id},
            )
            assert status == 200 and document["object"] == "chat.completion"
        for path in ("/v1/batches", "/v1/batches/some-batch"):
            async with http.get(f"{gateway.url}{path}", headers=auth()) as response:
                assert response.status == 503 and response.headers["Retry-After"].isdigit()
                error = assert_openai_error(await response.json())
                assert error["code"] == "database_unavailable"

        await postgres_server.start()
        deadline = time.monotonic() + 20
        while not set(ids) <= await stored_ids(url) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert set(ids) <= await stored_ids(url)
        status, document, _ = await call(http, "GET", f"{gateway.url}/v1/batches", headers=auth())
        assert (status, document) == (200, [])
    finally:
        await runner.cleanup()
        await postgres_server.start()
        await postgres_server.drop_database("test_outage_start")


LONG_STATEMENTS = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000)"
    " SELECT count(*) AS n FROM c",
    "postgresql": "SELECT pg_sleep(30) AS n",
}


async def test_a_statement_past_the_timeout_is_cancelled(database_url: str, database_dialect: str) -> None:
    """On both databases: the statement ends at its timeout with a clear error, and the database goes
    on serving the next one."""
    database = await connect(database_url, statement_timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseTimeout, match=r"statement timeout \(1 s\)"):
            await database.fetch(LONG_STATEMENTS[database_dialect])
        assert 0.9 < time.monotonic() - started < 4
        with pytest.raises(DatabaseTimeout):
            async with database.transaction() as tx:
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'x', 0)"
                )
                await tx.fetch(LONG_STATEMENTS[database_dialect])
        assert await database.fetchone("SELECT count(*) AS n FROM schema_migrations WHERE version = 99") == {
            "n": 0
        }
    finally:
        await database.close()
