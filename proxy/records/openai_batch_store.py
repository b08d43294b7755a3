"""OpenAI batches (``/v1/batches`` with an ``input_file_id``) in the durable store: the
``openai_batches`` table, one row per batch, and ``openai_batch_lines``, one row per answered line.

A line's row is its durable progress: it is written once its answer is known, and a runner that
resumes a batch (after a restart, or on another host) skips every line that has one, so a finished
line is never sent again. Which runner works on a batch is a lease on its row (``lease_owner`` until
``lease_until``), taken by a conditional update and renewed while it runs: two runners never own the
same batch at once, and a runner that dies loses its batches once their lease runs out.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, fields
from typing import Any, Final

from proxy.records.database import Database, Migration, Row

OPENAI_BATCHES_MIGRATIONS: Final[list[Migration]] = [
    (
        7,
        "openai_batches",
        [
            """CREATE TABLE openai_batches (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                user_json TEXT NOT NULL,
                cluster TEXT,
                framework TEXT,
                endpoint TEXT NOT NULL,
                input_file_id TEXT NOT NULL,
                completion_window TEXT NOT NULL,
                metadata TEXT,
                status TEXT NOT NULL,
                errors TEXT,
                output_file_id TEXT,
                error_file_id TEXT,
                total INTEGER NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                in_progress_at DOUBLE PRECISION,
                finalizing_at DOUBLE PRECISION,
                completed_at DOUBLE PRECISION,
                failed_at DOUBLE PRECISION,
                expired_at DOUBLE PRECISION,
                cancelling_at DOUBLE PRECISION,
                cancelled_at DOUBLE PRECISION,
                lease_owner TEXT,
                lease_until DOUBLE PRECISION
            )""",
            "CREATE INDEX openai_batches_user_created ON openai_batches (user_id, created_at)",
            "CREATE INDEX openai_batches_status ON openai_batches (status)",
            """CREATE TABLE openai_batch_lines (
                batch_id TEXT NOT NULL,
                line INTEGER NOT NULL,
                custom_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                status_code INTEGER,
                body TEXT,
                error TEXT,
                PRIMARY KEY (batch_id, line)
            )""",
        ],
    ),
]
"""The OpenAI batch tables' part of ``proxy.records.schema.MIGRATIONS``: append only."""

RUNNING: Final = ("validating", "in_progress", "finalizing", "cancelling")
"""What a runner still has to work on."""
TIMESTAMPS: Final = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


@dataclass
class OpenAIBatchRecord:
    id: str
    user_id: str
    user_json: str
    cluster: str | None
    framework: str | None
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: str | None
    status: str
    errors: str | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    created_at: float
    expires_at: float
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None


@dataclass
class LineResult:
    line: int
    custom_id: str
    request_id: str
    status_code: int | None
    body: str | None
    """The backend's JSON answer, or the gateway's OpenAI-shaped error."""
    error: str | None
    """JSON ``{"code", "message"}`` when the line got no HTTP answer at all."""


_COLUMNS: Final = tuple(field.name for field in fields(OpenAIBatchRecord))
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM openai_batches"
_INSERT: Final = (
    f"INSERT INTO openai_batches ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_LINE_COLUMNS: Final = tuple(field.name for field in fields(LineResult))
_RUNNING_SQL: Final = f"status IN ({', '.join('?' * len(RUNNING))})"


def _batch(row: Row) -> OpenAIBatchRecord:
    return OpenAIBatchRecord(**row)


class OpenAIBatchStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, record: OpenAIBatchRecord) -> None:
        await self._db.execute(_INSERT, *astuple(record))

    async def get(self, batch_id: str, user_id: str | None = None) -> OpenAIBatchRecord | None:
        """With ``user_id``, another user's batch is not found, like one that does not exist."""
        if user_id is None:
            row = await self._db.fetchone(f"{_SELECT} WHERE id = ?", batch_id)
        else:
            row = await self._db.fetchone(f"{_SELECT} WHERE id = ? AND user_id = ?", batch_id, user_id)
        return None if row is None else _batch(row)

    async def for_user(
        self, user_id: str, after: str | None, limit: int
    ) -> tuple[list[OpenAIBatchRecord], bool]:
        """One page of the user's batches, newest first, and whether more follow."""
        clauses, params = ["user_id = ?"], [user_id]
        if after is not None:
            cursor = await self.get(after, user_id)
            if cursor is not None:
                clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
                params.extend([cursor.created_at, cursor.created_at, cursor.id])  # type: ignore[list-item]
        rows = await self._db.fetch(
            f"{_SELECT} WHERE {' AND '.join(clauses)} ORDER BY created_at DESC, id DESC LIMIT ?",
            *params,
            limit + 1,
        )
        return [_batch(row) for row in rows[:limit]], len(rows) > limit

    async def counts(self, batch_id: str) -> tuple[int, int]:
        """Lines answered so far: (completed with a 2xx, failed)."""
        row = await self._db.fetchone(
            "SELECT COUNT(*) AS answered, "
            "SUM(CASE WHEN status_code >= 200 AND status_code < 300 THEN 1 ELSE 0 END) AS ok "
            "FROM openai_batch_lines WHERE batch_id = ?",
            batch_id,
        )
        answered = int(row["answered"] or 0) if row else 0
        ok = int(row["ok"] or 0) if row else 0
        return ok, answered - ok

    async def move(
        self, batch_id: str, status: str, *, only_from: tuple[str, ...] = RUNNING, **columns: Any
    ) -> bool:
        """A status change (stamping its timestamp) with other columns, unless the batch already
        left ``only_from``: a cancel racing the runner's last step cannot undo a finished batch."""
        sets = {"status": status, **columns}
        if status in TIMESTAMPS:
            sets[TIMESTAMPS[status]] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in sets)
        placeholders = ", ".join("?" * len(only_from))
        changed = await self._db.execute(
            f"UPDATE openai_batches SET {assignments} WHERE id = ? AND status IN ({placeholders})",
            *sets.values(),
            batch_id,
            *only_from,
        )
        return changed > 0

    async def claimable(self, now: float, owner: str) -> list[str]:
        """Batches a runner should work on whose lease is free, lapsed or already this owner's."""
        rows = await self._db.fetch(
            f"SELECT id FROM openai_batches WHERE {_RUNNING_SQL} "
            "AND (lease_until IS NULL OR lease_until < ? OR lease_owner = ?) ORDER BY created_at LIMIT 100",
            *RUNNING,
            now,
            owner,
        )
        return [row["id"] for row in rows]

    async def lease(self, batch_id: str, owner: str, until: float, now: float) -> OpenAIBatchRecord | None:
        """Take or renew the batch's lease; the batch as it is now when this owner holds it, else
        None. A runner reads a cancel, or a changed expiry, here."""
        changed = await self._db.execute(
            "UPDATE openai_batches SET lease_owner = ?, lease_until = ? WHERE id = ? "
            "AND (lease_until IS NULL OR lease_until < ? OR lease_owner = ?)",
            owner,
            until,
            batch_id,
            now,
            owner,
        )
        if not changed:
            return None
        return await self.get(batch_id)

    async def release(self, batch_id: str, owner: str) -> None:
        await self._db.execute(
            "UPDATE openai_batches SET lease_owner = NULL, lease_until = NULL "
            "WHERE id = ? AND lease_owner = ?",
            batch_id,
            owner,
        )

    async def answered_lines(self, batch_id: str) -> set[int]:
        rows = await self._db.fetch("SELECT line FROM openai_batch_lines WHERE batch_id = ?", batch_id)
        return {int(row["line"]) for row in rows}

    async def record_line(self, batch_id: str, result: LineResult) -> None:
        """Once per line: a line answered twice (two runners after a lost lease) keeps its first answer."""
        await self._db.execute(
            f"INSERT INTO openai_batch_lines (batch_id, {', '.join(_LINE_COLUMNS)}) "
            f"VALUES (?, {', '.join('?' * len(_LINE_COLUMNS))}) ON CONFLICT DO NOTHING",
            batch_id,
            *astuple(result),
        )

    async def results(self, batch_id: str) -> list[LineResult]:
        rows = await self._db.fetch(
            f"SELECT {', '.join(_LINE_COLUMNS)} FROM openai_batch_lines WHERE batch_id = ? ORDER BY line",
            batch_id,
        )
        return [LineResult(**row) for row in rows]
