"""The bounds in front of Globus Auth (proxy/core/auth_guard.py), on their own: the queue for threads and
the budgets per client address. Real threads, the real clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from proxy.core.auth_guard import AddressGuard, Busy, CallQueue, TooManyTokens

pytestmark = pytest.mark.alone("waits for thread slots are asserted to within 50 ms")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    """More threads than slots: the queue, not the pool, must be what bounds the calls."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


class Calls:
    """A blocking call that notes how many run at once and in which order they started."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.started: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(name)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return name


async def test_a_caller_that_gives_up_keeps_its_slot_until_the_thread_ends(
    executor: ThreadPoolExecutor,
) -> None:
    """Otherwise each timed-out Globus call would let one more start beside the ones still running."""
    queue, calls = CallQueue(slots=2, max_waiting=10, wait_seconds=5), Calls(0.5)
    for name in ("a", "b"):
        with pytest.raises(TimeoutError):
            await queue.run(executor, calls, name, priority=False, budget=0.05)
    started = time.monotonic()
    assert await queue.run(executor, calls, "c", priority=False, budget=5) == "c"
    assert time.monotonic() - started >= 0.4, "c started before a or b ended"
    assert calls.most == 2


async def test_beyond_the_queue_busy_at_once_and_known_good_callers_first(
    executor: ThreadPoolExecutor,
) -> None:
    queue, calls = CallQueue(slots=2, max_waiting=2, wait_seconds=5), Calls(0.3)
    running = [asyncio.ensure_future(queue.run(executor, calls, n, priority=False, budget=5)) for n in "ab"]
    await asyncio.sleep(0.05)
    waiting = [asyncio.ensure_future(queue.run(executor, calls, n, priority=False, budget=5)) for n in "cd"]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Busy):
        await queue.run(executor, calls, "e", priority=False, budget=5)
    assert time.monotonic() - started < 0.05
    good = asyncio.ensure_future(queue.run(executor, calls, "good", priority=True, budget=5))
    await asyncio.gather(*running, *waiting, good)
    assert calls.started[2] == "good", calls.started
    assert calls.most == 2


async def test_a_wait_for_a_thread_ends_after_wait_seconds(executor: ThreadPoolExecutor) -> None:
    queue, calls = CallQueue(slots=1, max_waiting=5, wait_seconds=0.2), Calls(1.0)
    first = asyncio.ensure_future(queue.run(executor, calls, "a", priority=False, budget=5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Busy):
        await queue.run(executor, calls, "b", priority=False, budget=5)
    assert 0.15 < time.monotonic() - started < 0.5
    await first
    assert await queue.run(executor, calls, "c", priority=False, budget=5) == "c", "the slot came back"


def test_unseen_tokens_per_address_and_an_ipv6_client_by_its_64() -> None:
    guard = AddressGuard(
        unseen_per_minute=60, unseen_burst=3, refused_per_minute=0, refused_burst=1, good_seconds=60
    )
    for _ in range(3):
        assert guard.admit("2001:db8:1:2::1") is False
    with pytest.raises(TooManyTokens) as refused:
        guard.admit("2001:db8:1:2:ffff::9")
    assert 0 < refused.value.retry_after <= 1.0
    guard.admit("2001:db8:1:3::1")
    guard.admit("192.0.2.1")
    guard.admit(None)


def test_refused_tokens_count_for_every_address_and_a_login_lifts_the_unseen_budget() -> None:
    guard = AddressGuard(
        unseen_per_minute=1, unseen_burst=1, refused_per_minute=1, refused_burst=2, good_seconds=60
    )
    guard.admit("192.0.2.1")
    guard.outcome("192.0.2.1", accepted=True)
    for _ in range(5):
        assert guard.admit("192.0.2.1") is True, "an address that logged in pays no unseen tokens"
    guard.outcome("192.0.2.1", accepted=False)
    guard.outcome("192.0.2.1", accepted=False)
    with pytest.raises(TooManyTokens, match="refused"):
        guard.admit("192.0.2.1")
