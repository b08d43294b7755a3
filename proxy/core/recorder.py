"""From what a request left behind to its record: a JSON line on stdout and a row in the database,
built in batches a little after the requests end."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterable
from typing import Final

from aiohttp import hdrs, web

from proxy.core.exchange import Exchange, Served
from proxy.core.identity import USER
from proxy.core.usage import Usage
from proxy.metrics.prometheus import Metrics
from proxy.records.line_writer import LineWriter
from proxy.records.record import RECORD_DELAY_SECONDS, RequestRecord
from proxy.records.record_keeping import UnauthenticatedSampler
from proxy.records.record_sink import RecordSink
from proxy.records.storable import stored_text


class Recorder:
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
        self._ended: list[Exchange] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._sampler = UnauthenticatedSampler(unauthenticated_per_minute)

    def emit(self, request: web.Request, exchange: Exchange, status: int) -> None:
        if self.writer is None and self.sink is None:
            return
        exchange.ended = time.monotonic()
        exchange.status = status
        exchange.user = request.get(USER)
        exchange.method = request.method
        exchange.path = request.path
        exchange.client_ip = self.client_ip(request)
        self._ended.append(exchange)
        if self._closed:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.flush)

    def emit_line(self, exchange: Exchange) -> None:
        """A batch line's record (proxy/core/batch_runner.py): its exchange already names its user,
        method, path and status, since no HTTP request carried it."""
        if self.writer is None and self.sink is None:
            return
        exchange.ended = time.monotonic()
        self._ended.append(exchange)
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
        records = [_record(exchange) for exchange in ended]
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


def _record(exchange: Exchange) -> RequestRecord:
    user = exchange.user
    served = exchange.served or _NOT_SERVED
    usage = served.usage or _NO_USAGE
    return RequestRecord(
        request_id=exchange.request_id,
        started_at=exchange.started_at,
        duration_ms=_milliseconds(exchange.ended - exchange.started),
        ttfc_ms=None if served.first_chunk is None else _milliseconds(served.first_chunk - exchange.started),
        method=exchange.method,
        route=exchange.route,
        path=stored_text(exchange.path[:512]),
        status=exchange.status,
        user_id=user.id if user else None,
        username=user.username if user else None,
        cluster=exchange.cluster or None,
        framework=exchange.framework or None,
        model=exchange.model or None,
        endpoint_slug=exchange.endpoint_slug or None,
        stream=exchange.stream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        usage_estimated=usage.estimated,
        task_id=stored_text(served.task_id),
        client_ip=exchange.client_ip,
        error=stored_text(exchange.error),
        prompt=stored_text(exchange.prompt),
        result=stored_text(served.result),
    )


def _milliseconds(seconds: float) -> float:
    """To the microsecond; round() to a number of digits takes more than twice as long."""
    return round(seconds * 1_000_000) / 1000


_NO_USAGE: Final = Usage()
_NOT_SERVED: Final = Served()
