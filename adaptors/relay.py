"""The stream relay contract, for backends that cannot hold the client's connection themselves.

A Globus Compute task runs on an HPC node and streams by POSTing chunks back to the gateway's
callback routes. The adaptor opens a relay stream, hands its id, token and the callback address to
the task, and returns `stream.events()` as the client's stream. The server implements the relay
and gives it to adaptors through `AdaptorContext.relay`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CallbackTarget:
    """Where a remote function POSTs `/resource_server/api/streaming/{data,done,error}/`."""

    host: str
    port: int
    protocol: str


class RelayStream(Protocol):
    stream_id: str
    token: str

    def events(self) -> AsyncIterator[bytes]:
        """The client's event stream: chunks as they arrive, comment keep-alives while the backend
        is silent; it ends after `done`, and raises `StreamError` on `error` or when a limit is hit.
        Closing it early (client gone) makes later callbacks for this stream answer 410."""
        ...

    async def finish(self) -> None:
        """The backend's task ended well: end the stream after whatever already arrived."""
        ...

    async def fail(self, code: int, message: str) -> None:
        """The backend's task failed: end the stream with an error event."""
        ...


class StreamRelay(Protocol):
    callback: CallbackTarget

    async def open(self) -> RelayStream: ...
