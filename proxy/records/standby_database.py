"""The gateway's database handle when the database may be away at start-up.

Inference needs no database: only batches and the stored request records do. So a gateway whose
database cannot be reached when it starts serves anyway; until a background task connects (and
migrates), every statement raises ``DatabaseUnavailable``, which the batch routes answer with a 503
and the request records' sink answers by keeping its (bounded) buffer and retrying. Once connected,
the underlying database reconnects by itself (see ``proxy.records.postgres_database``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from proxy.records.database import Database, DatabaseUnavailable, Row, Transaction, redact
from proxy.records.schema import connect
from proxy.settings.database import DatabaseSettings

log = logging.getLogger(__name__)


class StandbyDatabase(Database):
    """Delegates to the connected database; refuses with ``DatabaseUnavailable`` until there is one."""

    def __init__(self, url: str, settings: DatabaseSettings) -> None:
        super().__init__()
        self.dialect = "postgresql" if url.startswith("postgres") else "sqlite"
        self._url = url
        self._settings = settings
        self._database: Database | None = None
        self._connecting: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, url: str, settings: DatabaseSettings) -> StandbyDatabase:
        """One attempt now; if the database is unavailable, keep trying in the background. Any other
        error (a bad URL, a refused password, a failing migration) is a misconfiguration and stops
        the start."""
        standby = cls(url, settings)
        try:
            await standby._connect()
        except DatabaseUnavailable as exc:
            log.warning(
                "database %s unavailable at start-up (%s); serving without it, retrying every %g s",
                redact(url),
                exc,
                settings.reconnect_seconds,
            )
            standby._connecting = asyncio.create_task(standby._keep_connecting(), name="database-connect")
        return standby

    @property
    def connected(self) -> bool:
        return self._database is not None

    async def _connect(self) -> None:
        self._database = await connect(
            self._url,
            timeout=self._settings.connect_timeout_seconds,
            statement_timeout=self._settings.statement_timeout_seconds,
        )

    async def _keep_connecting(self) -> None:
        while self._database is None:
            await asyncio.sleep(self._settings.reconnect_seconds)
            try:
                await self._connect()
            except DatabaseUnavailable:
                continue
            except Exception:
                log.exception("database %s: connecting failed; retrying", redact(self._url))
                continue
            log.info("database %s connected", redact(self._url))

    def _current(self) -> Database:
        if self._database is None:
            raise DatabaseUnavailable(f"database {redact(self._url)} has not been reached yet")
        return self._database

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._current().execute(sql, *params)

    async def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._current().execute_many(sql, rows)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return await self._current().fetch(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        return await self._current().fetchone(sql, *params)

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        return self._current().transaction()

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        if self._database is not None:
            await self._database.close()
