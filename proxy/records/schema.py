"""The database's schema: every store's migrations in one version order, applied on connecting.

Each store declares the migrations of the tables it owns, beside the SQL that uses them
(``proxy.records.batch_store``: ``batches``; ``proxy.records.usage_store``: ``requests``;
``proxy.records.usage_rollup_tables``: the dashboard's ``usage_*`` sums; ``proxy.records.file_store``:
``files``; ``proxy.records.openai_batch_store``: ``openai_batches``; ``proxy.records.deployment_store``:
``deployment_*``). Versions
are numbered across all tables, in the order the migrations were released, and recorded in the
``schema_migrations`` table this module owns: a new migration takes the next free number, whichever
store it belongs to, and a released one is never edited, since databases in the field recorded it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

from proxy.records.batch_store import BATCHES_MIGRATIONS
from proxy.records.database import Database, Migration
from proxy.records.database_url import (
    DEFAULT_POOL_SIZE,
    DEFAULT_STATEMENT_TIMEOUT,
    DEFAULT_TIMEOUT,
    open_database,
)
from proxy.records.deployment_store import DEPLOYMENTS_MIGRATIONS
from proxy.records.file_store import FILES_MIGRATIONS
from proxy.records.openai_batch_store import OPENAI_BATCHES_MIGRATIONS
from proxy.records.usage_rollup_tables import ROLLUPS_MIGRATIONS
from proxy.records.usage_store import REQUESTS_MIGRATIONS

log = logging.getLogger(__name__)

MIGRATIONS: Final[list[Migration]] = sorted(
    [
        *BATCHES_MIGRATIONS,
        *REQUESTS_MIGRATIONS,
        *ROLLUPS_MIGRATIONS,
        *FILES_MIGRATIONS,
        *OPENAI_BATCHES_MIGRATIONS,
        *DEPLOYMENTS_MIGRATIONS,
    ]
)

_SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)
_MIGRATION_LOCK = "schema_migrations"


async def connect(
    url: str,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
    pool_size: int = DEFAULT_POOL_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
) -> Database:
    """Open the database named by ``url`` (see ``proxy.records.database_url.open_database`` for the
    timeouts) and apply the migrations it lacks."""
    database = await open_database(
        url, pool_size=pool_size, timeout=timeout, statement_timeout=statement_timeout
    )
    try:
        await migrate(database, migrations)
    except BaseException:
        await database.close()
        raise
    return database


async def migrate(database: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the missing migrations in version order and record them; the versions applied now.

    All in one transaction, so a half-applied schema never exists, and under a lock, so two gateway
    processes starting together do not both apply the same migration.
    """
    _check_migrations(migrations)
    applied_now: list[int] = []
    async with database.transaction() as tx:
        await tx.lock(_MIGRATION_LOCK)
        await tx.execute(_SCHEMA_MIGRATIONS)
        applied = {row["version"] for row in await tx.fetch("SELECT version FROM schema_migrations")}
        for version, name, statements in sorted(migrations):
            if version in applied:
                continue
            for statement in statements:
                await tx.execute(statement)
            await tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                version,
                name,
                time.time(),
            )
            applied_now.append(version)
    unknown = applied - {version for version, _, _ in migrations}
    if unknown:
        log.warning("database has migrations this gateway does not know: %s", sorted(unknown))
    if applied_now:
        log.info("database migrations applied: %s", applied_now)
    return applied_now


def _check_migrations(migrations: Sequence[Migration]) -> None:
    versions = [version for version, _, _ in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions: {sorted(versions)}")
