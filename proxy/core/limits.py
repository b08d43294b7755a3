"""Rate limits: requests per second with a burst, requests in flight, and tokens per minute.

`LocalLimiter` keeps the counters in the process. `RedisLimiter` keeps them in Redis and takes every
decision in one Lua script, on the Redis server's clock, so that several gateway processes or hosts
enforce one limit. When Redis is unreachable it decides with a `LocalLimiter` instead (limits then
hold per process) rather than failing requests, and goes back to Redis once it answers.

Tokens per minute use a sliding window of `WINDOW_BUCKETS` equal buckets (one second each for the
default 60 s window). A bucket is counted until the whole window has passed over it, so tokens
leave the window between 59 and 60 s after they were recorded: at most 1/60 of the window late,
which is finer than any client retries, while a check reads at most 60 small hash fields. Fewer,
coarser buckets (12 of five seconds) would hold tokens up to 5 s too long; a log of every request
would be exact but grow with the traffic.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

log = logging.getLogger(__name__)

LimitKind = Literal["requests", "concurrency", "tokens_model", "tokens_user"]

WINDOW_SECONDS = 60.0
WINDOW_BUCKETS = 60
LEASE_SECONDS = 3600.0
"""A lease left behind by a crashed process stops counting after this long; it matches the longest
stream the gateway allows by default (`streaming.total_timeout_seconds`)."""
CONCURRENCY_RETRY_SECONDS = 1.0
"""Nobody knows when a request in flight ends, so a client refused for concurrency is told 1 s."""
REDIS_RETRY_SECONDS = 5.0
"""While Redis is unreachable, one decision every this often tries it again."""
WARNING_INTERVAL_SECONDS = 60.0
"""An outage is logged when it starts and then at most this often, never once per request."""
MAX_PENDING_RELEASES = 10_000


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
class _Window:
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


def _tokens_limited(model_wait: float, user_wait: float) -> Limited | None:
    """Both windows must allow the request again, so the client is told the longer wait."""
    if model_wait <= 0 and user_wait <= 0:
        return None
    if model_wait >= user_wait:
        return Limited("This model's tokens per minute limit was reached.", model_wait, "tokens_model")
    return Limited("Your tokens per minute limit for this model was reached.", user_wait, "tokens_user")


def _requests_limited(retry_after: float) -> Limited:
    return Limited("Too many requests; slow down.", retry_after, "requests")


def _concurrency_limited() -> Limited:
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
        self.window = _Window(window_seconds)
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


@dataclass
class _Bucket:
    tokens: float
    updated: float


class _LocalLease:
    def __init__(self, leases: dict[str, float], lease_id: str) -> None:
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
        self._leases: dict[str, dict[str, float]] = {}
        """Per user: lease id → when it stops counting (a lease nobody released expires)."""
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
            raise _requests_limited((1 - tokens) / self.requests_per_second)
        leases = self._live_leases(user_id, now)
        if self.concurrent_per_user > 0 and len(leases) >= self.concurrent_per_user:
            raise _concurrency_limited()
        if self.requests_per_second > 0:
            self._buckets[user_id] = _Bucket(tokens - 1, now)
        if self.concurrent_per_user <= 0:
            return NO_LEASE
        lease_id = secrets.token_hex(8)
        leases[lease_id] = now + self.lease_seconds
        self._leases[user_id] = leases
        return _LocalLease(leases, lease_id)

    async def _check_tokens(self, endpoint: str, user_id: str, tpm_model: int, tpm_user: int) -> None:
        now = time.monotonic()
        model_wait = self._wait((endpoint, ""), tpm_model, now)
        user_wait = self._wait((endpoint, user_id), tpm_user, now)
        limited = _tokens_limited(model_wait, user_wait)
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

    def _live_leases(self, user_id: str, now: float) -> dict[str, float]:
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


_ADMIT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate, burst, concurrency = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[5])
local tokens = burst
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  if state[1] then
    tokens = math.min(burst, tonumber(state[1]) + (now - tonumber(state[2])) * rate / 1000)
  end
  if tokens < 1 then
    return {1, math.ceil((1 - tokens) * 1000 / rate)}
  end
end
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= concurrency then
    return {2, 0}
  end
  redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease_ms))
end
if rate > 0 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
end
return {0, 0}
"""
"""KEYS: the user's bucket hash, the user's lease sorted set (lease id scored by expiry, ms).
ARGV: rate per second, burst, concurrency, lease id, lease lifetime in ms.
Answers {0, 0} admitted, {1, ms until a token} or {2, 0} for too many in flight."""

_WINDOW_FUNCTIONS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local width, buckets = tonumber(ARGV[1]), tonumber(ARGV[2])
local current = math.floor(now / width)
local oldest = current - buckets + 1

local function live(key)
  local flat = redis.call('HGETALL', key)
  local indexes, counts, total = {}, {}, 0
  for i = 1, #flat, 2 do
    local index = tonumber(flat[i])
    if index >= oldest then
      local count = tonumber(flat[i + 1])
      table.insert(indexes, index)
      counts[index] = count
      total = total + count
    end
  end
  return indexes, counts, total, flat
end

local function wait(key, limit)
  if limit <= 0 then return 0 end
  local indexes, counts, total = live(key)
  if total < limit then return 0 end
  table.sort(indexes)
  for _, index in ipairs(indexes) do
    total = total - counts[index]
    if total < limit then return math.max(1, math.ceil((index + buckets) * width - now)) end
  end
  return 0
end
"""

_CHECK_TOKENS = (
    _WINDOW_FUNCTIONS
    + """
return {wait(KEYS[1], tonumber(ARGV[3])), wait(KEYS[2], tonumber(ARGV[4]))}
"""
)
"""KEYS: the endpoint's window hash, the user's on it (bucket index → tokens).
ARGV: bucket width in ms, buckets, tpm_model, tpm_user (0: no limit). Answers the ms to wait for each."""

_RECORD_TOKENS = (
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    + _WINDOW_FUNCTIONS
    + """
local field = string.format('%d', current)
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, field, ARGV[3])
  local _, _, _, flat = live(key)
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < oldest then redis.call('HDEL', key, flat[i]) end
  end
  redis.call('PEXPIRE', key, math.ceil(width * buckets) + 1000)
end
return 0
"""
)
"""Same KEYS; ARGV: bucket width in ms, buckets, tokens. Old buckets are dropped as new ones are written
and an idle window expires as a whole."""


class _Script:
    """A Lua script run by EVALSHA, so only its digest travels; loaded again when Redis answers
    NOSCRIPT (after a restart, a failover or SCRIPT FLUSH)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, client: redis.asyncio.Redis, keys: list[str], args: list[str | int | float]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class _Outage:
    """Whether Redis counts as unreachable. While it does, decisions are local and one of them every
    `retry_seconds` tries Redis again; warnings come when it starts and then every `warn_seconds`."""

    def __init__(self, retry_seconds: float, warn_seconds: float = WARNING_INTERVAL_SECONDS) -> None:
        self.retry_seconds = retry_seconds
        self.warn_seconds = warn_seconds
        self.down_since: float | None = None
        self._next_try = 0.0
        self._next_warning = 0.0

    def should_try(self) -> bool:
        if self.down_since is None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.retry_seconds
        return True

    def failed(self, error: Exception) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_seconds
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "Redis for rate limits is unreachable (%s: %s); limiting per process until it answers",
                type(error).__name__,
                error,
            )
        elif now >= self._next_warning:
            log.warning(
                "Redis for rate limits still unreachable after %.0f s (%s); limiting per process",
                now - self.down_since,
                type(error).__name__,
            )
        else:
            return
        self._next_warning = now + self.warn_seconds

    def succeeded(self) -> bool:
        """True when this ends an outage."""
        if self.down_since is None:
            return False
        log.warning(
            "Redis for rate limits answers again after %.0f s; limits are shared again",
            time.monotonic() - self.down_since,
        )
        self.down_since = None
        return True


class _RedisLease:
    def __init__(self, limiter: RedisLimiter, key: str, lease_id: str) -> None:
        self._limiter = limiter
        self._key = key
        self._id = lease_id
        self._released = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self._limiter._release(self._key, self._id)


class RedisLimiter(Limiter):
    """Limits shared by every process using the same Redis and prefix. Each decision is one Lua script,
    so concurrent requests on several hosts cannot both take the last token or slot, and all of them
    read Redis's clock, so hosts with skewed clocks still agree."""

    def __init__(
        self,
        requests_per_second: float,
        burst: int,
        concurrent_per_user: int,
        url: str,
        prefix: str = "gateway:limits:",
        *,
        window_seconds: float = WINDOW_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
        retry_seconds: float = REDIS_RETRY_SECONDS,
    ) -> None:
        super().__init__(
            requests_per_second,
            burst,
            concurrent_per_user,
            window_seconds=window_seconds,
            lease_seconds=lease_seconds,
        )
        # One immediate retry reconnects a pooled connection that a Redis restart closed; more, or a
        # backoff, would only hold the request up when Redis is really gone.
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 1)
        )
        self._prefix = prefix
        self._fallback = LocalLimiter(**self._same_limits())
        self._outage = _Outage(retry_seconds)
        self._pending_releases: deque[tuple[str, str]] = deque(maxlen=MAX_PENDING_RELEASES)
        """Leases whose release failed: released once Redis answers, so they do not count for an hour."""
        self._admit_script = _Script(_ADMIT)
        self._check_script = _Script(_CHECK_TOKENS)
        self._record_script = _Script(_RECORD_TOKENS)

    async def close(self) -> None:
        await self._redis.aclose()
        await self._fallback.close()

    async def _admit(self, user_id: str) -> Lease:
        user = self._tag(user_id)
        keys = [f"{self._prefix}rate:{user}", f"{self._prefix}leases:{user}"]
        lease_id = secrets.token_hex(8)
        args: list[str | int | float] = [
            self.requests_per_second,
            self.burst,
            self.concurrent_per_user,
            lease_id,
            self.lease_seconds * 1000,
        ]
        answer = await self._run(self._admit_script, keys, args)
        if answer is None:
            return await self._fallback.admit(user_id)
        verdict, wait_ms = int(answer[0]), int(answer[1])
        if verdict == 1:
            raise _requests_limited(wait_ms / 1000)
        if verdict == 2:
            raise _concurrency_limited()
        return _RedisLease(self, keys[1], lease_id) if self.concurrent_per_user > 0 else NO_LEASE

    async def _check_tokens(self, endpoint: str, user_id: str, tpm_model: int, tpm_user: int) -> None:
        args: list[str | int | float] = [*self._window_args(), tpm_model, tpm_user]
        answer = await self._run(self._check_script, self._window_keys(endpoint, user_id), args)
        if answer is None:
            await self._fallback.check_tokens(endpoint, user_id, tpm_model, tpm_user)
            return
        limited = _tokens_limited(int(answer[0]) / 1000, int(answer[1]) / 1000)
        if limited is not None:
            raise limited

    async def _record_tokens(self, endpoint: str, user_id: str, tokens: int) -> None:
        args: list[str | int | float] = [*self._window_args(), tokens]
        answer = await self._run(self._record_script, self._window_keys(endpoint, user_id), args)
        if answer is None:
            await self._fallback.record_tokens(endpoint, user_id, tokens)

    async def _release(self, key: str, lease_id: str) -> None:
        if self._outage.down_since is not None:
            self._pending_releases.append((key, lease_id))
            return
        try:
            await self._redis.zrem(key, lease_id)
        except RedisError as error:
            self._outage.failed(error)
            self._pending_releases.append((key, lease_id))

    async def _run(self, script: _Script, keys: list[str], args: list[str | int | float]) -> Any:
        """The script's answer, or None while Redis is unreachable: the caller then decides locally."""
        if not self._outage.should_try():
            return None
        try:
            answer = await script.run(self._redis, keys, args)
        except RedisError as error:
            self._outage.failed(error)
            return None
        if self._outage.succeeded():
            await self._release_pending()
        return answer

    async def _release_pending(self) -> None:
        pending = list(self._pending_releases)
        self._pending_releases.clear()
        for key, lease_id in pending:
            await self._release(key, lease_id)

    def _window_keys(self, endpoint: str, user_id: str) -> list[str]:
        """Both windows of an endpoint share its hash tag, so one script may touch both on a cluster."""
        model = f"{self._prefix}tpm:{self._tag(endpoint)}"
        return [model, f"{model}:{quote(user_id, safe='')}"]

    def _window_args(self) -> list[str | int | float]:
        return [self.window.width * 1000, self.window.buckets]

    @staticmethod
    def _tag(name: str) -> str:
        """A Redis Cluster hash tag; quoting keeps braces and separators in names unambiguous."""
        return "{" + quote(name, safe="") + "}"
