"""Per-request records in the durable store (the ``requests`` table of migration 2), and usage reports.

An allocation committee asks who used how many tokens on which model over a period: the gateway keeps one
row per request (written in batches by ``proxy.request_log.RecordSink``) and ``usage`` sums them per user
or per model, in the database, over an indexed time range.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, Final, Literal

from proxy.database import Database, Row
from proxy.request_log import RequestRecord

UsageBy = Literal["user", "model"]

_COLUMNS: Final = tuple(field.name for field in fields(RequestRecord))
_ROW_SQL: Final = f"({', '.join('?' * len(_COLUMNS))})"
_GROUP_COLUMN: Final[dict[str, str]] = {"user": "username", "model": "model"}

# A backend that reports prompt and completion tokens but no total still used tokens: count their sum.
_TOTAL_SQL: Final = "COALESCE(total_tokens, COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0))"


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


def _usage_sql(by: UsageBy, bounded: bool) -> str:
    column = _GROUP_COLUMN[by]
    until = " AND started_at < ?" if bounded else ""
    return (
        f"SELECT {column} AS {by}, COUNT(*) AS requests,"
        " COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
        " COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
        f" COALESCE(SUM({_TOTAL_SQL}), 0) AS total_tokens"
        f" FROM requests WHERE started_at >= ?{until}"
        f" GROUP BY {column}"
        # NULL sorts first in SQLite and last in PostgreSQL: "IS NULL" first makes ties read the same.
        f" ORDER BY COALESCE(SUM({_TOTAL_SQL}), 0) DESC, {column} IS NULL, {column}"
    )


def _usage_row(row: Row) -> dict[str, Any]:
    """Plain ints whatever the driver returned for COUNT and SUM (PostgreSQL: bigint)."""
    return {key: value if key in _GROUP_COLUMN else int(value) for key, value in row.items()}


class UsageStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add_many(self, records: Sequence[RequestRecord]) -> None:
        """Insert ``records`` all or nothing. Records already stored (same key) are skipped, so a retry
        after an unacknowledged commit adds nothing twice."""
        if records:
            await self._db.execute_many(_INSERT_SQL, map(_params, records))

    async def usage(
        self, since: float, until: float | None = None, by: UsageBy = "user"
    ) -> list[dict[str, Any]]:
        """Requests and tokens per user (``username``) or per model for requests started in
        [since, until), most total tokens first. Requests without a user or model form one group whose
        key is None. A missing total_tokens counts as prompt + completion tokens."""
        if by not in _GROUP_COLUMN:
            raise ValueError(f"usage by {by!r}: expected 'user' or 'model'")
        if until is None:
            rows = await self._db.fetch(_usage_sql(by, bounded=False), since)
        else:
            rows = await self._db.fetch(_usage_sql(by, bounded=True), since, until)
        return [_usage_row(row) for row in rows]
