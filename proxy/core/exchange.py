"""What the gateway learns about one request as it serves it, from which its metrics and its record
are made when the response, streams included, has ended."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.core.identity import User
from proxy.core.usage import Usage


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
