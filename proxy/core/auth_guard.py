"""What stands between unauthenticated clients and Globus Auth.

Every token the cache has not seen costs an introspection: a thread and a round trip to Globus.
Anyone can invent tokens, so without these bounds a flood of made-up tokens fills the thread pool's
queue and a real user's first request waits behind all of it. Three bounds, all in this process:

- `CallQueue`: at most `slots` Globus calls at once and at most `max_waiting` waiting for one; a
  waiter gives up after `wait_seconds`, and beyond `max_waiting` a request is refused at once.
  Waiters from addresses that logged in recently, and group look-ups (the token already proved
  active), have a queue of their own (as long), served first.
- `AddressGuard`: per client address, a budget of unseen tokens (for addresses without a recent
  successful login) and a budget of refused tokens (for every address), checked before the
  introspection, so that a flood from one address costs a handful of introspections, not one each.

Known-good tokens never get here: the cache answers them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

Result = TypeVar("Result")

MAX_ADDRESSES = 100_000
"""Addresses remembered per budget (least recently seen go first), so memory stays bounded."""


class Busy(Exception):
    """No thread for this call: too many waiting already, or the wait outlasted `wait_seconds`."""


@dataclass(frozen=True)
class TooManyTokens(Exception):
    """The client's address spent its budget of unseen or refused tokens."""

    message: str
    retry_after: float


class CallQueue:
    """A semaphore with a bounded, two-level queue, whose slot is held until the *thread* finishes:
    a caller that stops waiting for a slow Globus call does not let another call start beside it."""

    def __init__(self, slots: int, max_waiting: int, wait_seconds: float) -> None:
        self._free = slots
        self._max_waiting = max_waiting
        self._wait_seconds = wait_seconds
        self._queues: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())
        """Priority first, then everyone else."""

    async def run(
        self,
        executor: Executor,
        function: Callable[[str], Result],
        argument: str,
        *,
        priority: bool,
        budget: float,
    ) -> Result:
        """`function(argument)` in `executor` once a slot is free; TimeoutError after `budget`."""
        await self._acquire(priority)
        loop = asyncio.get_running_loop()
        try:
            future = executor.submit(function, argument)
        except RuntimeError:
            self._release()
            raise
        future.add_done_callback(lambda _: _call_soon(loop, self._release))
        return await asyncio.wait_for(asyncio.wrap_future(future), budget)

    async def _acquire(self, priority: bool) -> None:
        if self._free > 0:
            self._free -= 1
            return
        queue = self._queues[0 if priority else 1]
        if len(queue) >= self._max_waiting:
            raise Busy()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            async with asyncio.timeout(self._wait_seconds):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as the wait ended: pass it on
            elif waiter in queue:
                queue.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Busy() from None
            raise

    def _release(self) -> None:
        for queue in self._queues:
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """From the worker thread; a loop already closed (the gateway stopped) needs nothing back."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class _Buckets:
    """Token buckets per address: `per_minute` refilled continuously, `burst` deep. 0: no limit."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.per_second = per_minute / 60
        self.burst = burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def wait(self, address: str, now: float) -> float:
        """0 if the address has a token left, otherwise the seconds until it has one."""
        tokens = self._tokens(address, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_second

    def take(self, address: str, now: float) -> None:
        self._buckets[address] = _Bucket(self._tokens(address, now) - 1, now)
        self._buckets.move_to_end(address)
        if len(self._buckets) > MAX_ADDRESSES:
            self._buckets.popitem(last=False)

    def _tokens(self, address: str, now: float) -> float:
        bucket = self._buckets.get(address)
        if bucket is None:
            return float(self.burst)
        return min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.per_second)


class AddressGuard:
    """Budgets per client address (an IPv6 client counts by its /64: one host has the whole /64)."""

    def __init__(
        self,
        unseen_per_minute: float,
        unseen_burst: int,
        refused_per_minute: float,
        refused_burst: int,
        good_seconds: float,
    ) -> None:
        self._unseen = _Buckets(unseen_per_minute, unseen_burst)
        self._refused = _Buckets(refused_per_minute, refused_burst)
        self._good_seconds = good_seconds
        self._good: OrderedDict[str, float] = OrderedDict()
        """Address → until when it counts as known-good (it logged in successfully)."""

    def admit(self, address: str | None) -> bool:
        """Before an introspection: raises `TooManyTokens` when the address spent a budget. Returns
        whether the address is known-good (its calls go first, and it pays no unseen tokens)."""
        if address is None:
            return False
        key, now = _address_key(address), time.monotonic()
        good = self._good.get(key, 0.0) > now
        if self._refused.enabled and (wait := self._refused.wait(key, now)) > 0:
            raise TooManyTokens("Too many refused tokens from your address; try again later.", wait)
        if not good and self._unseen.enabled:
            if (wait := self._unseen.wait(key, now)) > 0:
                raise TooManyTokens("Too many new tokens from your address; try again later.", wait)
            self._unseen.take(key, now)
        return good

    def outcome(self, address: str | None, accepted: bool) -> None:
        """After an introspection: a refusal spends the refused budget, a success makes the
        address known-good for a while."""
        if address is None:
            return
        key, now = _address_key(address), time.monotonic()
        if not accepted:
            if self._refused.enabled:
                self._refused.take(key, now)
            return
        self._good[key] = now + self._good_seconds
        self._good.move_to_end(key)
        if len(self._good) > MAX_ADDRESSES:
            self._good.popitem(last=False)


def _address_key(address: str) -> str:
    if ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    except ValueError:
        return address


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
