"""Holding a request while its deployment has no ready replica: what it is told, and when it
stops waiting.

A held request waits while the deployment's ETA fits within what remains of its wait; it is
refused at once (503 with `Retry-After` from the ETA) when the ETA does not fit, when the
deployment backs off after failed starts, or when too many requests of this process wait for the
deployment already; a deployment that is not deployed here is a 503 the client should not retry.
A stream waiting for its replica carries SSE comments with the phase and the ETA, which SSE
clients (openai's and anthropic's included) skip, as they skip the gateway's keep-alives
(proxy/core/streaming.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from adaptors.deployments import Phase, Progress

_DOING = {
    Phase.idle: "is asking the scheduler for a replica",
    Phase.queued: "is queued in the scheduler",
    Phase.starting: "is starting on a compute node",
    Phase.loading: "is loading the model",
    Phase.ready: "is ready",
    Phase.backing_off: "is backing off after failed starts",
    Phase.unavailable: "is unavailable",
}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
"""Control characters, and whatever `str.splitlines` ends a line at (some SSE clients split so)."""
_LONGEST_DETAIL = 200


class NotNow(Exception):
    """The request cannot wait (longer) for a replica: the client's status and retry advice."""

    def __init__(
        self, status: int, message: str, *, retryable: bool | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class HeldCount:
    """Requests of this process held for one deployment, shared by the endpoints (and the reloads'
    generations of them) that declare it."""

    def __init__(self) -> None:
        self.held = 0

    def take(self, limit: int) -> Slot | None:
        """A place among the held, or None when `limit` of them are held already."""
        if self.held >= limit:
            return None
        self.held += 1
        return Slot(self)


class Slot:
    """One held request's place; released once, when it stops waiting however it stops."""

    def __init__(self, count: HeldCount) -> None:
        self._count: HeldCount | None = count

    def release(self) -> None:
        if self._count is not None:
            self._count.held -= 1
            self._count = None


@dataclass(frozen=True)
class WaitLimit:
    """How long one kind of request (streamed or not) may be held."""

    seconds: float
    kind: str
    """How the client's request is named in messages: "request", "stream"."""


def describe(name: str, progress: Progress) -> str:
    """`deployment llama-8b is queued in the scheduler, ready in about 540 s (job 12.pbs)`: the
    controller's detail (which may quote a scheduler) without its control characters and line
    separators, so that it can neither end an SSE comment nor forge an event after it."""
    text = f"deployment {name} {_DOING[progress.phase]}"
    if progress.eta_seconds is not None and progress.phase is not Phase.backing_off:
        text += f", ready in about {_seconds(progress.eta_seconds)} s"
    detail = _CONTROL.sub(" ", progress.detail).strip()[:_LONGEST_DETAIL]
    return f"{text} ({detail})" if detail else text


def comment(name: str, progress: Progress) -> bytes:
    return f": {describe(name, progress)}\n\n".encode()


def refusal(name: str, progress: Progress, remaining: float, limit: WaitLimit) -> NotNow | None:
    """Why a request with `remaining` seconds of its wait left stops waiting now; None: it waits."""
    if progress.phase is Phase.unavailable:
        return NotNow(503, f"{describe(name, progress)}.", retryable=False)
    if progress.phase is Phase.backing_off:
        message = f"{describe(name, progress)}; try again later."
        return NotNow(503, message, retry_after=progress.eta_seconds)
    eta = progress.eta_seconds
    if remaining <= 0:
        message = f"{describe(name, progress)}: no replica was ready within the {limit.kind}'s wait of "
        return NotNow(503, f"{message}{_seconds(limit.seconds)} s.", retry_after=eta)
    if eta is not None and eta > remaining:
        message = f"{describe(name, progress)}, past the {limit.kind}'s wait of {_seconds(limit.seconds)} s."
        return NotNow(503, f"{message} Try again then.", retry_after=eta)
    return None


def too_many(name: str, progress: Progress, expected_start: float) -> NotNow:
    eta = progress.eta_seconds if progress.eta_seconds is not None else expected_start
    message = f"Too many requests wait for deployment {name} already; {describe(name, progress)}."
    return NotNow(503, message, retry_after=eta)


def _seconds(value: float) -> int:
    return max(0, math.ceil(value))
