"""Rate limits: request bursts and refill, requests in flight, tokens per minute in a sliding window.

Every behaviour runs against both limiters, the Redis one on a real redis-server; the Redis-only tests
show that two limiters (as two gateway processes) share one limit atomically, and that requests keep
flowing under per-process limits while Redis is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

from proxy.core.limits import Lease, Limited, Limiter
from proxy.core.limits_local import LocalLimiter
from proxy.core.limits_redis import RedisLimiter
from testing.services.redis_server import RedisServer

pytestmark = pytest.mark.alone(
    "real-clock token buckets: retry_after and refills are asserted to within 10 to 100 ms"
)

MakeLimiter = Callable[..., Limiter]


@pytest.fixture(params=["local", "redis"])
def shared_url(request: pytest.FixtureRequest) -> str | None:
    """None for the local limiter; a Redis is started only for the Redis one."""
    if request.param == "local":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def make(shared_url: str | None) -> AsyncIterator[MakeLimiter]:
    """Builds limiters of the parametrized kind (all on one Redis), closed after the test."""
    made: list[Limiter] = []
    url = shared_url

    def build(rps: float = 0, burst: int = 0, concurrent: int = 0, **options: Any) -> Limiter:
        limiter: Limiter = (
            LocalLimiter(rps, burst, concurrent, **options)
            if url is None
            else RedisLimiter(rps, burst, concurrent, url, **options)
        )
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.close()


async def refused(call: Any) -> Limited:
    with pytest.raises(Limited) as info:
        await call
    return info.value


async def test_burst_then_continuous_refill(make: MakeLimiter) -> None:
    limiter = make(rps=10, burst=3)
    for _ in range(3):
        await limiter.admit("alice")
    limited = await refused(limiter.admit("alice"))
    assert limited.kind == "requests"
    assert 0.05 < limited.retry_after <= 0.1
    await limiter.admit("bob")  # buckets are per user

    await asyncio.sleep(limited.retry_after + 0.02)
    await limiter.admit("alice")
    again = await refused(limiter.admit("alice"))  # one token came back, not the whole burst
    assert 0 < again.retry_after <= 0.1


async def test_refill_stops_at_burst(make: MakeLimiter) -> None:
    limiter = make(rps=50, burst=2)
    await limiter.admit("alice")
    await asyncio.sleep(0.2)  # long enough for 10 tokens, but the bucket holds 2
    await limiter.admit("alice")
    await limiter.admit("alice")
    await refused(limiter.admit("alice"))


async def test_concurrency_limit_and_release(make: MakeLimiter) -> None:
    limiter = make(concurrent=2)
    first = await limiter.admit("alice")
    second = await limiter.admit("alice")
    limited = await refused(limiter.admit("alice"))
    assert (limited.kind, limited.retry_after) == ("concurrency", 1.0)
    await limiter.admit("bob")

    await first.release()
    await first.release()  # twice is harmless: it does not free a second slot
    third = await limiter.admit("alice")
    await refused(limiter.admit("alice"))
    for lease in (second, third):
        await lease.release()
    await limiter.admit("alice")


async def test_refused_request_takes_neither_token_nor_slot(make: MakeLimiter) -> None:
    limiter = make(rps=0.01, burst=2, concurrent=1)
    lease = await limiter.admit("alice")
    assert (await refused(limiter.admit("alice"))).kind == "concurrency"
    await lease.release()
    await limiter.admit("alice")  # the refused request did not use up the second token


async def test_forgotten_lease_expires(make: MakeLimiter) -> None:
    """A process that crashed with requests in flight must not block the user forever."""
    limiter = make(concurrent=1, lease_seconds=0.2)
    await limiter.admit("alice")  # never released
    await refused(limiter.admit("alice"))
    await asyncio.sleep(0.25)
    await limiter.admit("alice")


async def test_zero_means_unlimited(make: MakeLimiter) -> None:
    limiter = make()
    leases: list[Lease] = [await limiter.admit("alice") for _ in range(200)]
    for lease in leases:
        await lease.release()
    await limiter.record_tokens("llama", "alice", 1_000_000)
    await limiter.check_tokens("llama", "alice", None, None)
    await limiter.check_tokens("llama", "alice", 0, 0)


async def test_tokens_per_model_all_users(make: MakeLimiter) -> None:
    limiter = make(window_seconds=0.6)
    await limiter.record_tokens("llama", "alice", 60)
    await limiter.check_tokens("llama", "bob", 100, None)
    await limiter.record_tokens("llama", "bob", 40)
    limited = await refused(limiter.check_tokens("llama", "carol", 100, None))
    assert limited.kind == "tokens_model"
    assert 0 < limited.retry_after <= 0.6
    await limiter.check_tokens("mistral", "carol", 100, None)  # per endpoint
    await limiter.check_tokens("llama", "carol", None, 1000)  # no model limit asked for


async def test_tokens_per_user(make: MakeLimiter) -> None:
    limiter = make(window_seconds=0.6)
    await limiter.record_tokens("llama", "alice", 50)
    limited = await refused(limiter.check_tokens("llama", "alice", 1000, 50))
    assert limited.kind == "tokens_user"
    await limiter.check_tokens("llama", "bob", 1000, 50)
    await limiter.check_tokens("mistral", "alice", 1000, 50)


async def test_tokens_slide_out_of_the_window(make: MakeLimiter) -> None:
    """The oldest tokens leave first: the wait is until enough of them have, not a whole window."""
    limiter = make(window_seconds=0.6)
    await limiter.record_tokens("llama", "alice", 70)
    await asyncio.sleep(0.3)
    await limiter.record_tokens("llama", "alice", 40)
    limited = await refused(limiter.check_tokens("llama", "alice", 100, 100))
    assert 0.2 < limited.retry_after <= 0.33  # when the 70 leave, not the 40

    await asyncio.sleep(limited.retry_after + 0.03)
    await limiter.check_tokens("llama", "alice", 100, 100)  # 40 left in the window
    await limiter.record_tokens("llama", "alice", 60)
    await refused(limiter.check_tokens("llama", "alice", 100, None))


async def test_local_limiter_forgets_idle_users() -> None:
    limiter = LocalLimiter(1000, 1, 1, window_seconds=0.1)
    for number in range(100):
        lease = await limiter.admit(f"user-{number}")
        await lease.release()
        await limiter.record_tokens("llama", f"user-{number}", 10)
    assert len(limiter) > 100
    await asyncio.sleep(0.15)
    await limiter.admit("late")  # the next call sweeps
    assert len(limiter) <= 2


async def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        LocalLimiter(5, 0, 0)
    with pytest.raises(ValueError):
        LocalLimiter(-1, 1, 0)


async def test_two_processes_share_one_burst_atomically(redis_url: str) -> None:
    first, second = (RedisLimiter(0.001, 10, 0, redis_url) for _ in range(2))
    try:
        calls = [(first if number % 2 else second).admit("alice") for number in range(50)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert sum(not isinstance(result, BaseException) for result in results) == 10
        assert all(isinstance(result, Limited) for result in results if isinstance(result, BaseException))
    finally:
        await first.close()
        await second.close()


async def test_two_processes_share_one_concurrency_limit(redis_url: str) -> None:
    first, second = (RedisLimiter(0, 0, 5, redis_url) for _ in range(2))
    try:
        calls = [(first if number % 2 else second).admit("alice") for number in range(50)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        leases = [result for result in results if not isinstance(result, BaseException)]
        assert len(leases) == 5
        await leases[0].release()
        await second.admit("alice")
        await refused(first.admit("alice"))
    finally:
        await first.close()
        await second.close()


async def test_tokens_are_shared_between_processes(redis_url: str) -> None:
    first, second = (RedisLimiter(0, 0, 0, redis_url, window_seconds=0.6) for _ in range(2))
    try:
        await first.record_tokens("llama", "alice", 60)
        await second.record_tokens("llama", "bob", 40)
        await refused(second.check_tokens("llama", "carol", 100, None))
        await refused(first.check_tokens("llama", "bob", None, 40))
    finally:
        await first.close()
        await second.close()


async def test_redis_down_falls_back_to_local_limits(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RedisLimiter(0.001, 2, 1, redis_server.url, retry_seconds=0.1)
    other = RedisLimiter(0.001, 2, 1, redis_server.url, retry_seconds=0.1)
    try:
        shared_lease = await limiter.admit("alice")
        await redis_server.stop()
        caplog.set_level(logging.WARNING, logger="proxy.core.limits_redis")

        await shared_lease.release()  # Redis is gone: no error, released once it answers
        lease = await limiter.admit("bob")
        await refused(limiter.admit("bob"))  # concurrency still holds, per process
        await lease.release()
        await limiter.admit("bob")
        assert (await refused(limiter.admit("bob"))).kind == "requests"  # so does the burst
        await limiter.record_tokens("llama", "bob", 10)
        await refused(limiter.check_tokens("llama", "bob", 10, None))
        for _ in range(20):
            await limiter.admit(f"user-{_}")
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1

        await redis_server.restart()
        await asyncio.sleep(0.15)
        # Back on Redis (empty after the restart): bob's bucket is full there, and shared again.
        lease = await limiter.admit("bob")
        await refused(other.admit("bob"))
        await lease.release()
        await other.admit("bob")
        assert (await refused(limiter.admit("bob"))).kind == "requests"
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        await limiter.close()
        await other.close()


async def test_pending_release_reaches_redis_when_it_answers(redis_server: RedisServer) -> None:
    """Without a restart (a network cut), a release that failed is sent later, not left for an hour."""
    limiter = RedisLimiter(0, 0, 1, redis_server.url, retry_seconds=0.05)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        lease = await limiter.admit("alice")
        limiter._outage.failed(ConnectionError("cut"))  # as if Redis had just stopped answering
        await lease.release()
        assert await client.zcard("gateway:limits:leases:{alice}") == 1
        await asyncio.sleep(0.06)
        await limiter.admit("bob")  # the first call through Redis again sends the release
        assert await client.zcard("gateway:limits:leases:{alice}") == 0
    finally:
        await limiter.close()
        await client.aclose()


async def test_script_reloaded_after_flush(redis_url: str) -> None:
    limiter = RedisLimiter(0.001, 1, 0, redis_url)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await limiter.admit("alice")
        await client.script_flush()
        await refused(limiter.admit("alice"))  # answered by Redis (NOSCRIPT, reload), not a fallback
        assert limiter._outage.down_since is None
    finally:
        await limiter.close()
        await client.aclose()
