"""What every request leaves behind: an X-Request-ID, metrics, and a request record (a JSON line on
stdout and a row in the database). The routes fill `RequestInfo` as they learn things; the
outermost middleware turns it into metrics and a record when the response, streams included, has
ended."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from proxy.auth import USER, User
from proxy.errors import RECORDED_ERROR
from proxy.metrics import Metrics, status_class
from proxy.record_keeping import UnauthenticatedSampler
from proxy.request_log import RECORD_DELAY_SECONDS, LineWriter, RecordSink, RequestRecord
from proxy.storable import stored_text
from proxy.usage import Usage

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
    error: str | None = None
    prompt: str | None = None
    result: str | None = None
    """Kept only when the operator configures `request_log.store_prompts`."""
    client_closed: bool = False
    """Set when a stream's client went away before its end (the handler still returns)."""
    ended: float = 0.0
    status: int = 0
    user: User | None = None
    method: str = ""
    path: str = ""
    client_ip: str | None = None
    """How the request ended, noted by `RequestLog.emit` for the record it builds a little later."""

    @property
    def endpoint_labels(self) -> tuple[str, str, str]:
        return self.cluster, self.framework, self.model


INFO = web.RequestKey("info", RequestInfo)


class RequestLog:
    """Where records go: stdout lines, and the database through a buffered sink that the database's
    lifecycle attaches once connected.

    A request's end is only noted; its record is built, written and handed to the sink with those of
    every request that ends within ``delay_seconds``. Built in one go rather than one at a time between
    other requests' work, records cost a busy gateway about 30% less CPU (docs/performance.md)."""

    def __init__(
        self,
        writer: LineWriter | None,
        trusted_proxies: Iterable[str],
        metrics: Metrics,
        store_prompts: bool,
        delay_seconds: float = RECORD_DELAY_SECONDS,
        unauthenticated_per_minute: int = 60,
    ) -> None:
        self.writer = writer
        self.store_prompts = store_prompts
        self.sink: RecordSink | None = None
        self._trusted = [ipaddress.ip_network(network, strict=False) for network in trusted_proxies]
        self._hops: dict[str, str] = {}
        self._metrics = metrics
        self._dropped = 0
        self._delay = delay_seconds
        self._ended: list[RequestInfo] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._sampler = UnauthenticatedSampler(unauthenticated_per_minute)

    def emit(self, request: web.Request, info: RequestInfo, status: int) -> None:
        if self.writer is None and self.sink is None:
            return
        info.ended = time.monotonic()
        info.status = status
        info.user = request.get(USER)
        info.method = request.method
        info.path = request.path
        info.client_ip = self.client_ip(request)
        self._ended.append(info)
        if self._closed:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.flush)

    def flush(self) -> None:
        """Build the records of the requests that ended since the last flush and hand them on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ended, self._ended = self._ended, []
        records = [_record(info) for info in ended]
        if self.writer is not None:
            for record in records:
                self.writer.write(record)
            self.writer.flush()
        if self.sink is not None:
            stored = self._sampler.kept(records)
            if len(stored) < len(records):
                self._metrics.log_records_sampled_out.inc(len(records) - len(stored))
            self.sink.submit(stored)
            if self.sink.dropped > self._dropped:
                self._metrics.log_records_dropped.inc(self.sink.dropped - self._dropped)
                self._dropped = self.sink.dropped

    def close(self) -> None:
        """Hand on what is waiting; from now on each record leaves as its request ends."""
        self._closed = True
        self.flush()

    def client_ip(self, request: web.Request) -> str | None:
        """The peer, or, when the peer is a trusted proxy, the nearest untrusted X-Forwarded-For hop.
        A hop that is no address (undecodable bytes, a name, garbage) stops the walk: the farthest
        address believed is then the nearest hop, a trusted one."""
        peer = request.remote  # aiohttp asks the socket once per connection
        forwarded = request.headers.get(hdrs.X_FORWARDED_FOR)
        if not forwarded:
            return peer[:64] if peer else None
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()] + ([peer] if peer else [])
        while len(hops) > 1 and self._hop(hops[-1]) is _TRUSTED and self._hop(hops[-2]) is not _NO_ADDRESS:
            hops.pop()
        return hops[-1][:64] if hops and self._hop(hops[-1]) is not _NO_ADDRESS else None

    def _hop(self, hop: str) -> str:
        """Cached: nearly every request comes from the same few proxies."""
        kind = self._hops.get(hop)
        if kind is None:
            try:
                address = ipaddress.ip_address(hop) if len(hop) <= 64 else None
            except ValueError:
                address = None
            if address is None:
                kind = _NO_ADDRESS
            else:
                kind = _TRUSTED if any(address in network for network in self._trusted) else _UNTRUSTED
            if len(self._hops) < 4096:
                self._hops[hop] = kind
        return kind


_TRUSTED: Final = "trusted"
_UNTRUSTED: Final = "untrusted"
_NO_ADDRESS: Final = "no address"


def _record(info: RequestInfo) -> RequestRecord:
    user = info.user
    usage = info.usage or _NO_USAGE
    return RequestRecord(
        request_id=info.request_id,
        started_at=info.started_at,
        duration_ms=_milliseconds(info.ended - info.started),
        ttfc_ms=None if info.first_chunk is None else _milliseconds(info.first_chunk - info.started),
        method=info.method,
        route=info.route,
        path=stored_text(info.path[:512]),
        status=info.status,
        user_id=user.id if user else None,
        username=user.username if user else None,
        cluster=info.cluster or None,
        framework=info.framework or None,
        model=info.model or None,
        endpoint_slug=info.endpoint_slug or None,
        stream=info.stream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        usage_estimated=usage.estimated,
        task_id=stored_text(info.task_id),
        client_ip=info.client_ip,
        error=stored_text(info.error),
        prompt=stored_text(info.prompt),
        result=stored_text(info.result),
    )


def _milliseconds(seconds: float) -> float:
    """To the microsecond; round() to a number of digits takes more than twice as long."""
    return round(seconds * 1_000_000) / 1000


_NO_USAGE: Final = Usage()
REQUEST_LOG = web.AppKey("request_log", RequestLog)


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
        if request.match_info.route.name in QUIET_ROUTES:
            return await handler(request)
        in_flight = metrics.in_flight.labels(info.route)
        in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if status >= 400 and isinstance(response, web.Response):
                info.error = response.get(RECORDED_ERROR) or _error_message(response)
            elif info.client_closed:
                status, info.error = CLIENT_CLOSED, CLIENT_CLOSED_MESSAGE
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            if request.transport is None:  # aiohttp cancels the handler of a connection that was lost
                status, info.error = CLIENT_CLOSED, CLIENT_CLOSED_MESSAGE
            raise
        finally:
            in_flight.dec()
            metrics.requests.labels(info.route, *info.endpoint_labels, status_class(status)).inc()
            request.app[REQUEST_LOG].emit(request, info, status)

    return observe


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the request id, errors and streams included."""
    info = request.get(INFO)
    if info is not None:
        response.headers["X-Request-ID"] = info.request_id


def _error_message(response: web.Response) -> str | None:
    try:
        return str(json.loads(response.body)["error"]["message"])[:1000]  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError):
        return None


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if _VALID_REQUEST_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def _route(request: web.Request) -> str:
    """The route template, not the path: paths carry user input and would explode label counts."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
