"""A budget of calls per second with a small burst (a token bucket), for the Globus Compute result poller.

Why a budget and not a fixed spacing between calls: the cap that matters to the service is the
average rate of status calls (no more than one every 50 ms, what a fixed 50 ms cadence makes). A
fixed spacing also delays a fresh task's first look whenever the previous call was recent, although
the poller may have been idle for most of the last second. The budget fills at `rate` calls a second
up to `burst` calls, and each call spends one: over any span of T seconds at most `burst + rate * T`
calls go out, and after a quiet spell the next few go out at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CallBudget:
    """`rate` calls a second in the long run, at most `burst` of them back to back."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    """Seconds, increasing; tests pass a clock of their own."""
    _tokens: float = field(init=False)
    _at: float = field(init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a call budget needs a positive rate and room for one call")
        self._tokens = self.burst
        self._at = self.clock()

    def wait(self) -> float:
        """Seconds until the next call may go out: 0 when it may go now."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def spend(self) -> None:
        """Count one call; the caller made sure that `wait()` was 0."""
        self._refill()
        self._tokens -= 1.0

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
