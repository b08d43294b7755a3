"""A small durable store: embedded SQLite by default, PostgreSQL when configured, one schema for both.

One gateway process needs nothing but a file (SQLite); several gateway processes behind a load balancer
share a server (PostgreSQL). Callers write their SQL once, dialect-neutral, with ``?`` placeholders
(translated to ``$1, $2, ...`` for PostgreSQL) and column types both understand (TEXT, INTEGER, BIGINT,
DOUBLE PRECISION). Rows come back as plain dicts. The schema evolves only through ``MIGRATIONS``, applied
by ``Database.connect``.

URLs:

    sqlite:///relative/path.db       relative to the process's working directory: this module does not
                                     guess a base, so callers (the settings loader) resolve relative
                                     paths against the configuration file before connecting
    sqlite:////absolute/path.db      (four slashes: the path itself starts with one)
    sqlite:///:memory:               private to this Database and gone on close (tests)
    postgresql://user:password@host:port/database   (``postgres://`` too)

A database that cannot be reached raises ``DatabaseUnavailable``, whatever the backend, so callers can
answer "try again later" instead of failing as for a bad query.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing, contextmanager
from functools import lru_cache, partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgresql"]
Row = dict[str, Any]
Migration = tuple[int, str, list[str]]
T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
DEFAULT_STATEMENT_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 4
STATEMENT_TIMEOUT_MARGIN = 5.0
"""How much longer than the server's statement_timeout the client waits for an answer: the server
cancels a statement at its timeout, the client's own deadline catches a server that stopped answering."""

# Append only: a released version is never edited, since databases in the field already recorded it.
MIGRATIONS: list[Migration] = [
    (
        1,
        "batches",
        [
            """CREATE TABLE batches (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                username TEXT NOT NULL,
                cluster TEXT NOT NULL,
                framework TEXT NOT NULL,
                model TEXT NOT NULL,
                endpoint_slug TEXT NOT NULL,
                input_file TEXT NOT NULL,
                output_folder_path TEXT,
                task_ids TEXT,
                status TEXT NOT NULL,
                result TEXT,
                error TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                in_progress_at DOUBLE PRECISION,
                completed_at DOUBLE PRECISION,
                failed_at DOUBLE PRECISION,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX batches_username_status ON batches (username, status)",
            "CREATE INDEX batches_status_created ON batches (status, created_at)",
        ],
    ),
    (
        2,
        "requests",
        [
            # (request_id, started_at) is the key so that re-sending a batch whose commit went
            # unacknowledged (the connection dropped after COMMIT) inserts nothing twice, see
            # proxy/records/usage_store.py; request_id alone is not unique, a client may choose its
            # X-Request-ID.
            """CREATE TABLE requests (
                request_id TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                duration_ms DOUBLE PRECISION NOT NULL,
                ttfc_ms DOUBLE PRECISION,
                method TEXT NOT NULL,
                route TEXT NOT NULL,
                path TEXT NOT NULL,
                status INTEGER NOT NULL,
                user_id TEXT,
                username TEXT,
                cluster TEXT,
                framework TEXT,
                model TEXT,
                endpoint_slug TEXT,
                stream INTEGER NOT NULL,
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                total_tokens INTEGER,
                task_id TEXT,
                client_ip TEXT,
                error TEXT,
                prompt TEXT,
                result TEXT,
                PRIMARY KEY (request_id, started_at)
            )""",
            "CREATE INDEX requests_started ON requests (started_at)",
            "CREATE INDEX requests_username_started ON requests (username, started_at)",
            "CREATE INDEX requests_model_started ON requests (model, started_at)",
        ],
    ),
    (
        3,
        "requests_fewer_indexes",
        [
            # Usage reports select a time range and group it (requests_started serves them); these two
            # served no query and cost every stored request a fifth of its insert time.
            "DROP INDEX requests_username_started",
            "DROP INDEX requests_model_started",
        ],
    ),
    (
        4,
        "requests_usage_estimated",
        ["ALTER TABLE requests ADD COLUMN usage_estimated INTEGER NOT NULL DEFAULT 0"],
    ),
]

_SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)
_MIGRATION_LOCK = "schema_migrations"

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
_SQLITE_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_FULL,
}


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

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    ) -> Database:
        """Open the database named by ``url`` and apply the migrations it lacks.

        ``timeout`` bounds connecting (PostgreSQL) or waiting for another process's write lock (SQLite).
        ``statement_timeout`` bounds every statement (PostgreSQL: lock waits included; SQLite waits
        for a lock up to ``timeout``): past it the statement is cancelled and raises ``DatabaseTimeout``.
        """
        database = await _open(url, pool_size, timeout, statement_timeout)
        try:
            await database.migrate(migrations)
        except BaseException:
            await database.close()
            raise
        return database

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

    async def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
        """Apply the missing migrations in version order and record them; the versions applied now.

        All in one transaction, so a half-applied schema never exists, and under a lock, so two gateway
        processes starting together do not both apply the same migration.
        """
        _check_migrations(migrations)
        applied_now: list[int] = []
        async with self.transaction() as tx:
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


def _check_migrations(migrations: Sequence[Migration]) -> None:
    versions = [version for version, _, _ in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions: {sorted(versions)}")


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


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def _open(url: str, pool_size: int, timeout: float, statement_timeout: float) -> Database:
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ValueError(f"database URL {url!r} names no file: use sqlite:///path/to/file.db")
        return await _SqliteDatabase.open(path, timeout, statement_timeout)
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        return await _PostgresDatabase.open(url, pool_size, timeout, statement_timeout)
    raise ValueError(
        f"unsupported database URL {redact(url)!r}: use sqlite:///path/to/file.db or postgresql://host/db"
    )


# --- SQLite -------------------------------------------------------------------------------------------


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


class _SqliteDatabase(Database):
    """Statements outside a transaction take the same asyncio lock as a whole transaction, so they never
    run in the middle of another task's transaction on the shared connection."""

    dialect: Dialect = "sqlite"

    def __init__(self, worker: _SqliteWorker) -> None:
        super().__init__()
        self._worker = worker
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str, timeout: float, statement_timeout: float) -> _SqliteDatabase:
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


# --- PostgreSQL ---------------------------------------------------------------------------------------


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


class _PostgresDatabase(Database):
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
    ) -> _PostgresDatabase:
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
