"""Answers as adaptors/http_client.py reads them, whole within a limit or streamed piece by piece."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptors.http_connection import HIGH_WATER, Connection
from adaptors.http_wire import Decompressor, Head

if TYPE_CHECKING:
    from adaptors.http_client import HTTPClient

_PIECE = 256 * 1024
"""The most a stream's piece unpacks to at once."""


class Stream:
    """An answer whose head has arrived; its body comes as `next_piece` reads it. Read to its end,
    the connection goes back to the pool; closed before (the client left), the connection closes."""

    def __init__(self, client: HTTPClient, connection: Connection, head: Head) -> None:
        self.head = head
        self._client = client
        self._connection: Connection | None = connection
        self._decompressor = Decompressor.of(head.header("content-encoding"))

    @property
    def status(self) -> int:
        return self.head.status

    async def next_piece(self) -> bytes | None:
        """The body's next bytes as they arrived (unpacked, at most 256 KiB at once); None at its end."""
        connection = self._connection
        if connection is None:
            return None
        decompressor = self._decompressor
        try:
            while True:
                if decompressor is not None and decompressor.pending:
                    return decompressor.unpack(b"", _PIECE)
                data = await connection.read_some(1)
                if data is None:
                    self._connection = None
                    self._client._release(connection)
                    return None
                if decompressor is None:
                    return data
                piece = decompressor.unpack(data, _PIECE)
                if piece:
                    return piece
        except BaseException:
            self.close()
            raise

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None once it exceeds `limit` bytes (the connection then closes)."""
        connection = self._connection
        if connection is None:
            return b""
        self._connection = None
        return await self._client._whole(connection, self.head, limit)

    def close(self) -> None:
        """Gives up the rest of the answer: the connection closes. Nothing once read to its end."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._client._discard(connection)


async def bounded_body(connection: Connection, head: Head, limit: int) -> bytes | None:
    """The body, unpacked if it was packed, or None once it exceeds `limit` bytes."""
    decompressor = Decompressor.of(head.header("content-encoding"))
    if head.length is not None and head.length > limit and decompressor is None:
        return None
    parts: list[bytes] = []
    size = 0
    while (data := await connection.read_some(HIGH_WATER)) is not None:
        if decompressor is not None:
            data = decompressor.unpack(data, limit + 1 - size)
            while decompressor.pending and size + len(data) <= limit:
                data += decompressor.unpack(b"", limit + 1 - size - len(data))
        size += len(data)
        if size > limit:
            return None
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
