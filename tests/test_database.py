"""The durable store on both backends (a SQLite file, a real PostgreSQL): migrations, queries,
transactions, the batch store's rules under concurrency, and PostgreSQL going away and coming back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.records.batch_store import ACTIVE, BatchRecord, BatchStore
from proxy.records.database import Database, DatabaseUnavailable, redact
from proxy.records.postgres_database import postgres_sql
from proxy.records.schema import MIGRATIONS, connect, migrate
from testing.services.postgres_server import PostgresServer


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await connect(database_url)
    yield database
    await database.close()


@pytest.fixture
def store(db: Database) -> BatchStore:
    return BatchStore(db)


def batch(
    number: int, *, username: str = "alice@uni.edu", input_file: str | None = None, **fields: object
) -> BatchRecord:
    record = BatchRecord(
        id=f"batch_{number:04d}",
        user_id="a1a1",
        username=username,
        cluster="local",
        framework="vllm",
        model="meta-llama/Meta-Llama-3.1-8B-Instruct",
        endpoint_slug="local-vllm-meta-llama-meta-llama-3.1-8b-instruct",
        input_file=input_file or f"/data/input-{number}.jsonl",
        output_folder_path=None,
        task_ids=None,
        status="pending",
        result=None,
        error=None,
        created_at=1000.0 + number,
        in_progress_at=None,
        completed_at=None,
        failed_at=None,
        updated_at=1000.0 + number,
    )
    return dataclasses.replace(record, **fields)  # type: ignore[arg-type]


# --- migrations -----------------------------------------------------------------------------------


async def test_migrations_apply_once_and_are_recorded(database_url: str) -> None:
    first = await connect(database_url)
    second = await connect(database_url)  # a second gateway process
    try:
        rows = await first.fetch("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
        assert [(row["version"], row["name"]) for row in rows] == [(v, n) for v, n, _ in MIGRATIONS]
        assert isinstance(rows[0]["applied_at"], float)
        assert await migrate(second) == []
        assert await first.fetchone("SELECT COUNT(*) AS n FROM batches") == {"n": 0}
    finally:
        await first.close()
        await second.close()


async def test_new_migrations_apply_in_order_and_a_failing_one_leaves_nothing(database_url: str) -> None:
    db = await connect(database_url)
    try:
        shipped = [version for version, _, _ in MIGRATIONS]
        later = [
            (101, "third", ["ALTER TABLE second ADD COLUMN note TEXT"]),
            (100, "second", ["CREATE TABLE second (id INTEGER PRIMARY KEY)"]),
        ]
        assert await migrate(db, [*MIGRATIONS, *later]) == [100, 101]
        broken = (102, "broken", ["CREATE TABLE fourth (id INTEGER)", "INSERT INTO nowhere (id) VALUES (1)"])
        with pytest.raises(Exception, match=r"no such table|does not exist"):
            await migrate(db, [*MIGRATIONS, *later, broken])
        versions = await db.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [row["version"] for row in versions] == [*shipped, 100, 101]
        assert await db.execute("CREATE TABLE fourth (id INTEGER)") == 0  # the failed migration left none
    finally:
        await db.close()


async def test_two_processes_starting_together_migrate_once(database_url: str) -> None:
    databases = await asyncio.gather(connect(database_url), connect(database_url))
    try:
        rows = await databases[0].fetch("SELECT version FROM schema_migrations")
        assert len(rows) == len(MIGRATIONS)
    finally:
        for database in databases:
            await database.close()


# --- queries and transactions ---------------------------------------------------------------------


async def test_execute_fetch_fetchone(db: Database) -> None:
    await db.execute(
        "CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT, size BIGINT, weight DOUBLE PRECISION)"
    )
    insert = "INSERT INTO things (id, name, size, weight) VALUES (?, ?, ?, ?)"
    assert await db.execute(insert, 1, "one?", 2**40, 1.5) == 1
    assert await db.execute(insert, 2, "two", None, None) == 1
    assert await db.execute("UPDATE things SET weight = ? WHERE id > ?", 2.5, 0) == 2
    rows = await db.fetch("SELECT id, name, size, weight FROM things WHERE name <> '?' ORDER BY id")
    assert rows == [
        {"id": 1, "name": "one?", "size": 2**40, "weight": 2.5},
        {"id": 2, "name": "two", "size": None, "weight": 2.5},
    ]
    assert await db.fetchone("SELECT name FROM things WHERE id = ?", 2) == {"name": "two"}
    assert await db.fetchone("SELECT name FROM things WHERE id = ?", 3) is None
    assert await db.execute("DELETE FROM things WHERE id = ?", 3) == 0
    assert db.dialect in ("sqlite", "postgresql")


async def test_transaction_commits_or_rolls_back(db: Database) -> None:
    await db.execute("CREATE TABLE things (id INTEGER PRIMARY KEY)")
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO things (id) VALUES (?)", 1)
        assert await tx.fetch("SELECT id FROM things") == [{"id": 1}]
    with pytest.raises(ZeroDivisionError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO things (id) VALUES (?)", 2)
            _ = 1 / 0
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO things (id) VALUES (?)", 3)
            await tx.execute("INSERT INTO things (id) VALUES (?)", 1)
    assert await db.fetch("SELECT id FROM things") == [{"id": 1}]


async def test_execute_many_is_all_or_nothing(db: Database) -> None:
    await db.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT)")
    insert = "INSERT INTO things (id, name) VALUES (?, ?)"
    await db.execute_many(insert, [(1, "one"), (2, "two")])
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await db.execute_many(insert, [(3, "three"), (1, "again")])
    assert await db.fetch("SELECT id, name FROM things ORDER BY id") == [
        {"id": 1, "name": "one"},
        {"id": 2, "name": "two"},
    ]
    await db.execute_many(insert, [])


async def test_the_database_refuses_use_inside_its_own_transaction(db: Database) -> None:
    async with db.transaction():
        with pytest.raises(RuntimeError, match="handle"):
            await db.fetch("SELECT 1 AS one")
        with pytest.raises(RuntimeError, match="handle"):
            db.transaction()
    assert await db.fetchone("SELECT 1 AS one") == {"one": 1}


async def test_other_tasks_wait_for_a_transaction(db: Database) -> None:
    await db.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER)")
    await db.execute("INSERT INTO counter (id, value) VALUES (1, 0)")

    async def increment() -> None:
        async with db.transaction() as tx:
            await tx.lock("counter")
            row = await tx.fetchone("SELECT value FROM counter WHERE id = 1")
            assert row is not None
            await asyncio.sleep(0)
            await tx.execute("UPDATE counter SET value = ? WHERE id = 1", row["value"] + 1)

    await asyncio.gather(*(increment() for _ in range(10)))
    assert await db.fetchone("SELECT value FROM counter") == {"value": 10}


# --- the batch store ------------------------------------------------------------------------------


async def test_reserve_enforces_quota_and_duplicate_input_files(store: BatchStore) -> None:
    assert await store.reserve(batch(1), max_active_per_user=2) == "added"
    assert (
        await store.reserve(batch(2, input_file="/data/input-1.jsonl"), max_active_per_user=2) == "duplicate"
    )
    assert await store.reserve(batch(3), max_active_per_user=2) == "added"
    assert await store.reserve(batch(4), max_active_per_user=2) == "quota"
    assert await store.reserve(batch(5, username="bob@other.org"), max_active_per_user=2) == "added"
    # Finishing a batch frees its quota slot and its input file.
    await store.advance("batch_0001", "completed", result='{"ok": true}')
    assert await store.reserve(batch(6, input_file="/data/input-1.jsonl"), max_active_per_user=2) == "added"
    assert await store.get("batch_0002") is None
    assert await store.get("batch_0004") is None


async def test_concurrent_reserve_from_two_processes_never_exceeds_the_quota(database_url: str) -> None:
    databases = [await connect(database_url), await connect(database_url)]
    try:
        stores = [BatchStore(database) for database in databases]
        attempts = [stores[n % 2].reserve(batch(n), max_active_per_user=3) for n in range(10)]
        outcomes = await asyncio.gather(*attempts)
        assert sorted(outcomes) == ["added"] * 3 + ["quota"] * 7
        assert len(await stores[0].for_user("alice@uni.edu")) == 3
        # The same input file from both processes at once: one wins.
        same_file = [
            stores[n % 2].reserve(batch(20 + n, username="carol", input_file="/x"), 5) for n in range(6)
        ]
        assert sorted(await asyncio.gather(*same_file)) == ["added"] + ["duplicate"] * 5
    finally:
        for database in databases:
            await database.close()


async def test_attach_discard_get(store: BatchStore) -> None:
    await store.reserve(batch(1), max_active_per_user=5)
    await store.reserve(batch(2), max_active_per_user=5)
    await store.attach("batch_0001", "task-a,task-b", "running", now=2000.0)
    await store.discard("batch_0002")
    record = await store.get("batch_0001")
    assert record == batch(
        1, task_ids="task-a,task-b", status="running", in_progress_at=2000.0, updated_at=2000.0
    )
    assert await store.get("batch_0002") is None
    assert await store.reserve(batch(2), max_active_per_user=2) == "added"  # the discarded one held no slot


async def test_for_user_and_unfinished(store: BatchStore) -> None:
    for number in (3, 1, 2):
        await store.reserve(batch(number), max_active_per_user=10)
    await store.reserve(batch(4, username="bob@other.org"), max_active_per_user=10)
    await store.advance("batch_0002", "failed", error="bad input")
    await store.advance("batch_0003", "running")

    assert [r.id for r in await store.for_user("alice@uni.edu")] == ["batch_0003", "batch_0002", "batch_0001"]
    assert [r.id for r in await store.for_user("alice@uni.edu", status="failed")] == ["batch_0002"]
    assert await store.for_user("nobody") == []
    assert [r.id for r in await store.unfinished()] == ["batch_0001", "batch_0003", "batch_0004"]
    assert [r.id for r in await store.unfinished(limit=2)] == ["batch_0001", "batch_0003"]
    assert all(r.status in ACTIVE for r in await store.unfinished())


async def test_advance_stamps_times_and_finished_stays_finished(store: BatchStore) -> None:
    await store.reserve(batch(1), max_active_per_user=5)
    assert await store.advance("batch_0001", "running", now=2000.0)
    assert await store.advance("batch_0001", "running", now=2100.0)  # still running: first stamp kept
    assert await store.advance("batch_0001", "completed", result='{"n": 3}', now=2200.0)
    record = await store.get("batch_0001")
    assert record is not None
    assert (record.status, record.in_progress_at, record.completed_at, record.failed_at) == (
        "completed",
        2000.0,
        2200.0,
        None,
    )
    assert (record.result, record.updated_at) == ('{"n": 3}', 2200.0)

    assert not await store.advance("batch_0001", "running", now=2300.0)
    assert not await store.advance("batch_0001", "failed", error="late", now=2300.0)
    assert await store.get("batch_0001") == record

    await store.reserve(batch(2), max_active_per_user=5)
    assert await store.advance("batch_0002", "failed", error="boom", now=3000.0)
    failed = await store.get("batch_0002")
    assert failed is not None
    assert (failed.status, failed.in_progress_at, failed.failed_at, failed.error) == (
        "failed",
        None,
        3000.0,
        "boom",
    )
    with pytest.raises(ValueError, match="status"):
        await store.advance("batch_0002", "cancelled")
    assert not await store.advance("no-such-batch", "running")


# --- unavailability -------------------------------------------------------------------------------


async def test_postgres_going_away_and_coming_back(postgres_server: PostgresServer) -> None:
    url = await postgres_server.create_database("test_going_away")
    db = await connect(url, timeout=2.0)
    store = BatchStore(db)
    try:
        await store.reserve(batch(1), max_active_per_user=5)
        try:
            with pytest.raises(DatabaseUnavailable):
                async with db.transaction() as tx:
                    await tx.execute("UPDATE batches SET error = ?", "lost")
                    await postgres_server.stop()  # in the middle of the transaction
                    await tx.fetch("SELECT 1")
            with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1"):
                await store.get("batch_0001")
            with pytest.raises(DatabaseUnavailable):
                async with db.transaction() as tx:
                    await tx.fetch("SELECT 1")
            with pytest.raises(DatabaseUnavailable):
                await connect(url, timeout=2.0)
        finally:
            await postgres_server.start()
        record = await store.get("batch_0001")  # the same Database reconnects by itself
        assert record is not None and (record.status, record.error) == ("pending", None)
        assert await store.reserve(batch(2), max_active_per_user=5) == "added"
    finally:
        await db.close()
        await postgres_server.drop_database("test_going_away")


async def test_sqlite_file_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable, match="unable to open"):
        await connect(f"sqlite:///{tmp_path}/missing-directory/gateway.db")


async def test_sqlite_in_memory_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = await connect("sqlite:///:memory:")
    assert memory.dialect == "sqlite"
    assert await memory.fetchone("SELECT COUNT(*) AS n FROM schema_migrations") == {"n": len(MIGRATIONS)}
    await memory.close()
    monkeypatch.chdir(tmp_path)
    relative = await connect("sqlite:///relative.db")
    await relative.close()
    assert (tmp_path / "relative.db").exists()


def test_urls_and_placeholders() -> None:
    assert (
        postgres_sql("SELECT * FROM t WHERE a = ? AND b IN (?, ?)")
        == "SELECT * FROM t WHERE a = $1 AND b IN ($2, $3)"
    )
    assert (
        postgres_sql("SELECT '?', \"a?\" -- ?\n, ? /* ? */ FROM t")
        == "SELECT '?', \"a?\" -- ?\n, $1 /* ? */ FROM t"
    )
    assert postgres_sql("SELECT 'it''s ?' WHERE x = ?") == "SELECT 'it''s ?' WHERE x = $1"
    assert redact("postgresql://gw:secret@db:5432/gw") == "postgresql://gw:***@db:5432/gw"
    assert redact("postgresql://db/gw") == "postgresql://db/gw"


async def test_unsupported_urls() -> None:
    for url in ("mysql://db/gw", "sqlite:///", "sqlite://relative.db"):
        with pytest.raises(ValueError, match="URL"):
            await connect(url)
