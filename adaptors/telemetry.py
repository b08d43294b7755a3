"""What adaptors may report about their backends, so that operators see where time goes.

The server hands an implementation to adaptors in `AdaptorContext.telemetry` (Prometheus metrics in
this gateway); adaptors never import the server. Endpoints are named by their slug. Call it on the
event loop's thread, as adaptors' coroutines run: the gateway's metrics take no lock.
"""

from __future__ import annotations

from typing import Literal, Protocol

ErrorKind = Literal["connect", "timeout", "4xx", "5xx"]
ResultSource = Literal["queue", "poll"]


class Telemetry(Protocol):
    def phase(self, endpoint_slug: str, phase: str, seconds: float) -> None:
        """A stretch of one request's time, e.g. "queue": waiting for the backend to start it."""
        ...

    def upstream_error(self, endpoint_slug: str, kind: ErrorKind) -> None: ...

    def tasks_in_flight(self, delta: int) -> None:
        """Remote tasks being waited for (Globus Compute)."""
        ...

    def poll(self, seconds: float) -> None:
        """One status request for every task in flight."""
        ...

    def result(self, source: ResultSource) -> None:
        """A task's result (or failure) reached the request waiting for it, by this way."""
        ...

    def result_queue(self, up: bool) -> None:
        """A consumer of the service's result queue began (True) or stopped (False) consuming."""
        ...


class NoTelemetry:
    """For adaptors used outside a gateway (tests, scripts)."""

    def phase(self, endpoint_slug: str, phase: str, seconds: float) -> None:
        return None

    def upstream_error(self, endpoint_slug: str, kind: ErrorKind) -> None:
        return None

    def tasks_in_flight(self, delta: int) -> None:
        return None

    def poll(self, seconds: float) -> None:
        return None

    def result(self, source: ResultSource) -> None:
        return None

    def result_queue(self, up: bool) -> None:
        return None
