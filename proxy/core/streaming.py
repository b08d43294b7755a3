"""Writes an adaptor's event stream to the client chunk by chunk, as each chunk arrives.

`response.write` waits while the client's socket buffer is full, so a slow reader slows the
upstream read instead of growing the gateway's memory.

Until the model's first output, an adaptor may ask for keep-alive comments
(`SubmitStreamingTaskResponse.keepalive_seconds`): a backend that queues the request or loads the
model sends nothing for minutes, and the client would get no headers and no bytes while a proxy's
or its own read timeout ran. Comments (lines starting with `:`) are ignored by every SSE client.
A timer writes them while the stream's own task awaits the adaptor's next chunk: that task reads
the chunk the turn of the event loop after it arrives, where a task of its own reading it would
have handed it over a turn later, behind every other stream's ready work (about 0.15 ms at the
median under 16 streams started together; docs/performance.md, 2026-12-05).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from adaptors import StreamError
from proxy.errors import ApiError, Envelope, anthropic_error_body, envelope_of, error_body

log = logging.getLogger(__name__)

WAITING = b": waiting for the model\n\n"

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse_error_event(status: int, message: str, envelope: Envelope = "openai") -> bytes:
    """Anthropic clients act only on named events, so theirs is an `error` event."""
    if envelope == "anthropic":
        return f"event: error\ndata: {json.dumps(anthropic_error_body(status, message))}\n\n".encode()
    return f"data: {json.dumps(error_body(status, message))}\n\n".encode()


class _SSEResponse(web.StreamResponse):
    """A stream's headers leave in the same write as its first item (aiohttp sends a
    `StreamResponse`'s headers on their own at `prepare` unless told to hold them, as its `Response`
    does): one segment instead of two for the client to wait on. `write_stream` prepares the
    response only once it has that item."""

    _send_headers_immediately = False


@dataclass
class StreamEnd:
    """How a stream written to the client ended: what the request's record and metrics need."""

    response: web.StreamResponse
    completed: bool
    """False when the client went away before the end."""
    error: ApiError | None = None
    """The error the stream ended with, after its first byte (sent as an event, with status 200), so
    that the request's record and metrics do not count it as a success."""


async def write_stream(
    request: web.Request,
    chunks: AsyncIterator[bytes],
    on_first_chunk: Callable[[], None] | None = None,
    keepalive_seconds: float | None = None,
) -> StreamEnd:
    """The headers leave with the first item, a keep-alive comment included; `on_first_chunk` is
    called at the first item that is not a comment, the model's first output. Until then, a
    comment goes out after every `keepalive_seconds` without a write."""
    response = _SSEResponse(headers=SSE_HEADERS)
    keepalive = _KeepAlive(request, response, keepalive_seconds) if keepalive_seconds else None
    completed = False
    error = None
    first = on_first_chunk
    try:
        async for chunk in chunks:
            if keepalive is not None:
                await keepalive.quiet()
            if not response.prepared:
                await response.prepare(request)
            output = not chunk.startswith(b":")
            if first is not None and output:
                first()
                first = None
            await response.write(chunk)
            if keepalive is not None:
                if output:
                    keepalive.close()
                    keepalive = None
                else:
                    keepalive.arm()
        if keepalive is not None:
            await keepalive.quiet()
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        completed = True
    except ConnectionResetError:
        log.info("client went away during a stream; closing the upstream side")
    except StreamError as exc:
        error = ApiError(
            exc.code,
            exc.message,
            code="backend_error" if exc.code >= 500 else None,
            retryable=exc.retryable,
            retry_after=exc.retry_after,
            detail=exc.detail,
        )
        completed = await _fail(request, response, error, keepalive)
    except Exception:
        log.exception("stream failed")
        error = ApiError(502, "The stream failed inside the gateway.", code="backend_error")
        completed = await _fail(request, response, error, keepalive)
    finally:
        if keepalive is not None:
            keepalive.close()
        await _close(chunks)
    return StreamEnd(response, completed, error)


class _KeepAlive:
    """Comments written by a timer while the stream's task awaits the adaptor. `quiet` comes before
    every write of the stream's own, so that a comment being written finishes first."""

    def __init__(self, request: web.Request, response: web.StreamResponse, every: float) -> None:
        self._request, self._response, self._every = request, response, every
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self.arm()

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._every, self._due)

    def _due(self) -> None:
        self._timer = None
        self._writing = self._loop.create_task(self._comment())

    async def _comment(self) -> None:
        if not self._response.prepared:
            await self._response.prepare(self._request)
        await self._response.write(WAITING)
        self.arm()

    async def quiet(self) -> None:
        """No comment from now on until `arm`; one being written is finished, and its error (the
        client gone) raised here."""
        self._disarm()
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing
            self._disarm()  # the comment re-armed the timer as it finished

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._disarm()
        writing, self._writing = self._writing, None
        if writing is None:
            return
        if not writing.done():
            writing.cancel()
        elif not writing.cancelled():
            writing.exception()  # the client gone: the stream's own task learns it from aiohttp


async def _fail(
    request: web.Request, response: web.StreamResponse, error: ApiError, keepalive: _KeepAlive | None
) -> bool:
    """Before the first byte the client still gets a plain error status (with its retry advice);
    after it, an event. Returns whether the client was still there to receive it."""
    try:
        if keepalive is not None:
            await keepalive.quiet()
        if not response.prepared:
            raise error
        await response.write(sse_error_event(error.status, error.message, envelope_of(request)))
        await response.write_eof()
    except ConnectionResetError:
        return False
    return True


async def _close(chunks: AsyncIterator[bytes]) -> None:
    """Stop the adaptor's generator now, so it closes its upstream connection now."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
