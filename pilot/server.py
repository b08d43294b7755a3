"""The pilot's one port: mutual TLS, then each request authorized by its client certificate's
subject, denied unless a rule below allows it.

    gateway subjects   ANY  /deployments/{name}/{path}   forwarded to the model server
                       GET  /pilot/status                 the heartbeat the gateway would receive
                       POST /pilot/stop                   stop as a heartbeat's `stop` order would
    metrics subjects   GET  /metrics                      Prometheus text

A client without a certificate from the site CA never gets this far: the handshake fails. Every
control request (all but the forwarded ones) and every refusal is logged with the subject.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from mtls.certificates import subject_of
from pilot.forward import error, forward, upstream_session
from pilot.metrics import CONTENT_TYPE, PilotMetrics
from pilot.models import ModelServer
from pilot.protocol import Heartbeat

log = logging.getLogger("pilot.server")

DRAIN_SECONDS = 30.0
"""On stop, how long requests in flight (streams included) may still run."""
KEEPALIVE_SECONDS = 75.0
BACKLOG = 1024


@dataclass(frozen=True)
class Serving:
    """What the routes need from the rest of the pilot."""

    models: Mapping[str, ModelServer]
    gateway_subjects: frozenset[str]
    metrics_subjects: frozenset[str]
    metrics: PilotMetrics
    status: Callable[[], Heartbeat]
    stop: Callable[[str], None]


SERVING = web.AppKey("serving", Serving)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@functools.lru_cache(maxsize=64)
def _subject_of(der: bytes) -> str:
    return subject_of(der)


def peer_subject(transport: asyncio.BaseTransport | None) -> str | None:
    """mtls.contexts.peer_subject, with each certificate parsed once rather than on every request:
    a parse takes tens of microseconds, and the pilot's whole hop should stay under a millisecond."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return _subject_of(der) if der else None


def _allowed(serving: Serving, request: web.Request) -> frozenset[str]:
    """The subjects that may make this request; empty for a request no rule allows."""
    method, path = request.method, request.path
    if path.startswith("/deployments/"):
        return serving.gateway_subjects
    if (method, path) in {("GET", "/pilot/status"), ("POST", "/pilot/stop")}:
        return serving.gateway_subjects
    if (method, path) == ("GET", "/metrics"):
        return serving.metrics_subjects
    return frozenset()


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    serving = request.app[SERVING]
    subject = peer_subject(request.transport)
    if subject is None or subject not in _allowed(serving, request):
        log.warning("refused %s %s from %s: 403", request.method, request.path, subject or "(no certificate)")
        return error(403, "this certificate may not make this request", "forbidden")
    try:
        answer = await handler(request)
    except web.HTTPException as exc:  # the router's 404 and 405, as JSON like every other error
        answer = error(exc.status, exc.reason, "invalid_request_error")
    if request.path.startswith("/deployments/"):
        return answer
    log.info("%s %s from %s: %d", request.method, request.path, subject, answer.status)
    return answer


async def _deployment(request: web.Request) -> web.StreamResponse:
    serving = request.app[SERVING]
    server = serving.models.get(request.match_info["name"])
    if server is None:
        return error(404, f"no model {request.match_info['name']!r} on this pilot", "not_found")
    return await forward(request, request.app[UPSTREAM], server, serving.metrics)


async def _status(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SERVING].status().model_dump_json(), content_type="application/json")


async def _stop(request: web.Request) -> web.Response:
    request.app[SERVING].stop(f"POST /pilot/stop from {peer_subject(request.transport)}")
    return web.Response(status=202, text=json.dumps({"stopping": True}), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[SERVING].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    async with upstream_session() as session:
        app[UPSTREAM] = session
        yield


def create_app(serving: Serving) -> web.Application:
    app = web.Application(middlewares=[_authorize])
    app[SERVING] = serving
    app.cleanup_ctx.append(_upstream)
    app.router.add_route("*", "/deployments/{name}/{path:.*}", _deployment)
    app.router.add_get("/pilot/status", _status, allow_head=False)
    app.router.add_post("/pilot/stop", _stop)
    app.router.add_get("/metrics", _metrics, allow_head=False)
    return app


class PilotServer:
    """The app on its port. `stop` stops accepting, lets requests in flight finish for up to
    DRAIN_SECONDS, then closes what is left."""

    def __init__(self, serving: Serving, context: ssl.SSLContext) -> None:
        self._runner = web.AppRunner(
            create_app(serving),
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_SECONDS,
            shutdown_timeout=DRAIN_SECONDS,
        )
        self._context = context
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self._context, backlog=BACKLOG).start()
        log.info("serving on https://%s:%d (mutual TLS)", host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()
