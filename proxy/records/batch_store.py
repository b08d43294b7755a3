"""Batch jobs in the durable store: the ``batches`` table, its schema and its queries.

The gateway keeps every batch it forwarded, so status and results survive a restart and every gateway
process of a deployment sees the same batches. A batch is reserved before the backend hears of it, which
is where the per-user quota and the "same input file twice" rule are enforced, atomically even across
processes; the backend's answer then either attaches its task ids or discards the reservation.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, fields
from typing import Any, Final, Literal

from adaptors import BatchStatusEnum
from proxy.records.database import Database, Migration, Row

BATCHES_MIGRATIONS: Final[list[Migration]] = [
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
]
"""The ``batches`` table's part of ``proxy.records.schema.MIGRATIONS``: append only, a released
version is never edited, since databases in the field already recorded it."""

ACTIVE: Final = tuple(status.value for status in BatchStatusEnum if not status.finished)
FINISHED: Final = tuple(status.value for status in BatchStatusEnum if status.finished)
STATUSES: Final = (*ACTIVE, *FINISHED)

Reservation = Literal["added", "quota", "duplicate"]


@dataclass
class BatchRecord:
    id: str
    user_id: str
    username: str
    cluster: str
    framework: str
    model: str
    endpoint_slug: str
    input_file: str
    output_folder_path: str | None
    task_ids: str | None  # comma-separated, as the existing gateway stores them
    status: str  # a BatchStatusEnum value
    result: str | None  # JSON text
    error: str | None
    created_at: float
    in_progress_at: float | None
    completed_at: float | None
    failed_at: float | None
    updated_at: float


_COLUMNS: Final = tuple(field.name for field in fields(BatchRecord))
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM batches"
_INSERT: Final = f"INSERT INTO batches ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_ACTIVE_SQL: Final = f"status IN ({', '.join('?' * len(ACTIVE))})"
_NOT_FINISHED_SQL: Final = f"status NOT IN ({', '.join('?' * len(FINISHED))})"


def _record(row: Row) -> BatchRecord:
    return BatchRecord(**row)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown batch status {status!r}: expected one of {', '.join(STATUSES)}")


def _status_changes(status: str, now: float) -> tuple[list[str], list[Any]]:
    """The SET clauses a move to ``status`` implies: the lifecycle timestamps OpenAI's batch objects
    report, each stamped once (the first time the batch is seen running, when it finishes)."""
    clauses, params = ["status = ?", "updated_at = ?"], [status, now]
    if status == BatchStatusEnum.running:
        clauses.append("in_progress_at = COALESCE(in_progress_at, ?)")
        params.append(now)
    elif status == BatchStatusEnum.completed:
        clauses.append("completed_at = ?")
        params.append(now)
    elif status == BatchStatusEnum.failed:
        clauses.append("failed_at = ?")
        params.append(now)
    return clauses, params


class BatchStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def reserve(self, record: BatchRecord, max_active_per_user: int) -> Reservation:
        """Insert ``record`` unless the user already has an active batch for the same input file
        ("duplicate", checked first as the more specific answer) or ``max_active_per_user`` active batches
        ("quota"); a finished batch's input file may be submitted again.

        Check and insert form one transaction under a lock keyed on the username, so two gateway
        processes reserving for the same user at once cannot both pass the check.
        """
        _check_status(record.status)
        async with self._db.transaction() as tx:
            await tx.lock(f"batches:user:{record.username}")
            active = await tx.fetch(
                f"SELECT input_file FROM batches WHERE username = ? AND {_ACTIVE_SQL}",
                record.username,
                *ACTIVE,
            )
            if any(row["input_file"] == record.input_file for row in active):
                return "duplicate"
            if len(active) >= max_active_per_user:
                return "quota"
            await tx.execute(_INSERT, *astuple(record))
            return "added"

    async def attach(
        self, batch_id: str, task_ids: str | None, status: str, *, now: float | None = None
    ) -> None:
        """The backend accepted the batch: remember its task ids and the status it reported."""
        _check_status(status)
        clauses, params = _status_changes(status, time.time() if now is None else now)
        await self._db.execute(
            f"UPDATE batches SET task_ids = ?, {', '.join(clauses)} WHERE id = ?", task_ids, *params, batch_id
        )

    async def discard(self, batch_id: str) -> None:
        """The backend refused the batch: drop the reservation so it counts against no quota."""
        await self._db.execute("DELETE FROM batches WHERE id = ?", batch_id)

    async def get(self, batch_id: str) -> BatchRecord | None:
        row = await self._db.fetchone(f"{_SELECT} WHERE id = ?", batch_id)
        return None if row is None else _record(row)

    async def for_user(self, username: str, status: str | None = None) -> list[BatchRecord]:
        """The user's batches, newest first, optionally only those in one status."""
        if status is None:
            rows = await self._db.fetch(
                f"{_SELECT} WHERE username = ? ORDER BY created_at DESC, id DESC", username
            )
        else:
            rows = await self._db.fetch(
                f"{_SELECT} WHERE username = ? AND status = ? ORDER BY created_at DESC, id DESC",
                username,
                status,
            )
        return [_record(row) for row in rows]

    async def unfinished(self, limit: int = 500) -> list[BatchRecord]:
        """Active batches, oldest first: what a poller must follow up on (after a restart, too)."""
        rows = await self._db.fetch(
            f"{_SELECT} WHERE {_ACTIVE_SQL} ORDER BY created_at, id LIMIT ?", *ACTIVE, limit
        )
        return [_record(row) for row in rows]

    async def advance(
        self,
        batch_id: str,
        status: str,
        *,
        result: str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Record a status change (and the result or error, when given); False if nothing changed.

        A finished batch stays finished: a late or repeated poll must not turn a completed batch back into
        a running one or overwrite its result.
        """
        _check_status(status)
        clauses, params = _status_changes(status, time.time() if now is None else now)
        if result is not None:
            clauses.append("result = ?")
            params.append(result)
        if error is not None:
            clauses.append("error = ?")
            params.append(error)
        changed = await self._db.execute(
            f"UPDATE batches SET {', '.join(clauses)} WHERE id = ? AND {_NOT_FINISHED_SQL}",
            *params,
            batch_id,
            *FINISHED,
        )
        return changed > 0
