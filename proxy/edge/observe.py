"""The outermost middleware: every request gets an X-Request-ID, and leaves metrics and a request
record behind. It opens the request's `Exchange` (proxy/core/exchange.py), which the error middleware
and dispatch add to, and when the response, streams included, has ended, turns it into metrics and
hands it to the recorder."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Collection
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.core.exchange import EXCHANGE, Exchange
from proxy.core.recorder import Recorder
from proxy.metrics.prometheus import Metrics, status_class

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()
"""Request ids: random per process, then counted, so that ids are unique across processes and
hosts without a system call per request."""
QUIET_ROUTES = frozenset({"metrics", "health"})
"""Route names of scrapes and health probes: every few seconds, they would drown real requests in
records and request rates, and a scrape would count itself in flight. They get only a request id."""
CLIENT_CLOSED: Final = 499
"""nginx's status for a request whose client went away before its answer: not the gateway's error."""
CLIENT_CLOSED_MESSAGE: Final = "The client closed the connection."


def observe_middleware(
    metrics: Metrics,
    recorder: Recorder,
    quiet: Collection[str] = QUIET_ROUTES,
    callbacks: Collection[str] = (),
) -> Middleware:
    """``quiet``: route names that get only a request id (QUIET_ROUTES, and the dashboard's pages:
    an administrator looking at usage is not usage). ``callbacks``: the routes remote functions
    post each chunk of a stream to (proxy/edge/callbacks.py), hundreds a second per busy process:
    counted by outcome in `gateway_requests_total`, but recorded only when refused or failed. A
    chunk accepted is part of the stream whose own request has its record; a refused one is what
    an operator looks for (a wrong secret, a stream gone), so it keeps its record and its warning."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = Exchange(
            request_id=_request_id(request),
            started=time.monotonic(),
            started_at=time.time(),
            route=_route(request),
        )
        request[EXCHANGE] = exchange
        name = request.match_info.route.name
        if name in quiet:
            return await handler(request)
        chunk = name in callbacks
        in_flight = None if chunk else metrics.in_flight.labels(exchange.route)
        if in_flight is not None:
            in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            served = exchange.served
            if status < 400 and served is not None:
                if served.client_closed:
                    status, exchange.error = CLIENT_CLOSED, CLIENT_CLOSED_MESSAGE
                else:
                    exchange.error = served.error
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            if request.transport is None:  # aiohttp cancels the handler of a connection that was lost
                status, exchange.error = CLIENT_CLOSED, CLIENT_CLOSED_MESSAGE
            raise
        finally:
            if in_flight is not None:
                in_flight.dec()
            metrics.requests.labels(exchange.route, *exchange.endpoint_labels, status_class(status)).inc()
            if not chunk or status >= 400:
                recorder.emit(request, exchange, status)

    return observe


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the request id, errors and streams included."""
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        response.headers["X-Request-ID"] = exchange.request_id


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if _VALID_REQUEST_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _route(request: web.Request) -> str:
    """The route template, not the path: paths carry user input and would explode label counts."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
