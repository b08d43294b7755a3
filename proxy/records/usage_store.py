"""Per-request records in the durable store: the ``requests`` table, its schema, and usage reports.

An allocation committee asks who used how many tokens on which model over a period: the gateway keeps one
row per request (written in batches by ``proxy.records.record_sink.RecordSink``) and ``usage`` sums the
answered ones per user, model, cluster, day or hour, in the database, over an indexed time range.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

from proxy.records.database import Database, Dialect, Migration, Row
from proxy.records.record import RequestRecord

REQUESTS_MIGRATIONS: Final[list[Migration]] = [
    (
        2,
        "requests",
        [
            # (request_id, started_at) is the key so that re-sending a batch whose commit went
            # unacknowledged (the connection dropped after COMMIT) inserts nothing twice, see
            # _INSERT_SQL; request_id alone is not unique, a client may choose its X-Request-ID.
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
"""The ``requests`` table's part of ``proxy.records.schema.MIGRATIONS``: append only, a released
version is never edited, since databases in the field already recorded it."""

UsageBy = Literal["user", "model", "cluster", "day", "hour"]

_COLUMNS: Final = tuple(field.name for field in fields(RequestRecord))
_ROW_SQL: Final = f"({', '.join('?' * len(_COLUMNS))})"
_GROUP_COLUMN: Final[dict[str, str]] = {"user": "username", "model": "model", "cluster": "cluster"}
_BUCKET_SECONDS: Final[dict[str, int]] = {"day": 86400, "hour": 3600}

# A backend that reports prompt and completion tokens but no total still used tokens: count their sum.
_TOTAL_SQL: Final = "COALESCE(total_tokens, COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0))"

ANSWERED_SQL: Final = "status >= 200 AND status < 300"
"""Usage is what a backend answered: a refused token (401), a rate limit (429), a bad request or a
failed backend used no model time the user should be counted for."""


_INSERT_SQL: Final = (
    f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES {_ROW_SQL}"
    " ON CONFLICT (request_id, started_at) DO NOTHING"
)
"""ON CONFLICT DO NOTHING (SQLite and PostgreSQL both) makes re-sending a batch whose commit was never
acknowledged harmless instead of a primary-key error. The key is (request_id, started_at): a client
may send the same X-Request-ID with every request, and those are still different requests."""


_params: Final = operator.attrgetter(*_COLUMNS)
"""The record as column values, in one call: SQLite and asyncpg both write ``stream``, a bool, as
the 0 or 1 of its INTEGER column."""


def _bucket_sql(seconds: int, dialect: Dialect) -> str:
    """The start of the UTC day or hour, in epoch seconds: SQLite's CAST truncates (the times are
    positive), PostgreSQL's would round, so it takes FLOOR."""
    if dialect == "postgresql":
        return f"FLOOR(started_at / {seconds}) * {seconds}"
    return f"CAST(started_at / {seconds} AS INTEGER) * {seconds}"


def _usage_sql(by: Sequence[UsageBy], bounded: bool, answered_only: bool, dialect: Dialect) -> str:
    """Grouped and ordered by the expressions, not their labels: PostgreSQL reads a bare `user` as
    the current role. Time buckets come first and in order (a report per day reads down the
    calendar); within them the most tokens first."""
    expressions = {
        key: _bucket_sql(_BUCKET_SECONDS[key], dialect) if key in _BUCKET_SECONDS else _GROUP_COLUMN[key]
        for key in by
    }
    until = " AND started_at < ?" if bounded else ""
    answered = f" AND {ANSWERED_SQL}" if answered_only else ""
    times = [f"{expressions[key]}, " for key in by if key in _BUCKET_SECONDS]
    # NULL sorts first in SQLite and last in PostgreSQL: "IS NULL" first makes ties read the same.
    names = [f", {expressions[key]} IS NULL, {expressions[key]}" for key in by if key not in _BUCKET_SECONDS]
    return (
        f"SELECT {', '.join(f'{expression} AS {key}' for key, expression in expressions.items())},"
        " COUNT(*) AS requests,"
        " COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
        " COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
        f" COALESCE(SUM({_TOTAL_SQL}), 0) AS total_tokens"
        f" FROM requests WHERE started_at >= ?{until}{answered}"
        f" GROUP BY {', '.join(expressions.values())}"
        f" ORDER BY {''.join(times)}COALESCE(SUM({_TOTAL_SQL}), 0) DESC{''.join(names)}"
    )


def _usage_row(row: Row) -> dict[str, Any]:
    """Plain ints whatever the driver returned for COUNT and SUM (PostgreSQL: bigint); days and
    hours as ISO dates and times (UTC)."""
    result: dict[str, Any] = {}
    for key, value in row.items():
        if key == "day":
            result[key] = datetime.fromtimestamp(float(value), UTC).date().isoformat()
        elif key == "hour":
            result[key] = datetime.fromtimestamp(float(value), UTC).isoformat(timespec="minutes")
        else:
            result[key] = value if key in _GROUP_COLUMN else int(value)
    return result


class UsageStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add_many(self, records: Sequence[RequestRecord]) -> None:
        """Insert ``records`` all or nothing. Records already stored (same key) are skipped, so a retry
        after an unacknowledged commit adds nothing twice."""
        if records:
            await self._db.execute_many(_INSERT_SQL, map(_params, records))

    async def usage(
        self,
        since: float,
        until: float | None = None,
        by: UsageBy | Sequence[UsageBy] = "user",
        answered_only: bool = True,
    ) -> list[dict[str, Any]]:
        """Requests and tokens for requests started in [since, until), grouped by one or more of user
        (``username``), model, cluster, day and hour (UTC). Only answered requests (2xx) unless
        ``answered_only`` is False. Requests without a user, model or cluster form one group whose
        key is None. A missing total_tokens counts as prompt + completion tokens."""
        keys: list[UsageBy] = [by] if isinstance(by, str) else list(dict.fromkeys(by))
        unknown = [key for key in keys if key not in _GROUP_COLUMN and key not in _BUCKET_SECONDS]
        if unknown or not keys:
            raise ValueError(f"usage by {unknown or keys!r}: expected some of {', '.join(get_args(UsageBy))}")
        sql = _usage_sql(keys, until is not None, answered_only, self._db.dialect)
        params = (since,) if until is None else (since, until)
        return [_usage_row(row) for row in await self._db.fetch(sql, *params)]
