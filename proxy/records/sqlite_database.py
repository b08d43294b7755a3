"""The SQLite driver: the embedded database one gateway process needs nothing but a file for.

sqlite3 blocks, so one thread owns the one connection and runs every statement in submission order;
the event loop waits on it. A statement past the statement timeout is interrupted by SQLite's
progress handler and raises ``DatabaseTimeout``; a file that cannot be opened, written or locked in
time raises ``DatabaseUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from functools import partial
from typing import Any, TypeVar

from proxy.records.database import Database, DatabaseTimeout, DatabaseUnavailable, Dialect, Row, Transaction

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures of the file, not of the query: a bad query or a constraint violation is the caller's bug.
_SQLITE_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_FULL,
}


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


SQLITE_CACHED_STATEMENTS = 16
"""Prepared statements kept per connection. The request records' multi-row INSERT of each batch size is
a statement of its own, of about a megabyte prepared: sqlite3's default of 128 held some 100 MB of them."""


SQLITE_PROGRESS_STEPS = 10_000
"""How many virtual-machine instructions SQLite runs between looks at the statement's deadline (well
under a millisecond's work)."""


class _SqliteWorker:
    """The one sqlite3 connection and the one thread that ever touches it.

    A single-thread executor keeps blocking sqlite3 calls off the event loop and runs them strictly in
    submission order, so writes are serialized and a statement submitted after another never overtakes it.
    """

    def __init__(self, path: str, timeout: float, statement_timeout: float) -> None:
        self.path = path
        self._timeout = timeout
        self._statement_timeout = statement_timeout
        self._deadline = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    async def start(self) -> None:
        await self._call(self._open)

    async def execute(self, sql: str, params: Sequence[Any]) -> int:
        return await self._call(self._execute, sql, params)

    async def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._call(self._execute_many, sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        return await self._call(self._fetch, sql, params)

    async def fetchone(self, sql: str, params: Sequence[Any]) -> Row | None:
        return await self._call(self._fetchone, sql, params)

    async def begin(self) -> None:
        """IMMEDIATE takes the write lock up front: a transaction that reads then writes cannot fail
        halfway because another process wrote in between (it waits up to busy_timeout instead)."""
        await self._call(self._execute, "BEGIN IMMEDIATE", ())

    async def end(self, commit: bool) -> None:
        await self._call(self._end, commit)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self._call(self._close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"database {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(self._timed, function, *args))
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_INTERRUPT:
                limit = self._statement_timeout
                message = f"a statement ran past the statement timeout ({limit:g} s), cancelled"
                raise DatabaseTimeout(f"sqlite database {self.path}: {message}") from exc
            if exc.sqlite_errorcode & 0xFF in _SQLITE_UNAVAILABLE:
                raise DatabaseUnavailable(f"sqlite database {self.path}: {exc}") from exc
            raise

    # Everything below runs on the worker thread.

    def _timed(self, function: Callable[..., T], *args: Any) -> T:
        self._deadline = time.monotonic() + self._statement_timeout
        return function(*args)

    def _past_deadline(self) -> int:
        """SQLite's progress handler: non-zero interrupts the running statement."""
        return int(time.monotonic() > self._deadline)

    def _open(self) -> None:
        # isolation_level=None: no implicit BEGIN, transactions are explicit; timeout is busy_timeout.
        connection = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, cached_statements=SQLITE_CACHED_STATEMENTS
        )
        try:
            connection.row_factory = _dict_row
            connection.set_progress_handler(self._past_deadline, SQLITE_PROGRESS_STEPS)
            self._use_wal(connection)
            connection.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, far fewer fsyncs
            connection.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        """WAL, so readers never block the writer; the mode is stored in the file, so only its first user
        switches. Switching reports "locked" at once, ignoring busy_timeout, when another process opens the
        same new file at the same moment: retry until that process has switched it."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                mode = connection.execute("PRAGMA journal_mode").fetchone()
                if mode is None or mode["journal_mode"] != "wal":
                    connection.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError(f"database {self.path} is not open")
        return self._connection

    def _execute(self, sql: str, params: Sequence[Any]) -> int:
        with closing(self._db().execute(sql, params)) as cursor:
            return max(cursor.rowcount, 0)

    def _execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        connection = self._db()
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(sql, rows)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with closing(self._db().execute(sql, params)) as cursor:
            rows: list[Row] = cursor.fetchall()
            return rows

    def _fetchone(self, sql: str, params: Sequence[Any]) -> Row | None:
        with closing(self._db().execute(sql, params)) as cursor:
            row: Row | None = cursor.fetchone()
            return row

    def _end(self, commit: bool) -> None:
        connection = self._db()
        if connection.in_transaction:
            connection.execute("COMMIT" if commit else "ROLLBACK")

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class _SqliteTransaction(Transaction):
    dialect: Dialect = "sqlite"

    def __init__(self, worker: _SqliteWorker) -> None:
        self._worker = worker

    async def execute(self, sql: str, *params: Any) -> int:
        return await self._worker.execute(sql, params)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        return await self._worker.fetch(sql, params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        return await self._worker.fetchone(sql, params)

    async def lock(self, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already excludes every other writer, in any process."""


class SqliteDatabase(Database):
    """Statements outside a transaction take the same asyncio lock as a whole transaction, so they never
    run in the middle of another task's transaction on the shared connection."""

    dialect: Dialect = "sqlite"

    def __init__(self, worker: _SqliteWorker) -> None:
        super().__init__()
        self._worker = worker
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str, timeout: float, statement_timeout: float) -> SqliteDatabase:
        worker = _SqliteWorker(path, timeout, statement_timeout)
        try:
            await worker.start()
        except BaseException:
            await worker.close()
            raise
        return cls(worker)

    async def execute(self, sql: str, *params: Any) -> int:
        self._refuse_inside_transaction()
        async with self._lock:
            return await self._worker.execute(sql, params)

    async def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._refuse_inside_transaction()
        async with self._lock:
            await self._worker.execute_many(sql, rows)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        self._refuse_inside_transaction()
        async with self._lock:
            return await self._worker.fetch(sql, params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        self._refuse_inside_transaction()
        async with self._lock:
            return await self._worker.fetchone(sql, params)

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        self._refuse_inside_transaction()
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        async with self._lock:
            with self._in_transaction():
                try:
                    await self._worker.begin()
                    yield _SqliteTransaction(self._worker)
                    await self._worker.end(commit=True)
                except BaseException:
                    await self._rollback()
                    raise

    async def _rollback(self) -> None:
        """Queued behind whatever is still running, so it also undoes a statement whose caller was
        cancelled; a failing rollback must not hide the error that caused it."""
        try:
            await self._worker.end(commit=False)
        except Exception:
            log.exception("sqlite rollback failed on %s", self._worker.path)

    async def close(self) -> None:
        async with self._lock:
            await self._worker.close()
