"""Forwarding `/deployments/{name}/{path}` to the model server on 127.0.0.1, chunk by chunk both
ways: the request body is sent as it arrives and the answer (a server-sent event stream, say) is
written back as the server writes it, so the pilot adds no buffering to a stream's latency.

Small messages of a declared length are the exception: a request body up to WHOLE_BYTES is read
whole and sent with its headers, and an answer up to WHOLE_BYTES that is not an event stream is
read whole and written back in one piece. Written in parts, each part would be a TLS record and a
socket write of its own and wake the reader once more, which made most of the pilot's hop
(docs/performance.md, on demand).

Bodies are passed through as they are (no decompression: `Content-Encoding` and `Content-Length`
stay true); the hop-by-hop headers of each connection are dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from pilot.metrics import PilotMetrics
from pilot.models import ModelServer
from pilot.protocol import ModelState

log = logging.getLogger("pilot.forward")

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Above the gateway's own limit on request bodies (20 MiB by default): a backstop only."""
BODY_STALL_SECONDS = 60.0
"""A pause this long between two parts of a request body is a broken hop, not a slow client."""
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 900.0
"""Between two chunks of the model server's answer: a long prompt's first token can be minutes away
on a busy server; the gateway's own timeouts are the ones that shape what users see."""
WHOLE_BYTES = 1024 * 1024
"""Request bodies and answers of a declared length up to this size are passed on whole."""
LOADING_RETRY_AFTER_SECONDS = 10
MAX_CONNECTIONS = 1024

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


def end_to_end(headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """`headers` without the hop-by-hop ones, those the `Connection` header names included."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")
    }
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP and lowered not in named and lowered not in drop:
            kept.add(name, value)
    return kept


def upstream_session() -> aiohttp.ClientSession:
    """One session for every forwarded request: connections to the model servers are reused."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, force_close=False),
        auto_decompress=False,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=READ_TIMEOUT_SECONDS
        ),
    )


class _Body:
    """The request body as it arrives: refused past MAX_BODY_BYTES, or when the next part is more
    than BODY_STALL_SECONDS away."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.refusal: tuple[int, str] | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        content = self._request.content
        while True:
            try:
                async with asyncio.timeout(BODY_STALL_SECONDS):  # no task per part, as wait_for makes
                    chunk = await content.readany()
            except TimeoutError:
                self.refusal = (408, f"no part of the request body for {BODY_STALL_SECONDS:g} s")
                raise aiohttp.ClientPayloadError("request body stalled") from None
            if not chunk:
                return
            received += len(chunk)
            if received > MAX_BODY_BYTES:
                self.refusal = (413, f"request bodies are limited to {MAX_BODY_BYTES} bytes")
                raise aiohttp.ClientPayloadError("request body too large")
            yield chunk

    async def whole(self) -> bytes:
        """The body read to its end, with the same limits as `chunks`."""
        return b"".join([chunk async for chunk in self.chunks()])


def _whole(length: int | None, headers: CIMultiDictProxy[str]) -> bool:
    """A message of a declared length small enough to pass on in one piece; never an event stream,
    whose events must go on as they come."""
    content_type = headers.get("Content-Type", "")
    return length is not None and length <= WHOLE_BYTES and not content_type.startswith("text/event-stream")


async def forward(
    request: web.Request, session: aiohttp.ClientSession, server: ModelServer, metrics: PilotMetrics
) -> web.StreamResponse:
    if server.state is ModelState.loading:
        return error(
            503,
            f"model {server.name} is loading",
            "model_loading",
            {"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)},
        )
    if server.state is ModelState.failed:
        return error(503, f"model {server.name} failed: {server.detail}", "model_failed")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return error(413, f"request bodies are limited to {MAX_BODY_BYTES} bytes", "invalid_request_error")
    # The path as the client encoded it (an escaped `/` stays escaped), after `/deployments/{name}`.
    tail = request.rel_url.raw_path.removeprefix(f"/deployments/{server.name}")
    url = URL.build(
        scheme="http",
        host="127.0.0.1",
        port=server.port,
        path=tail,
        query_string=request.rel_url.raw_query_string,
        encoded=True,
    )
    body = _Body(request)
    with metrics.forwarding(server.name):
        answer = await _relay(request, session, url, body, server.name)
        metrics.answered(server.name, answer.status)
        return answer


async def _relay(
    request: web.Request, session: aiohttp.ClientSession, url: URL, body: _Body, name: str
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    data: bytes | AsyncIterator[bytes] | None = None
    try:
        if request.body_exists:
            data = await body.whole() if _whole(request.content_length, request.headers) else body.chunks()
        async with session.request(
            request.method,
            url,
            # Host is the model server's; an Expect was answered by this server already.
            headers=end_to_end(request.headers, frozenset({"host", "expect"})),
            data=data,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        ) as upstream:
            if request.method != "HEAD" and _whole(upstream.content_length, upstream.headers):
                content = await upstream.read()
                # aiohttp counts the length itself, and it is the same: the body is passed as it came.
                kept = end_to_end(upstream.headers, frozenset({"content-length"}))
                return web.Response(
                    status=upstream.status, reason=upstream.reason, body=content, headers=kept
                )
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(end_to_end(upstream.headers))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        if response is not None:
            # The status is sent: all that is left is to cut the connection, so that the client
            # sees the answer break off as the server's did rather than end cleanly.
            transport = request.transport
            if transport is None or transport.is_closing():
                log.debug("%s: the client left during the answer", name)
            else:
                log.warning("%s: the model server's answer broke off: %s", name, exc)
                transport.abort()
            return response
        if body.refusal is not None:
            return error(*body.refusal, "invalid_request_error")
        log.warning("%s: no answer from the model server: %s", name, exc)
        return error(502, f"model {name}'s server did not answer", "model_unreachable")
