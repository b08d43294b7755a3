"""What every request leaves behind: an X-Request-ID, metrics, and (once issue 5 lands the sinks)
a request record. The routes fill `RequestInfo` as they learn things; the outermost middleware
turns it into metrics when the response, streams included, has ended."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.metrics import Metrics, status_class
from proxy.usage import Usage

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class RequestInfo:
    request_id: str
    started: float
    started_at: float
    route: str
    cluster: str = ""
    framework: str = ""
    model: str = ""
    endpoint_slug: str = ""
    adaptor: str = ""
    stream: bool = False
    first_chunk: float | None = None
    usage: Usage | None = None
    task_id: str | None = None

    @property
    def endpoint_labels(self) -> tuple[str, str, str]:
        return self.cluster, self.framework, self.model


INFO = web.RequestKey("info", RequestInfo)


def observe_middleware(metrics: Metrics) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = RequestInfo(
            request_id=_request_id(request),
            started=time.monotonic(),
            started_at=time.time(),
            route=_route(request),
        )
        request[INFO] = info
        in_flight = metrics.in_flight.labels(info.route)
        in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            in_flight.dec()
            metrics.requests.labels(info.route, *info.endpoint_labels, status_class(status)).inc()

    return observe


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the request id, errors and streams included."""
    info = request.get(INFO)
    if info is not None:
        response.headers["X-Request-ID"] = info.request_id


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex


def _route(request: web.Request) -> str:
    """The route template, not the path: paths carry user input and would explode label counts."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
