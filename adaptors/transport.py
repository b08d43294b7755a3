"""One map from the failures of a backend's transport to what the client is told.

Adaptors reach their backends through the gateway's own HTTP client (adaptors/http_client.py),
aiohttp, globus-sdk (on requests) or a site's own library.
Each used to turn those exceptions into a status and a message its own way; here one table does it
for all of them, as httpx maps its transports' exceptions to its own in one place. A failure becomes
a `TransportFailure`: the HTTP status (502 unreachable or refused, 503 a service that is down or
busy, 504 no answer in time), a message for the client that names no host or address, whether a
retry may help, and the kind adaptors report to `Telemetry.upstream_error`.

Rows are tried in order and the first whose type matches wins, so the most specific come first:
aiohttp's timeouts are also connection errors (`ServerTimeoutError` derives from both) and must read
as timeouts. It runs only once something failed: a request that succeeds never reaches it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import globus_sdk
import requests

from adaptors.http_wire import HTTPFailure
from adaptors.telemetry import ErrorKind

__all__ = ["TransportFailure", "transport_failure"]


@dataclass(frozen=True, slots=True)
class TransportFailure:
    status: int
    message: str
    """For the client: the service's name and the exception's type, never its text (which names
    internal hosts)."""
    retryable: bool | None
    """False when the same request would fail the same way (a service refusing the gateway's
    credentials or configuration); None when nothing ran, and a retry may well succeed."""
    kind: ErrorKind


@dataclass(frozen=True, slots=True)
class _Where:
    service: str
    timeout: float | None
    started: bool

    @property
    def subject(self) -> str:
        """The service's name at the start of a sentence."""
        return self.service[:1].upper() + self.service[1:]


def _timed_out(exc: BaseException, where: _Where) -> TransportFailure:
    if where.timeout is None:
        message = f"{where.subject} did not answer in time."
    elif where.started:
        message = f"{where.subject} sent nothing for {where.timeout:g} seconds."
    else:
        message = f"{where.subject} did not answer within {where.timeout:g} seconds."
    return TransportFailure(504, message, None, "timeout")


def _unreachable(exc: BaseException, where: _Where) -> TransportFailure:
    if where.started:
        return TransportFailure(
            502, f"{where.subject} closed the stream before it finished.", None, "connect"
        )
    name = exc.shown if isinstance(exc, HTTPFailure) else type(exc).__name__
    return TransportFailure(502, f"Cannot reach {where.service} ({name}).", None, "connect")


def _service_answered(exc: BaseException, where: _Where) -> TransportFailure:
    """A service such as Globus Compute answered an error status. Refused outright (a 4xx other than
    429: an unknown endpoint or function, no permission, bad credentials), the gateway's
    configuration is at fault and retrying cannot help; busy or failing (429, 5xx), it may pass."""
    status = exc.http_status if isinstance(exc, globus_sdk.GlobusAPIError) else 500
    kind: ErrorKind = "4xx" if status < 500 else "5xx"
    if status < 500 and status != 429:
        message = (
            f"{where.subject} refused the request (HTTP {status}): the gateway's configuration of this "
            "endpoint needs fixing."
        )
        return TransportFailure(502, message, False, kind)
    return TransportFailure(
        503, f"{where.subject} is unavailable (HTTP {status}); try again shortly.", None, kind
    )


def _service_unreachable(exc: BaseException, where: _Where) -> TransportFailure:
    """A queueing service that did not answer (or timed out): the work can wait, so "come back" (503),
    not the "no answer" of a backend that was running the request (504)."""
    kind: ErrorKind = "timeout" if isinstance(exc, globus_sdk.GlobusTimeoutError) else "connect"
    return TransportFailure(503, f"{where.subject} did not answer; try again shortly.", None, kind)


_RULES: tuple[tuple[type[BaseException], Callable[[BaseException, _Where], TransportFailure]], ...] = (
    (globus_sdk.GlobusAPIError, _service_answered),
    (globus_sdk.GlobusError, _service_unreachable),
    (TimeoutError, _timed_out),
    (requests.Timeout, _timed_out),
    (HTTPFailure, _unreachable),
    (aiohttp.ClientError, _unreachable),
    (OSError, _unreachable),
)
"""globus-sdk wraps the requests it makes (`NetworkError`), so only a site's own requests calls
reach the `requests.Timeout` row; its other errors are `OSError`s. The gateway's own client's
timeouts are `TimeoutError`s; its other failures name themselves as aiohttp's client named the
same failures (`HTTPFailure.shown`), so clients read the messages they read before it."""


def transport_failure(
    exc: BaseException,
    service: str = "the backend",
    *,
    timeout: float | None = None,
    started: bool = False,
) -> TransportFailure:
    """What to tell the client of `exc`, raised by a call to `service` ("the backend", "Globus
    Compute"). `timeout` is the limit that expired, if known; `started` says the answer had begun
    (a stream that stalled or broke rather than one that never came). An exception the table does
    not know is treated as an unreachable service."""
    where = _Where(service, timeout, started)
    for kind, rule in _RULES:
        if isinstance(exc, kind):
            return rule(exc, where)
    return _unreachable(exc, where)
