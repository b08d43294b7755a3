"""Prometheus metrics: what operators graph and alert on.

Label values come from configuration (route templates, the cluster, framework and model of a
configured endpoint, status classes), never from users, so cardinality stays bounded. Values are
kept by `proxy.metrics.tally`, on the event loop's thread; with PROMETHEUS_MULTIPROC_DIR set (several
worker processes), a scrape of any worker sums them all.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Generic, TypeVar, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.errors import ApiError
from proxy.metrics.build_info import BuildInfo
from proxy.metrics.process_metrics import ProcessMetrics
from proxy.metrics.tally import (
    SHARED_DIRECTORY_ENV,
    CounterValue,
    Family,
    GaugeValue,
    HistogramValue,
    Tallies,
)

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800,
)  # fmt: skip
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, *LATENCY_BUCKETS)
"""Authentication from the token cache takes tens of microseconds: with buckets from 5 ms up, its
quantiles read as milliseconds."""
ENDPOINT_LABELS = ("cluster", "framework", "model")

M = TypeVar("M", CounterValue, GaugeValue, HistogramValue)


class Bound(Generic[M]):
    """A family with every label but the last one fixed: its children are found by one string."""

    def __init__(self, family: Family[M], *fixed: str) -> None:
        self._family: Family[M] = family
        self._fixed = fixed
        self._children: dict[str, M] = {}

    def __call__(self, last: str) -> M:
        child = self._children.get(last)
        if child is None:
            child = self._children[last] = self._family.labels(*self._fixed, last)
        return child


class EndpointMeters:
    """What one endpoint's requests are measured with, found once per endpoint: a request touches
    six or more children, and looking each one up by its labels cost as much as updating it."""

    def __init__(self, metrics: Metrics, adaptor: str, cluster: str, framework: str, model: str) -> None:
        self.phase = Bound(metrics.phase_seconds, adaptor, cluster, framework, model)
        self.authentication, self.total = self.phase("authentication"), self.phase("total")
        self.outcome = Bound(metrics.adaptor_seconds, adaptor, cluster, framework, model)
        self.upstream_error = Bound(metrics.upstream_errors, adaptor, cluster, framework, model)
        self.tokens = Bound(metrics.tokens, cluster, framework, model)
        self._first_chunk = Bound(metrics.first_chunk_seconds, cluster, framework)
        self._model = model

    def first_chunk(self) -> HistogramValue:
        """Found on first use: endpoints that never stream export no empty histogram."""
        return self._first_chunk(self._model)


class _Unmeasured:
    """Every metric and child when metrics are switched off: each call does nothing."""

    def labels(self, *values: str) -> _Unmeasured:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_UNMEASURED = _Unmeasured()


class Metrics:
    """With `enabled` False (`metrics.enabled: false`) nothing is measured and nothing is served."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        shared = os.environ.get(SHARED_DIRECTORY_ENV)
        self.tallies = Tallies(Path(shared) if shared and enabled else None)
        self.registry = CollectorRegistry()
        self.registry.register(self.tallies)
        self.registry.register(BuildInfo())
        tallies = self.tallies
        endpoint_labels = list(ENDPOINT_LABELS)
        self.requests = self._use(
            tallies.counter(
                "gateway_requests", "HTTP requests answered", ["route", *endpoint_labels, "status_class"]
            )
        )
        self.in_flight = self._use(
            tallies.gauge("gateway_requests_in_flight", "Requests being handled", ["route"])
        )
        self.streams_in_flight = self._use(
            tallies.gauge("gateway_streams_in_flight", "Streams being relayed to clients")
        ).labels()
        self.adaptor_seconds = self._use(
            tallies.histogram(
                "gateway_adaptor_duration_seconds",
                "Time from handing a request to its adaptor to the end of its response "
                "(last chunk of a stream)",
                LATENCY_BUCKETS, ["adaptor", *endpoint_labels, "outcome"],
            )
        )  # fmt: skip
        self.phase_seconds = self._use(
            tallies.histogram(
                "gateway_phase_duration_seconds",
                "Where a request's time goes: authentication, queue (waiting for the backend to start), "
                "submission, first byte, total",
                PHASE_BUCKETS, ["adaptor", *endpoint_labels, "phase"],
            )
        )  # fmt: skip
        self.first_chunk_seconds = self._use(
            tallies.histogram(
                "gateway_stream_first_chunk_seconds",
                "Time from the request to the first chunk of a stream", LATENCY_BUCKETS, endpoint_labels,
            )
        )  # fmt: skip
        self.tokens = self._use(
            tallies.counter("gateway_tokens", "Tokens reported by backends", [*endpoint_labels, "kind"])
        )
        self.auth_cache = self._use(
            tallies.counter(
                "gateway_auth_cache_lookups", "Token outcome lookups by result: hit or miss", ["result"]
            )
        )
        self.introspection_seconds = self._use(
            tallies.histogram(
                "gateway_auth_introspection_duration_seconds",
                "Globus token introspection and groups lookup", LATENCY_BUCKETS,
            )
        ).labels()  # fmt: skip
        self.log_records_dropped = self._use(
            tallies.counter(
                "gateway_log_records_dropped", "Request records dropped because the database buffer was full"
            )
        ).labels()
        self.log_records_sampled_out = self._use(
            tallies.counter(
                "gateway_log_records_sampled_out",
                "Records of requests without a user left out of the database (unauthenticated_per_minute)",
            )
        ).labels()
        self.rate_limited = Bound(
            self._use(
                tallies.counter(
                    "gateway_rate_limited",
                    "Requests answered 429 by which limit: requests, concurrency, tokens_model, tokens_user",
                    ["kind"],
                )
            )
        )
        self.upstream_errors = self._use(
            tallies.counter(
                "gateway_upstream_errors", "Backend failures by kind: connect, timeout, 4xx, 5xx",
                ["adaptor", *endpoint_labels, "kind"],
            )
        )  # fmt: skip
        self.compute_tasks_in_flight = self._use(
            tallies.gauge("gateway_compute_tasks_in_flight", "Globus Compute tasks being waited for")
        ).labels()
        self.compute_poll_seconds = self._use(
            tallies.histogram(
                "gateway_compute_poll_duration_seconds", "One status request for all tasks in flight",
                LATENCY_BUCKETS,
            )
        ).labels()  # fmt: skip
        self.compute_results = Bound(
            self._use(
                tallies.counter(
                    "gateway_compute_results",
                    "Globus Compute results handed to their requests, by way: queue, poll",
                    ["source"],
                )
            )
        )
        self.compute_result_queues = self._use(
            tallies.gauge("gateway_compute_result_queues", "Globus Compute result queues being consumed")
        ).labels()
        self.relay_chunks = self._use(
            tallies.counter("gateway_relay_chunks", "Stream chunks received from remote functions")
        ).labels()
        self.deployment_replicas = self._use(
            tallies.gauge(
                "gateway_deployment_replicas", "On-demand replicas by phase (set by the controller's leader)",
                ["deployment", "phase"],
            )
        )  # fmt: skip
        self.deployment_starts = self._use(
            tallies.counter("gateway_deployment_starts", "Pilot jobs submitted", ["deployment"])
        )
        self.deployment_start_failures = self._use(
            tallies.counter(
                "gateway_deployment_start_failures",
                "Pilot jobs that ended, or could not be submitted, before their replica got ready",
                ["deployment"],
            )
        )

        if enabled:
            ProcessMetrics(tallies)
        self._endpoints: dict[tuple[str, str, str, str], EndpointMeters] = {}

    def endpoint(self, adaptor: str, cluster: str, framework: str, model: str) -> EndpointMeters:
        key = (adaptor, cluster, framework, model)
        meters = self._endpoints.get(key)
        if meters is None:
            meters = self._endpoints[key] = EndpointMeters(self, *key)
        return meters

    def _use(self, family: Family[M]) -> Family[M]:
        """Switched off, every metric is one that does nothing."""
        return family if self.enabled else cast(Family[M], _UNMEASURED)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class AdaptorTelemetry:
    """Adaptors' reports, labelled like the gateway's own metrics for the same endpoint."""

    def __init__(self, metrics: Metrics, labels: Callable[[str], tuple[str, str, str, str]]) -> None:
        self._metrics = metrics
        self._labels = labels

    def phase(self, endpoint_slug: str, phase: str, seconds: float) -> None:
        self._meters(endpoint_slug).phase(phase).observe(seconds)

    def upstream_error(self, endpoint_slug: str, kind: str) -> None:
        self._meters(endpoint_slug).upstream_error(kind).inc()

    def _meters(self, endpoint_slug: str) -> EndpointMeters:
        return self._metrics.endpoint(*self._labels(endpoint_slug))

    def tasks_in_flight(self, delta: int) -> None:
        self._metrics.compute_tasks_in_flight.inc(delta)

    def poll(self, seconds: float) -> None:
        self._metrics.compute_poll_seconds.observe(seconds)

    def result(self, source: str) -> None:
        self._metrics.compute_results(source).inc()

    def result_queue(self, up: bool) -> None:
        self._metrics.compute_result_queues.inc(1 if up else -1)


_STATUS_CLASSES: Final = tuple(f"{hundreds}xx" for hundreds in range(10))


def status_class(status: int) -> str:
    return _STATUS_CLASSES[status // 100] if 0 <= status < 1000 else "unknown"


def metrics_handler(metrics: Metrics, allowed: Iterable[str]) -> Handler:
    """`/metrics` needs no token, but only the configured networks may read it."""
    networks = [ipaddress.ip_network(network, strict=False) for network in allowed]

    async def serve(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = ipaddress.ip_address(peer[0]) if peer else None
        if address is None or not any(address in network for network in networks):
            raise ApiError(403, "Metrics are not served to this address.", code="permission_denied")
        body = metrics.exposition()
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return serve
