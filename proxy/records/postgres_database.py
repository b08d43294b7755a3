"""The PostgreSQL driver: a server several gateway processes behind a load balancer share.

An asyncpg pool; statements keep the dialect-neutral ``?`` placeholders of their callers, translated
here to ``$1, $2, ...``. Losing the server, before or during a statement, raises
``DatabaseUnavailable``; a statement past the server's statement_timeout raises ``DatabaseTimeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any

import asyncpg

from proxy.records.database import (
    Database,
    DatabaseTimeout,
    DatabaseUnavailable,
    Dialect,
    Row,
    Transaction,
    redact,
)

STATEMENT_TIMEOUT_MARGIN = 5.0
"""How much longer than the server's statement_timeout the client waits for an answer: the server
cancels a statement at its timeout, the client's own deadline catches a server that stopped answering."""

# Connection-level failures only: a bad query or a constraint violation is the caller's bug, not an outage.
_POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


def lock_key(key: str) -> int:
    """A stable signed 64-bit number for a text key, as PostgreSQL advisory locks want (the same in every
    process, unlike Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


@lru_cache(maxsize=512)
def postgres_sql(sql: str) -> str:
    """``?`` placeholders as ``$1, $2, ...``, leaving quoted text and comments alone."""
    out: list[str] = []
    number = 0
    index = 0
    while index < len(sql):
        char = sql[index]
        end = _skip_quoted(sql, index)
        if end > index:
            out.append(sql[index:end])
            index = end
            continue
        if char == "?":
            number += 1
            out.append(f"${number}")
        else:
            out.append(char)
        index += 1
    return "".join(out)


def _skip_quoted(sql: str, index: int) -> int:
    """Where a string literal, quoted identifier or comment starting at ``index`` ends (``index`` if none).

    A doubled quote inside a literal ends it and starts another at once, so it needs no special case.
    """
    if sql[index] in "'\"":
        end = sql.find(sql[index], index + 1)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("--", index):
        end = sql.find("\n", index)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("/*", index):
        end = sql.find("*/", index + 2)
        return len(sql) if end < 0 else end + 2
    return index


def _rowcount(status: str) -> int:
    """asyncpg reports a command tag ("INSERT 0 3", "UPDATE 2", "CREATE TABLE"): its count, if any."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PostgresTransaction(Transaction):
    """Queries on one pooled asyncpg connection (inside a transaction, or a single autocommit statement)."""

    dialect: Dialect = "postgresql"

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def execute(self, sql: str, *params: Any) -> int:
        return _rowcount(await self._connection.execute(postgres_sql(sql), *params))

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return [dict(record) for record in await self._connection.fetch(postgres_sql(sql), *params)]

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        record = await self._connection.fetchrow(postgres_sql(sql), *params)
        return None if record is None else dict(record)

    async def lock(self, key: str) -> None:
        await self._connection.execute("SELECT pg_advisory_xact_lock($1)", lock_key(key))


class PostgresDatabase(Database):
    """An asyncpg pool; connections the server dropped are replaced when next acquired, so the Database
    recovers by itself when PostgreSQL comes back."""

    dialect: Dialect = "postgresql"

    def __init__(self, pool: Any, url: str, timeout: float, statement_timeout: float) -> None:
        super().__init__()
        self._pool = pool
        self._where = redact(url)
        self._timeout = timeout
        self._statement_timeout = statement_timeout

    @classmethod
    async def open(
        cls, url: str, pool_size: int, timeout: float, statement_timeout: float
    ) -> PostgresDatabase:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=0,  # no background reconnect loop (and its log) while the server is down
                max_size=pool_size,
                timeout=timeout,
                command_timeout=statement_timeout + STATEMENT_TIMEOUT_MARGIN,
                server_settings={
                    "application_name": "inference-gateway",
                    "statement_timeout": str(max(1, round(statement_timeout * 1000))),
                },
            )
        except _POSTGRES_UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"postgresql database {redact(url)}: {_describe(exc)}") from exc
        return cls(pool, url, timeout, statement_timeout)

    async def execute(self, sql: str, *params: Any) -> int:
        self._refuse_inside_transaction()
        async with self._connection() as connection:
            return await _PostgresTransaction(connection).execute(sql, *params)

    async def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """asyncpg's executemany is atomic: one implicit transaction for all rows."""
        self._refuse_inside_transaction()
        async with self._connection() as connection:
            await connection.executemany(postgres_sql(sql), rows)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        self._refuse_inside_transaction()
        async with self._connection() as connection:
            return await _PostgresTransaction(connection).fetch(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        self._refuse_inside_transaction()
        async with self._connection() as connection:
            return await _PostgresTransaction(connection).fetchone(sql, *params)

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        self._refuse_inside_transaction()
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        with self._in_transaction():
            async with self._connection() as connection:
                transaction = connection.transaction()
                await transaction.start()
                try:
                    yield _PostgresTransaction(connection)
                except BaseException:
                    # A connection the server dropped has nothing left to roll back (asyncpg would raise
                    # about the closed connection and hide why it closed).
                    if not _lost(connection):
                        await transaction.rollback()
                    raise
                await transaction.commit()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; losing the server, before or during the block, is DatabaseUnavailable."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as connection:
                try:
                    yield connection
                except asyncpg.InterfaceError as exc:
                    if _lost(connection):
                        raise self._unavailable(exc) from exc
                    raise
        except asyncpg.QueryCanceledError as exc:
            message = f"a statement ran past the statement timeout ({self._statement_timeout:g} s), cancelled"
            raise DatabaseTimeout(f"postgresql database {self._where}: {message}") from exc
        except _POSTGRES_UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"postgresql database {self._where}: {_describe(exc)}")

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except TimeoutError:
            self._pool.terminate()


def _lost(connection: Any) -> bool:
    """Whether the server dropped this pooled connection. The pool detaches a connection that closes
    while checked out, and then every call on it, is_closed() included, raises InterfaceError."""
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        return True


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
