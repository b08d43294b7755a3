"""Rate limits in one process: a `LocalLimiter` keeps its counters in the process's memory.

The only limiter of a gateway without Redis, and the one a `RedisLimiter` decides with while Redis is
unreachable (limits then hold per process).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from proxy.core.limits import (
    LEASE_SECONDS,
    NO_LEASE,
    WINDOW_SECONDS,
    Lease,
    Limiter,
    concurrency_limited,
    requests_limited,
    tokens_limited,
)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class _LocalLease:
    def __init__(self, leases: dict[int, float], lease_id: int) -> None:
        self._leases = leases
        self._id = lease_id

    async def release(self) -> None:
        self._leases.pop(self._id, None)


class LocalLimiter(Limiter):
    """One process, on the monotonic clock. Memory stays bounded by the users and endpoints active in
    the last window: a sweep, at most once per window, forgets full buckets, users with nothing in
    flight and windows that emptied."""

    def __init__(
        self,
        requests_per_second: float,
        burst: int,
        concurrent_per_user: int,
        *,
        window_seconds: float = WINDOW_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        super().__init__(
            requests_per_second,
            burst,
            concurrent_per_user,
            window_seconds=window_seconds,
            lease_seconds=lease_seconds,
        )
        self._buckets: dict[str, _Bucket] = {}
        self._leases: dict[str, dict[int, float]] = {}
        """Per user: lease id → when it stops counting (a lease nobody released expires)."""
        self._lease_ids = itertools.count()
        """Lease ids are counted, not drawn at random: they never leave the process, and a random one
        costs a system call on every request while `concurrent_per_user` is on (the default)."""
        self._windows: dict[tuple[str, str], dict[int, int]] = {}
        """(endpoint, "") for the whole endpoint, (endpoint, user) per user: bucket index → tokens."""
        self._next_sweep = time.monotonic() + self.window.seconds

    def __len__(self) -> int:
        """How many users and windows are remembered."""
        return len(self._buckets) + len(self._leases) + len(self._windows)

    async def close(self) -> None:
        self._buckets.clear()
        self._leases.clear()
        self._windows.clear()

    async def _admit(self, user_id: str) -> Lease:
        now = time.monotonic()
        self._sweep(now)
        tokens = self._tokens(user_id, now)
        if self.requests_per_second > 0 and tokens < 1:
            raise requests_limited((1 - tokens) / self.requests_per_second)
        leases = self._live_leases(user_id, now)
        if self.concurrent_per_user > 0 and len(leases) >= self.concurrent_per_user:
            raise concurrency_limited()
        if self.requests_per_second > 0:
            self._buckets[user_id] = _Bucket(tokens - 1, now)
        if self.concurrent_per_user <= 0:
            return NO_LEASE
        lease_id = next(self._lease_ids)
        leases[lease_id] = now + self.lease_seconds
        self._leases[user_id] = leases
        return _LocalLease(leases, lease_id)

    async def _check_tokens(self, endpoint: str, user_id: str, tpm_model: int, tpm_user: int) -> None:
        now = time.monotonic()
        model_wait = self._wait((endpoint, ""), tpm_model, now)
        user_wait = self._wait((endpoint, user_id), tpm_user, now)
        limited = tokens_limited(model_wait, user_wait)
        if limited is not None:
            raise limited

    async def _record_tokens(self, endpoint: str, user_id: str, tokens: int) -> None:
        now = time.monotonic()
        self._sweep(now)
        index = self.window.index(now)
        for key in ((endpoint, ""), (endpoint, user_id)):
            counts = self._windows.setdefault(key, {})
            counts[index] = counts.get(index, 0) + tokens

    def _tokens(self, user_id: str, now: float) -> float:
        """The user's request tokens now: a user never seen (or forgotten) has a full bucket."""
        bucket = self._buckets.get(user_id)
        if bucket is None:
            return float(self.burst)
        return min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.requests_per_second)

    def _live_leases(self, user_id: str, now: float) -> dict[int, float]:
        leases = self._leases.get(user_id, {})
        for lease_id in [lease_id for lease_id, expires in leases.items() if expires <= now]:
            del leases[lease_id]
        return leases

    def _wait(self, key: tuple[str, str], limit: int, now: float) -> float:
        counts = self._windows.get(key)
        if limit <= 0 or not counts:
            return 0.0
        return self.window.wait(counts, limit, now)

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.window.seconds
        self._buckets = {
            user: bucket for user, bucket in self._buckets.items() if self._tokens(user, now) < self.burst
        }
        self._leases = {user: leases for user in self._leases if (leases := self._live_leases(user, now))}
        oldest = self.window.oldest(now)
        for key, counts in list(self._windows.items()):
            live = {index: count for index, count in counts.items() if index >= oldest}
            if live:
                self._windows[key] = live
            else:
                del self._windows[key]
