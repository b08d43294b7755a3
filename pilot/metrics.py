"""The pilot's Prometheus metrics, in a registry of its own (not the process-wide default, which
would also export whatever a library registers there)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pilot.models import ModelServer
from pilot.protocol import ModelState

CONTENT_TYPE = CONTENT_TYPE_LATEST


class PilotMetrics:
    def __init__(self, models: Mapping[str, ModelServer]) -> None:
        self._models = models
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "pilot_requests",
            "Requests forwarded to a model server, by model and answer status",
            ["model", "status"],
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "pilot_in_flight_requests", "Requests being forwarded", ["model"], registry=self.registry
        )
        self._state = Enum(
            "pilot_model_state",
            "Each model server's state",
            ["model"],
            states=[state.value for state in ModelState],
            registry=self.registry,
        )
        self._count = 0

    @property
    def in_flight(self) -> int:
        return self._count

    @contextlib.contextmanager
    def forwarding(self, model: str) -> Iterator[None]:
        self._count += 1
        gauge = self._in_flight.labels(model)
        gauge.inc()
        try:
            yield
        finally:
            self._count -= 1
            gauge.dec()

    def answered(self, model: str, status: int) -> None:
        self._requests.labels(model, str(status)).inc()

    def render(self) -> bytes:
        for name, server in self._models.items():
            self._state.labels(name).state(server.state.value)
        return generate_latest(self.registry)
