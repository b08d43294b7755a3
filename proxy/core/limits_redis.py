"""Rate limits shared through Redis: every gateway process or host using it enforces one limit.

`RedisLimiter` takes every decision in one Lua script, on the Redis server's clock. When Redis is
unreachable it decides with a `LocalLimiter` instead (limits then hold per process) rather than failing
requests, and goes back to Redis once it answers.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import deque
from typing import Any
from urllib.parse import quote

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

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
from proxy.core.limits_local import LocalLimiter

log = logging.getLogger(__name__)

REDIS_RETRY_SECONDS = 5.0
"""While Redis is unreachable, one decision every this often tries it again."""
WARNING_INTERVAL_SECONDS = 60.0
"""An outage is logged when it starts and then at most this often, never once per request."""
MAX_PENDING_RELEASES = 10_000


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
            raise requests_limited(wait_ms / 1000)
        if verdict == 2:
            raise concurrency_limited()
        return _RedisLease(self, keys[1], lease_id) if self.concurrent_per_user > 0 else NO_LEASE

    async def _check_tokens(self, endpoint: str, user_id: str, tpm_model: int, tpm_user: int) -> None:
        args: list[str | int | float] = [*self._window_args(), tpm_model, tpm_user]
        answer = await self._run(self._check_script, self._window_keys(endpoint, user_id), args)
        if answer is None:
            await self._fallback.check_tokens(endpoint, user_id, tpm_model, tpm_user)
            return
        limited = tokens_limited(int(answer[0]) / 1000, int(answer[1]) / 1000)
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
