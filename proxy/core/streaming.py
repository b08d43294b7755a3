"""Writes an adaptor's event stream to the client chunk by chunk, as each chunk arrives.

`response.write` waits while the client's socket buffer is full, so a slow reader slows the
upstream read instead of growing the gateway's memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from adaptors import StreamError
from proxy.errors import ApiError, Envelope, anthropic_error_body, envelope_of, error_body

log = logging.getLogger(__name__)

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
    request: web.Request, chunks: AsyncIterator[bytes], on_first_chunk: Callable[[], None] | None = None
) -> StreamEnd:
    """The headers leave with the first item, a keep-alive comment included; `on_first_chunk` is
    called at the first item that is not a comment, the model's first output."""
    response = _SSEResponse(headers=SSE_HEADERS)
    completed = False
    error = None
    first = on_first_chunk
    try:
        async for chunk in chunks:
            if not response.prepared:
                await response.prepare(request)
            if first is not None and not chunk.startswith(b":"):
                first()
                first = None
            await response.write(chunk)
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
        completed = await _fail(request, response, error)
    except Exception:
        log.exception("stream failed")
        error = ApiError(502, "The stream failed inside the gateway.", code="backend_error")
        completed = await _fail(request, response, error)
    finally:
        await _close(chunks)
    return StreamEnd(response, completed, error)


async def _fail(request: web.Request, response: web.StreamResponse, error: ApiError) -> bool:
    """Before the first byte the client still gets a plain error status (with its retry advice);
    after it, an event. Returns whether the client was still there to receive it."""
    if not response.prepared:
        raise error
    try:
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
