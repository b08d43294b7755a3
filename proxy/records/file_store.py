"""Uploaded files (OpenAI's Files API): their rows in the ``files`` table, and their bytes in a
storage directory.

Rows and bytes are apart so that the bytes may later live in an S3-compatible store: the database
only knows a file's storage key, and `LocalFileStorage` is the one place that turns a key into a
path. An upload is written to a temporary name as it arrives, never held whole in memory, and only
renamed to its key once it is complete and checked.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterable, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Final

from proxy.records.database import Database, Migration

FILES_MIGRATIONS: Final[list[Migration]] = [
    (
        6,
        "files",
        [
            """CREATE TABLE files (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                filename TEXT NOT NULL,
                purpose TEXT NOT NULL,
                bytes BIGINT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                storage_key TEXT NOT NULL
            )""",
            "CREATE INDEX files_user_created ON files (user_id, created_at)",
        ],
    ),
]
"""The ``files`` table's part of ``proxy.records.schema.MIGRATIONS``: append only."""


class TooLarge(Exception):
    """The upload went past its size limit; what was written of it is gone."""


@dataclass
class FileRecord:
    id: str
    user_id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    storage_key: str


_COLUMNS: Final = tuple(field.name for field in fields(FileRecord))
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM files"
_INSERT: Final = f"INSERT INTO files ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FileStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, record: FileRecord) -> None:
        await self._db.execute(_INSERT, *astuple(record))

    async def replace(self, record: FileRecord) -> None:
        """A batch's result file, written again when a runner resumes its finalizing step."""
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM files WHERE id = ?", record.id)
            await tx.execute(_INSERT, *astuple(record))

    async def get(self, file_id: str, user_id: str) -> FileRecord | None:
        """Another user's file is not found, exactly like a file that does not exist."""
        row = await self._db.fetchone(f"{_SELECT} WHERE id = ? AND user_id = ?", file_id, user_id)
        return None if row is None else FileRecord(**row)

    async def for_user(
        self, user_id: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileRecord], bool]:
        """One page of the user's files, and whether more follow."""
        clauses, params = ["user_id = ?"], [user_id]
        if purpose is not None:
            clauses.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            cursor = await self.get(after, user_id)
            if cursor is not None:
                beyond = "<" if newest_first else ">"
                clauses.append(f"(created_at {beyond} ? OR (created_at = ? AND id {beyond} ?))")
                params.extend([cursor.created_at, cursor.created_at, cursor.id])  # type: ignore[list-item]
        order = "DESC" if newest_first else "ASC"
        rows = await self._db.fetch(
            f"{_SELECT} WHERE {' AND '.join(clauses)} ORDER BY created_at {order}, id {order} LIMIT ?",
            *params,
            limit + 1,
        )
        return [FileRecord(**row) for row in rows[:limit]], len(rows) > limit

    async def bytes_of(self, user_id: str) -> int:
        row = await self._db.fetchone("SELECT SUM(bytes) AS used FROM files WHERE user_id = ?", user_id)
        return int(row["used"] or 0) if row else 0

    async def delete(self, file_id: str, user_id: str) -> bool:
        return await self._db.execute("DELETE FROM files WHERE id = ? AND user_id = ?", file_id, user_id) > 0


class LocalFileStorage:
    """File bytes in a directory, one file per storage key. Writes go to a hidden temporary name
    first, so a reader never sees half a file, even after a crash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    async def receive(self, chunks: AsyncIterable[bytes], max_bytes: int) -> tuple[Path, int]:
        """Writes the chunks to a new temporary file as they come; its path and size. The caller
        commits it with `commit` or removes it with `discard`."""
        temporary = self.root / f".upload-{uuid.uuid4().hex}"
        size = 0
        try:
            with temporary.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge
                    out.write(chunk)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary, size

    def write_lines(self, key: str, lines: Iterator[bytes]) -> int:
        """A result file, written whole and renamed into place; its size. Blocking: run in a thread."""
        temporary = self.root / f".result-{uuid.uuid4().hex}"
        size = 0
        with temporary.open("wb") as out:
            for line in lines:
                out.write(line)
                size += len(line)
        os.replace(temporary, self.path(key))
        return size

    def commit(self, temporary: Path, key: str) -> None:
        os.replace(temporary, self.path(key))

    def discard(self, key_or_path: str | Path) -> None:
        path = key_or_path if isinstance(key_or_path, Path) else self.path(key_or_path)
        path.unlink(missing_ok=True)
