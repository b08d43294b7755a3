"""Rate limits: requests per second with a burst, requests in flight, and tokens per minute.

`Limiter` is what a request asks; `proxy.core.limits_local.LocalLimiter` keeps the counters in the
process, `proxy.core.limits_redis.RedisLimiter` in Redis, shared by several gateway processes or hosts.

Tokens per minute use a sliding window of `WINDOW_BUCKETS` equal buckets (one second each for the
default 60 s window). A bucket is counted until the whole window has passed over it, so tokens
leave the window between 59 and 60 s after they were recorded: at most 1/60 of the window late,
which is finer than any client retries, while a check reads at most 60 small hash fields. Fewer,
coarser buckets (12 of five seconds) would hold tokens up to 5 s too long; a log of every request
would be exact but grow with the traffic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

LimitKind = Literal["requests", "concurrency", "tokens_model", "tokens_user"]

WINDOW_SECONDS = 60.0
WINDOW_BUCKETS = 60
LEASE_SECONDS = 3600.0
"""A lease left behind by a crashed process stops counting after this long; it matches the longest
stream the gateway allows by default (`streaming.total_timeout_seconds`)."""
CONCURRENCY_RETRY_SECONDS = 1.0
"""Nobody knows when a request in flight ends, so a client refused for concurrency is told 1 s."""


@dataclass(frozen=True)
class Limited(Exception):
    """A limit was reached: the route answers 429 with `Retry-After: retry_after`."""

    message: str
    retry_after: float
    kind: LimitKind

    def __str__(self) -> str:
        return self.message


class Lease(Protocol):
    """A request in flight; released exactly once when it ends (a second release does nothing)."""

    async def release(self) -> None: ...


class _NoLease:
    """Without a concurrency limit nothing is counted, so there is nothing to release."""

    async def release(self) -> None:
        return None


NO_LEASE = _NoLease()


@dataclass(frozen=True)
class Window:
    """The sliding window: `buckets` equal slices of `seconds`, bucket i holding [i, i + 1) * width."""

    seconds: float
    buckets: int = WINDOW_BUCKETS

    @property
    def width(self) -> float:
        return self.seconds / self.buckets

    def index(self, now: float) -> int:
        return math.floor(now / self.width)

    def oldest(self, now: float) -> int:
        """The oldest bucket still in the window; older ones are forgotten."""
        return self.index(now) - self.buckets + 1

    def wait(self, counts: Mapping[int, int], limit: int, now: float) -> float:
        """0 while the window holds fewer than `limit` tokens, otherwise the seconds until enough of
        its oldest buckets have left it."""
        oldest = self.oldest(now)
        live = sorted((index, count) for index, count in counts.items() if index >= oldest)
        total = sum(count for _, count in live)
        for index, count in live:
            if total < limit:
                break
            total -= count
            if total < limit:
                return (index + self.buckets) * self.width - now
        return 0.0


def tokens_limited(model_wait: float, user_wait: float) -> Limited | None:
    """Both windows must allow the request again, so the client is told the longer wait."""
    if model_wait <= 0 and user_wait <= 0:
        return None
    if model_wait >= user_wait:
        return Limited("This model's tokens per minute limit was reached.", model_wait, "tokens_model")
    return Limited("Your tokens per minute limit for this model was reached.", user_wait, "tokens_user")


def requests_limited(retry_after: float) -> Limited:
    return Limited("Too many requests; slow down.", retry_after, "requests")


def concurrency_limited() -> Limited:
    return Limited(
        "Too many requests in flight; wait for one to finish.", CONCURRENCY_RETRY_SECONDS, "concurrency"
    )


class Limiter(ABC):
    """Per user a token bucket (`requests_per_second` refilled continuously, `burst` deep) and at most
    `concurrent_per_user` requests in flight; per endpoint tokens per minute. Zero means no limit."""

    def __init__(
        self,
        requests_per_second: float,
        burst: int,
        concurrent_per_user: int,
        *,
        window_seconds: float = WINDOW_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        if requests_per_second < 0 or burst < 0 or concurrent_per_user < 0:
            raise ValueError("rate limits cannot be negative")
        if requests_per_second > 0 and burst < 1:
            raise ValueError("a request rate needs a burst of at least 1, or no request would ever pass")
        if window_seconds <= 0 or lease_seconds <= 0:
            raise ValueError("the token window and the lease lifetime must be positive")
        self.requests_per_second = requests_per_second
        self.burst = burst
        self.concurrent_per_user = concurrent_per_user
        self.window = Window(window_seconds)
        self.lease_seconds = lease_seconds

    async def admit(self, user_id: str) -> Lease:
        """Raises `Limited` when the user has no request token left or too many requests in flight;
        a refused request consumes neither."""
        if self.requests_per_second <= 0 and self.concurrent_per_user <= 0:
            return NO_LEASE
        return await self._admit(user_id)

    async def check_tokens(
        self, endpoint: str, user_id: str, tpm_model: int | None, tpm_user: int | None
    ) -> None:
        """Raises `Limited` when the endpoint's tokens in the window (all users) reached `tpm_model`, or
        this user's on it reached `tpm_user`. None or 0: no limit."""
        if not tpm_model and not tpm_user:
            return
        await self._check_tokens(endpoint, user_id, tpm_model or 0, tpm_user or 0)

    async def record_tokens(self, endpoint: str, user_id: str, tokens: int) -> None:
        """A finished request's actual usage, added to the endpoint's and the user's window."""
        if tokens > 0:
            await self._record_tokens(endpoint, user_id, tokens)

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _admit(self, user_id: str) -> Lease: ...

    @abstractmethod
    async def _check_tokens(self, endpoint: str, user_id: str, tpm_model: int, tpm_user: int) -> None: ...

    @abstractmethod
    async def _record_tokens(self, endpoint: str, user_id: str, tokens: int) -> None: ...

    def _same_limits(self) -> dict[str, Any]:
        """Constructor arguments for another limiter enforcing the same limits."""
        return {
            "requests_per_second": self.requests_per_second,
            "burst": self.burst,
            "concurrent_per_user": self.concurrent_per_user,
            "window_seconds": self.window.seconds,
            "lease_seconds": self.lease_seconds,
        }
