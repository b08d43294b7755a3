"""One request as the gateway saw it, from which the edge's observe middleware makes its metrics and
its record when the response, streams included, has ended.

Each part has one writer: the observe middleware opens the exchange (id, clocks, route) and closes
it (status, how it ended); the error middleware notes the message of the error it renders; dispatch
names the endpoint serving the request and keeps what the request produced (`Served`), the object
its runs return; the recorder adds who asked and from where as it takes the exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from adaptors import BaseEndpoint
from proxy.core.identity import User
from proxy.core.usage import Usage


@dataclass
class Served:
    """What one request to an endpoint produced: the response or the failure to raise, how it ended
    and what it used. Dispatch measures it, charges its tokens, then answers with it."""

    response: web.StreamResponse | None = None
    """None when the request failed: `failure` says how."""
    failure: BaseException | None = None
    """Raised again by `answer`, once the request has been measured and charged."""
    outcome: str = "cancelled"
    """The label of the endpoint's latency metrics: ok, client_error, backend_error, client_gone,
    cancelled."""
    task_id: str | None = None
    usage: Usage | None = None
    first_chunk: float | None = None
    """When a stream's first output left (the loop's monotonic clock)."""
    error: str | None = None
    """The error a stream ended with after its first byte (sent as an event, with status 200), so
    that its record does not read as a success."""
    client_closed: bool = False
    """The stream's client went away before its end (the handler still returns)."""
    result: str | None = None
    """Kept only when the operator configures `request_log.store_prompts`."""

    def answer(self) -> web.StreamResponse:
        if self.failure is not None:
            raise self.failure
        assert self.response is not None
        return self.response


@dataclass
class Exchange:
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
    prompt: str | None = None
    """Kept only when the operator configures `request_log.store_prompts`."""
    served: Served | None = None
    """What dispatch produced (for a federated request, its last attempt)."""
    error: str | None = None
    """The message its record keeps: the error it was answered with, the error its stream ended with,
    or that its client went away."""
    ended: float = 0.0
    status: int = 0
    user: User | None = None
    method: str = ""
    path: str = ""
    client_ip: str | None = None

    def serving(self, endpoint: BaseEndpoint, stream: bool) -> None:
        """Names the endpoint the request was handed to, for its metrics' labels and its record."""
        self.cluster, self.framework, self.model = endpoint.cluster, endpoint.framework, endpoint.model
        self.endpoint_slug, self.adaptor = endpoint.endpoint_slug, type(endpoint).__name__
        self.stream = stream

    @property
    def endpoint_labels(self) -> tuple[str, str, str]:
        return self.cluster, self.framework, self.model


EXCHANGE = web.RequestKey("exchange", Exchange)
