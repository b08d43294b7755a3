"""Answers as adaptors/http_client.py reads them, whole within a limit or streamed piece by
piece, and the request that starts a stream.

A stream's request is sent before the adaptor's call returns whenever a pooled connection is free
(`StreamStart`), so that it leaves in the same step of the event loop that checked the client's
request. That once saved about 0.08 ms under 16 paced streams, when a keep-alive task of its own
first read the stream a step later (docs/performance.md, 2026-12-05); since the stream's own task
reads it (proxy/core/streaming.py), in that same step, the early send saves a few microseconds at
most. A request that must wait for a place in the pool or for a new connection is sent when the
stream is first read, while the gateway's keep-alive comments cover the wait
(`SubmitStreamingTaskResponse.keepalive_seconds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adaptors.http_connection import HIGH_WATER, Connection
from adaptors.http_wire import Decompressor, Head, HTTPFailure

if TYPE_CHECKING:
    from adaptors.http_client import HTTPClient, Outgoing

_PIECE = 256 * 1024
"""The most a stream's piece unpacks to at once."""


@dataclass(frozen=True, slots=True)
class Sent:
    """A request on its way, on a connection of the pool (`reused`: one that served before)."""

    connection: Connection
    reused: bool


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


class StreamStart:
    """A streamed request handed to the client: sent already if `HTTPClient.start_stream` could
    send it at once. `opened` waits for the answer's head; `close` gives the request up if nothing
    has opened it, so that a stream never read holds no connection."""

    def __init__(
        self, client: HTTPClient, outgoing: Outgoing | None, sent: Sent | HTTPFailure | None
    ) -> None:
        self._client = client
        self._outgoing = outgoing
        self._sent = sent

    async def opened(self) -> Stream:
        client, outgoing = self._client, self._outgoing
        sent, self._sent, self._outgoing = self._sent, None, None
        if isinstance(sent, HTTPFailure):
            raise sent
        if outgoing is None:
            raise RuntimeError("a stream's request was opened twice or after it was closed")
        if sent is None:
            sent = await client._send(outgoing)
        connection, head = await client._answer(outgoing, sent)
        return Stream(client, connection, head)

    def close(self) -> None:
        sent, self._sent, self._outgoing = self._sent, None, None
        if isinstance(sent, Sent):
            self._client._discard(sent.connection)

    def __del__(self) -> None:
        """Dropped unread (an error between the adaptor's call and the first read): the connection
        must not stay counted in use for good."""
        if isinstance(self._sent, Sent) and not self._sent.connection.loop.is_closed():
            self.close()


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
