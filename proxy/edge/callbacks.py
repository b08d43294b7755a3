"""Routes that remote functions POST stream chunks to (the existing gateway's protocol).

They sit outside bearer authentication: the shared `X-Internal-Secret` and the per-stream
`X-Stream-Task-Token` are checked here, in constant time, before the body is trusted.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from typing import Any

from aiohttp import web

from adaptors.remote_errors import remote_error
from proxy.core import json_codec
from proxy.core.callback_relay import Delivery, Event, RelayUnavailable, sse_lines
from proxy.core.state import STATE
from proxy.edge.bodies import read_body
from proxy.errors import ApiError

log = logging.getLogger(__name__)

TOKEN = web.RequestKey("stream_token", str)

DATA_LIMIT = 150_000
CONTROL_LIMIT = 15_000
CALLBACK_ROUTES = frozenset({"stream-data", "stream-error", "stream-done"})

REFUSED_SECRET = (
    "The compute function's callbacks were refused: check INTERNAL_STREAMING_SECRET (the compute "
    "endpoint's value differs from this gateway's streaming.internal_secret)."
)
REFUSED_TOKEN = "The compute function's callbacks were refused: its stream token does not match this stream."
_LONGEST_STREAM_ID = 64

_ANSWERS = {
    Delivery.BAD_TOKEN: "The stream token does not match this stream.",
    Delivery.UNKNOWN: "No such stream.",
    Delivery.GONE: "The stream has ended or its client went away; stop sending.",
}


def add_callback_routes(app: web.Application, base_path: str) -> None:
    app.router.add_post(f"{base_path}/api/streaming/data/", data, name="stream-data")
    app.router.add_post(f"{base_path}/api/streaming/error/", error, name="stream-error")
    app.router.add_post(f"{base_path}/api/streaming/done/", done, name="stream-done")


async def data(request: web.Request) -> web.Response:
    body = await _checked_body(request, DATA_LIMIT)
    chunk = body.get("data")
    if not isinstance(chunk, str):
        raise ApiError(400, "'data' must be a string of SSE lines.", param="data")
    try:
        lines = sse_lines(chunk)
    except UnicodeEncodeError:
        raise ApiError(
            400, "'data' must be Unicode text (it holds a lone surrogate).", param="data"
        ) from None
    response = await _deliver(request, body, Event("data", lines))
    request.app[STATE].metrics.relay_chunks.inc()
    return response


async def error(request: web.Request) -> web.Response:
    body = await _checked_body(request, CONTROL_LIMIT)
    if not isinstance(body.get("error"), str):
        raise ApiError(400, "'error' must be a string.", param="error")
    failure = remote_error(body["error"])
    if failure.detail is not None:
        log.warning("a compute function reported a failed stream: %s", failure.detail[:2000])
    return await _deliver(request, body, Event("error", failure.message.encode(), failure.status))


async def done(request: web.Request) -> web.Response:
    """Our function says how many data posts it made (`data_posts`), so a done that overtakes the
    last data on the network still ends the stream after it; the existing function does not."""
    body = await _checked_body(request, CONTROL_LIMIT)
    posts = body.get("data_posts", 0)
    if not isinstance(posts, int) or isinstance(posts, bool) or posts < 0:
        raise ApiError(400, "'data_posts' must be a non-negative integer.", param="data_posts")
    return await _deliver(request, body, Event("done", after_posts=posts))


async def _deliver(request: web.Request, body: dict[str, Any], event: Event) -> web.Response:
    delivery = await request.app[STATE].relay.deliver(body["task_id"], request[TOKEN], event)
    if delivery is Delivery.BAD_TOKEN:
        await _note_refusal(request, body["task_id"], REFUSED_TOKEN)
    if delivery is not Delivery.ACCEPTED:
        raise ApiError(int(delivery), _ANSWERS[delivery], code="stream_" + delivery.name.lower())
    return web.Response(body=_received(body["task_id"]), content_type="application/json")


def _received(stream_id: str) -> bytes:
    """`{"status": "received", "task_id": ...}` (the existing gateway's answer), put together
    rather than encoded from a dictionary: it answers every chunk."""
    return b'{"status":"received","task_id":' + json.dumps(stream_id).encode() + b"}"


async def _checked_body(request: web.Request, limit: int) -> dict[str, Any]:
    secret = request.app[STATE].relay.settings.internal_secret
    if secret is None:
        raise ApiError(503, "Streaming callbacks are not configured on this gateway.", code="not_configured")
    # aiohttp keeps header bytes that are not UTF-8 as surrogates: encoded back, they are what was sent.
    given = request.headers.get("X-Internal-Secret", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, secret.encode()):
        await _refuse_sender(request, limit, REFUSED_SECRET)
        raise ApiError(401, "Invalid internal secret.", code="invalid_secret")
    token = request.headers.get("X-Stream-Task-Token", "")
    if not token.isascii():  # the gateway issues URL-safe tokens
        await _refuse_sender(request, limit, REFUSED_TOKEN)
        raise ApiError(401, "Malformed X-Stream-Task-Token.", code="invalid_stream_token")
    if not token:
        await _refuse_sender(request, limit, REFUSED_TOKEN)
        raise ApiError(401, "Missing X-Stream-Task-Token.", code="invalid_stream_token")
    request[TOKEN] = token
    body = await _read_capped(request, limit)
    try:
        document = json_codec.loads(body)[0]
    except (ValueError, RecursionError):
        raise ApiError(400, "The callback body is not JSON.", code="invalid_json") from None
    if not isinstance(document, dict) or not isinstance(document.get("task_id"), str):
        raise ApiError(400, "The callback body needs a string 'task_id'.", param="task_id")
    return document


async def _refuse_sender(request: web.Request, limit: int, message: str) -> None:
    """A function whose callbacks are refused keeps posting to nowhere (the existing one never
    stops): its stream, if the refused body names one, ends now with the reason."""
    try:
        document = json.loads(await _read_capped(request, limit))
    except (ApiError, ValueError, RecursionError):
        return
    stream_id = document.get("task_id") if isinstance(document, dict) else None
    if isinstance(stream_id, str):
        await _note_refusal(request, stream_id, message)


async def _note_refusal(request: web.Request, stream_id: str, message: str) -> None:
    if not 0 < len(stream_id) <= _LONGEST_STREAM_ID:
        return
    log.warning("a callback for stream %r was refused: %s", stream_id, message)
    with contextlib.suppress(RelayUnavailable):  # the callback still gets its 401 or 403
        await request.app[STATE].relay.refused(stream_id, message)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    """Within the request-body deadline (proxy/edge/bodies.py), as every body: refused callbacks are read
    too (to end the stream they name), so a sender without the secret must not hold a slow one."""
    try:
        return await read_body(request, limit)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, f"Callback bodies are limited to {limit} bytes.", code="request_too_large"
        ) from None
