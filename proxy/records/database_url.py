"""Which database a URL names, opened with its driver.

URLs:

    sqlite:///relative/path.db       relative to the process's working directory: this module does not
                                     guess a base, so callers (the settings loader) resolve relative
                                     paths against the configuration file before connecting
    sqlite:////absolute/path.db      (four slashes: the path itself starts with one)
    sqlite:///:memory:               private to this Database and gone on close (tests)
    postgresql://user:password@host:port/database   (``postgres://`` too)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.records.database import Database, redact
from proxy.records.postgres_database import PostgresDatabase
from proxy.records.sqlite_database import SqliteDatabase

DEFAULT_TIMEOUT = 5.0
DEFAULT_STATEMENT_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 4


async def open_database(
    url: str,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
) -> Database:
    """The database named by ``url``, as it is: its tables are brought up to date by
    ``proxy.records.schema.connect``, which is what a gateway calls.

    ``timeout`` bounds connecting (PostgreSQL) or waiting for another process's write lock (SQLite).
    ``statement_timeout`` bounds every statement (PostgreSQL: lock waits included; SQLite waits
    for a lock up to ``timeout``): past it the statement is cancelled and raises ``DatabaseTimeout``.
    """
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ValueError(f"database URL {url!r} names no file: use sqlite:///path/to/file.db")
        return await SqliteDatabase.open(path, timeout, statement_timeout)
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        return await PostgresDatabase.open(url, pool_size, timeout, statement_timeout)
    raise ValueError(
        f"unsupported database URL {redact(url)!r}: use sqlite:///path/to/file.db or postgresql://host/db"
    )
