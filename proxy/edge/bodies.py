"""Request bodies as JSON, with the errors every JSON route answers, read within a deadline.

A body must arrive whole within `total_seconds`, and, after the first `grace_seconds`, at no less
than `min_bytes_per_second` on average; otherwise 408 and the connection is closed. Without these, a
client (or nginx, which streams bodies on) that never finishes a body holds the request, and the
memory of what it sent, forever.

Large bodies (over `LargeBodies.threshold` bytes) are parsed and validated a few at a time (the
semaphore `turns`), with the loop free between those steps. Parsing is CPU work that holds the
interpreter whichever thread does it, so it cannot be moved off the loop; what stalled everyone was
many large bodies' parses ready at once, each run in turn before anything else. A body is read at
its sender's pace before it waits for a turn, so that a slow sender holds none.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, NoReturn, cast

from aiohttp import hdrs, web

from proxy.core import json_codec
from proxy.core.body_limits import BodyDeadline
from proxy.core.dispatch import ClientBody
from proxy.core.schemas import validate_request
from proxy.core.state import STATE
from proxy.errors import ApiError


async def read_valid(request: web.Request, route: str) -> ClientBody:
    """The body of an OpenAI route, parsed and validated (a large one in its turn: it is read at
    the client's pace first, so that a slow sender holds no turn)."""
    raw = await _read_raw(request)
    large = request.app[STATE].large_bodies
    if len(raw) <= large.threshold:
        body, forwardable = _parsed(raw)
        validate_request(route, body)
        return ClientBody(cast(dict[str, Any], body), raw if forwardable else None)
    try:
        async with asyncio.timeout(large.wait_seconds):
            await large.turns.acquire()
    except TimeoutError:
        raise ApiError(
            503, "The gateway is busy with other large requests; try again shortly.", code="busy"
        ) from None
    try:
        body, forwardable = _parsed(raw)
        kept = raw if forwardable else None
        del raw
        await _others_first()
        validate_request(route, body)
        await _others_first()
        return ClientBody(cast(dict[str, Any], body), kept)
    finally:
        large.turns.release()


async def read_json(request: web.Request) -> Any:
    """The body of a JSON route without a request schema (asynchronous tasks take any document)."""
    return parse_json(await _read_raw(request))


async def _others_first() -> None:
    """A pause long enough for the loop to read the sockets that became ready meanwhile and run what
    they woke, before this body's next step; `sleep(0)` would run that step first."""
    await asyncio.sleep(0.001)


async def _read_raw(request: web.Request) -> bytes:
    """Missing Content-Type is read as JSON (raw clients); any other type is refused."""
    if hdrs.CONTENT_TYPE in request.headers and not _is_json(request.content_type):
        raise ApiError(
            415,
            f"Content-Type '{request.content_type}' is not supported; send 'application/json'.",
            code="unsupported_media_type",
        )
    try:
        raw = await read_body(request)
    except web.RequestPayloadError:
        # aiohttp decodes Content-Encoding as it reads: a body that is not what its header says.
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity")[:20]
        message = f"The request body could not be decoded as Content-Encoding '{encoding}'."
        raise ApiError(400, message, code="invalid_body") from None
    if not raw:
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    return raw


def parse_json(raw: bytes) -> Any:
    return _parsed(raw)[0]


def _parsed(raw: bytes) -> tuple[Any, bool]:
    """The document, and whether `raw` can be forwarded as it came (json_codec.loads)."""
    try:
        return json_codec.loads(raw, _DECODER)
    except (ValueError, RecursionError) as exc:
        reason = (
            exc.msg if isinstance(exc, json.JSONDecodeError) else "it is not UTF-8 JSON or nests too deeply"
        )
        raise ApiError(400, f"The request body is not valid JSON: {reason}.", code="invalid_json") from None


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The whole body, no larger than `limit` (default: the application's `client_max_size`),
    within the deadline. A body already received (most are: they come with the head) is taken
    without a timer; over the limit is a 413 as aiohttp raises it."""
    limit = request.client_max_size if limit is None else limit
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    content = request.content
    if content.is_eof():
        # Taken from the buffer as it is: `request.read()` would copy it twice and await twice to
        # learn what `is_eof` says. Its check against `client_max_size` is kept.
        received = content.read_nowait()
        most = request.client_max_size
        if len(received) > limit or (most and len(received) > most):
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(received))
        return received
    deadline = request.app[STATE].body_deadline
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = bytearray()
    while True:
        try:
            async with asyncio.timeout_at(deadline.until(started, len(body))):
                chunk = await content.readany()
        except TimeoutError:
            raise _too_slow(deadline, len(body), request.content_length) from None
        if not chunk:
            return bytes(body)
        body.extend(chunk)
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))


def _too_slow(deadline: BodyDeadline, received: int, expected: int | None) -> ApiError:
    of = f" of {expected}" if expected is not None else ""
    return ApiError(
        408,
        f"The request body did not arrive in time ({received}{of} bytes received): a body must arrive "
        f"within {deadline.total_seconds:g} s, at {deadline.min_bytes_per_second:g} bytes/s or more "
        f"after the first {deadline.grace_seconds:g} s.",
        code="request_timeout",
        close=True,
    )


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
"""One decoder for every body: `json.loads` with an option builds a new one each call."""
