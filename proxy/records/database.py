"""The database every store writes through: embedded SQLite by default, PostgreSQL when configured.

One gateway process needs nothing but a file (SQLite, ``proxy.records.sqlite_database``); several
gateway processes behind a load balancer share a server (PostgreSQL,
``proxy.records.postgres_database``). This module is what both offer: callers write their SQL once,
dialect-neutral, with ``?`` placeholders (translated to ``$1, $2, ...`` for PostgreSQL) and column
types both understand (TEXT, INTEGER, BIGINT, DOUBLE PRECISION). Rows come back as plain dicts.
Which one a URL names is ``proxy.records.database_url``; the tables are the stores' own, brought up
to date by ``proxy.records.schema``.

A database that cannot be reached raises ``DatabaseUnavailable``, whatever the backend, so callers can
answer "try again later" instead of failing as for a bad query.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

Dialect = Literal["sqlite", "postgresql"]
Row = dict[str, Any]
Migration = tuple[int, str, list[str]]
"""One step of a table's schema: its version (unique across all tables), a name, its statements."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached right now: server down, connection lost, file cannot be opened.

    Its own type because callers react to "try again later" differently than to a bad query: the gateway
    can answer 503 for what needs the store and keep serving everything else.
    """


class DatabaseTimeout(DatabaseUnavailable):
    """A statement ran longer than the statement timeout (waiting for a lock another connection holds,
    or a server that stopped answering): cancelled, so that no request waits on the database for long."""


class Queries(ABC):
    """What runs SQL: the Database itself (each statement commits on its own) or one transaction."""

    dialect: Dialect

    @abstractmethod
    async def execute(self, sql: str, *params: Any) -> int:
        """Run a statement; the number of rows it inserted, updated or deleted (0 for anything else)."""

    @abstractmethod
    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        """All rows of a query, each a dict keyed by column name."""

    @abstractmethod
    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """The first row of a query, or None."""


class Transaction(Queries):
    """The handle ``Database.transaction()`` yields: commits when the block ends, rolls back on an error."""

    @abstractmethod
    async def lock(self, key: str) -> None:
        """Serialize against every other transaction locking the same key, in any process, until commit.

        For check-then-insert rules (quotas) that a unique constraint cannot express. PostgreSQL takes a
        transaction-level advisory lock; SQLite transactions already hold the database's one write lock.
        """


class Database(Queries):
    """One per gateway process: a single SQLite connection on its own thread, or a PostgreSQL pool."""

    def __init__(self) -> None:
        self._transaction_tasks: set[asyncio.Task[Any]] = set()

    @abstractmethod
    async def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters, all rows or none. The statement is prepared
        once: far cheaper than one statement with a VALUES list per row, which is parsed anew for
        each batch size. With SQLite, ``rows`` is iterated on the database's thread, so a lazy
        iterable keeps building the parameters off the event loop."""

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """``async with db.transaction() as tx:`` run statements on ``tx``, all or nothing.

        Inside the block use ``tx``, not the Database: that would be a second connection (PostgreSQL) or
        wait for this very transaction (SQLite), so it raises RuntimeError instead. Keep transactions
        short: on SQLite one blocks every other statement of the process until it ends.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release the connection(s); the Database cannot be used afterwards."""

    def _refuse_inside_transaction(self) -> None:
        """Using the Database from inside this task's own transaction would deadlock (SQLite) or escape
        the transaction (PostgreSQL): fail loudly instead."""
        task = asyncio.current_task()
        if task is not None and task in self._transaction_tasks:
            raise RuntimeError(
                "inside Database.transaction(): run statements on its handle, not the Database"
            )

    @contextmanager
    def _in_transaction(self) -> Iterator[None]:
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._transaction_tasks.add(task)
        try:
            yield
        finally:
            self._transaction_tasks.discard(task)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
