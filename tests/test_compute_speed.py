"""`ComputeService` against the fake Globus Compute: adaptive polling (a quick result within tens of
ms, long tasks backing off, a cap on the status-call rate, polls never queued behind submissions)
and coalesced submissions (one V3 submit for the tasks of one moment, each caller its own id or error).
Assertions are on the fake's call counts and on margins far wider than any scheduling jitter."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import globus_sdk
import pytest

from adaptors.call_budget import CallBudget
from adaptors.compute_config import GlobusComputeClusterConfig
from adaptors.compute_service import STATUS_CALL_BURST, STATUS_CALLS_PER_SECOND, ComputeService, TaskFailed
from adaptors.compute_submit import MAX_TASKS_PER_SUBMIT
from adaptors.telemetry import NoTelemetry
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute

pytestmark = pytest.mark.alone(
    "result latency under 0.3 s, and counts of status calls over sub-second cadences"
)

SERVICE_ID, SERVICE_SECRET = "7d0e1c36-2b57-4f0c-9a2b-6f1c5b0e9a11", "service-account-secret"
ENDPOINT = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"
ECHO = "21111111-aaaa-4bbb-8ccc-000000000001"
SLEEP = "21111111-aaaa-4bbb-8ccc-000000000002"
BROKEN = "21111111-aaaa-4bbb-8ccc-000000000003"
UNKNOWN = "21111111-aaaa-4bbb-8ccc-00000000000f"


def echo(value: Any) -> Any:
    return value


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def broken(value: Any) -> Any:
    raise ValueError(f"no {value}")


@pytest.fixture
async def globus() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        running.add_client(SERVICE_ID, SERVICE_SECRET)
        yield running


@pytest.fixture
async def compute(globus: FakeGlobus) -> AsyncIterator[FakeCompute]:
    async with FakeCompute() as fake:
        fake.add_endpoint(ENDPOINT)
        for function_id, function in ((ECHO, echo), (SLEEP, sleep), (BROKEN, broken)):
            fake.register_function(function_id, function)
        yield fake


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


Make = Callable[..., ComputeService]


@pytest.fixture
def make(compute: FakeCompute, globus: FakeGlobus, pool: ThreadPoolExecutor) -> Make:
    """A service for the fakes: `make(poll_interval=0.5, executor=None)` (None: the fixture's 8 threads)."""

    def service(poll_interval: float = 0.5, executor: ThreadPoolExecutor | None = None) -> ComputeService:
        access = GlobusComputeClusterConfig(
            qstat_endpoint_uuid=ENDPOINT,
            qstat_function_uuid=ECHO,
            client_id=SERVICE_ID,
            client_secret=SERVICE_SECRET,
            compute_url=compute.url,
            auth_url=globus.auth_url,
            poll_interval_seconds=poll_interval,
        )
        return ComputeService(access, access.service_key(), executor or pool, NoTelemetry())

    return service


def polls(fake: FakeCompute) -> list[float]:
    return [r.time for r in fake.requests if r.path.endswith("/batch_status")]


async def test_a_quick_result_comes_well_before_the_poll_interval(compute: FakeCompute, make: Make) -> None:
    service = make()
    await service.submit(ENDPOINT, ECHO, "warm")  # the token and the connections
    try:
        started = time.monotonic()
        task_id = await service.submit(ENDPOINT, ECHO, "hello")
        assert await service.result(task_id, timeout=10) == "hello"
        elapsed = time.monotonic() - started
        assert elapsed < 0.3, f"{elapsed:.3f} s: the old poller needed at least 0.5 s"
        assert len(polls(compute)) <= 3
    finally:
        await service.close()


def timed_looks(service: ComputeService) -> list[float]:
    """When the poller decided each status call: free of the jitter of its arrival at the fake."""
    started: list[float] = []
    look = service._look

    async def timed(task_ids: list[str], horizon: float) -> None:
        started.append(time.monotonic())
        await look(task_ids, horizon)

    service._look = timed  # type: ignore[method-assign]
    return started


async def test_long_tasks_back_off_to_the_poll_interval(compute: FakeCompute, make: Make) -> None:
    service = make(poll_interval=0.2)
    looks = timed_looks(service)
    try:
        task_id = await service.submit(ENDPOINT, SLEEP, 1.5)
        assert await service.result(task_id, timeout=10) == 1.5
        # 0.02, 0.02, 0.04, 0.08, 0.16, then every 0.2 s: about 11 looks in 1.5 s,
        # where a fixed 20 ms cadence would have made 75
        assert 5 <= len(looks) <= 14, looks
        gaps = [b - a for a, b in itertools.pairwise(looks)]
        assert min(gaps[-3:]) >= 0.199, gaps
        assert len(polls(compute)) == len(looks)
    finally:
        await service.close()


async def test_status_calls_are_capped_and_batched(compute: FakeCompute, make: Make) -> None:
    """Forty tasks submitted 10 ms apart: over every span between two status calls, no more calls than
    the budget allows (timed where the poller decides, free of the fake's arrival jitter), and calls
    ask about many tasks at once."""
    service = make(poll_interval=0.5)
    started = timed_looks(service)
    try:

        async def one(index: int) -> Any:
            await asyncio.sleep(index * 0.01)
            task_id = await service.submit(ENDPOINT, SLEEP, 0.3)
            return await service.result(task_id, timeout=10)

        assert await asyncio.gather(*(one(i) for i in range(40))) == [0.3] * 40
        for first, last in itertools.combinations(range(len(started)), 2):
            span = started[last] - started[first] + 0.001  # the few µs from the budget to the timer
            assert last - first + 1 <= STATUS_CALL_BURST + STATUS_CALLS_PER_SECOND * span, started
        assert len(polls(compute)) == len(started) < 40, "the tasks share calls"
        asked = max(len(r.json["task_ids"]) for r in compute.requests if r.path.endswith("/batch_status"))
        assert asked > 1
    finally:
        await service.close()


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_caps_the_long_run_rate_and_allows_a_burst() -> None:
    """A caller spending whenever the budget lets it, over 10 s of a clock in 1 ms steps: the burst
    goes out at once, then no more than the rate; and after a quiet second the burst again."""
    clock = Clock()
    budget = CallBudget(rate=20, burst=5, clock=clock)
    at_once = 0
    while budget.wait() == 0:
        budget.spend()
        at_once += 1
    assert at_once == 5
    spent = 0
    for _ in range(10_000):
        clock.now += 0.001
        if budget.wait() == 0:
            budget.spend()
            spent += 1
    assert 199 <= spent <= 200, "20 a second over 10 s"
    assert 0 < budget.wait() <= 0.05
    clock.now += 1.0
    waits = []
    for _ in range(5):
        waits.append(budget.wait())
        budget.spend()
    assert waits == [0.0] * 5 and budget.wait() > 0


async def test_a_fresh_task_is_looked_at_without_waiting_for_a_spacing(
    compute: FakeCompute, make: Make
) -> None:
    """With the budget's clock stopped, requests one after another still each get their status call
    as soon as it is due, until the burst is spent; then the next waits for the budget, and is
    looked at once its clock moves on by one call's worth."""
    service = make(poll_interval=0.5)
    clock = Clock()
    service._budget = CallBudget(STATUS_CALLS_PER_SECOND, STATUS_CALL_BURST, clock)
    try:
        for index in range(STATUS_CALL_BURST):
            task_id = await service.submit(ENDPOINT, ECHO, index)
            assert await service.result(task_id, timeout=10) == index
        assert len(polls(compute)) == STATUS_CALL_BURST, "one call each, none waited for a spacing"
        task_id = await service.submit(ENDPOINT, ECHO, "later")
        waiting = asyncio.ensure_future(service.result(task_id, timeout=10))
        await asyncio.sleep(0.3)
        assert not waiting.done() and len(polls(compute)) == STATUS_CALL_BURST, "the budget is spent"
        clock.now += 1 / STATUS_CALLS_PER_SECOND
        assert await asyncio.wait_for(waiting, 5) == "later"
        assert len(polls(compute)) == STATUS_CALL_BURST + 1
    finally:
        await service.close()


async def test_a_call_asks_about_every_pending_task(compute: FakeCompute, make: Make) -> None:
    """A quick task's call also asks about a long task that is not due: the call is made anyway."""
    service = make(poll_interval=0.5)
    try:
        long = await service.submit(ENDPOINT, SLEEP, 1.0)
        waiting = asyncio.ensure_future(service.result(long, timeout=10))
        await asyncio.sleep(0.1)
        quick = await service.submit(ENDPOINT, ECHO, "quick")
        assert await service.result(quick, timeout=10) == "quick"
        asked = [set(r.json["task_ids"]) for r in compute.requests if r.path.endswith("/batch_status")]
        assert all(ids == {long, quick} for ids in asked if quick in ids), asked
        assert await waiting == 1.0
    finally:
        await service.close()


async def test_long_tasks_submitted_apart_share_their_calls(compute: FakeCompute, make: Make) -> None:
    """Two long tasks 10 ms apart: the second is looked at with the first and backs off in step with
    it, instead of making calls of its own 10 ms after each of the first's."""
    service = make(poll_interval=0.2)
    looks = timed_looks(service)
    try:
        first = await service.submit(ENDPOINT, SLEEP, 1.0)
        waiting = asyncio.ensure_future(service.result(first, timeout=10))
        await asyncio.sleep(0.01)
        second = await service.submit(ENDPOINT, SLEEP, 1.0)
        assert await service.result(second, timeout=10) == 1.0
        assert await waiting == 1.0
        # one task alone: 0.02, 0.02, 0.04, 0.08, 0.16, then every 0.2 s, about 9 looks in 1 s
        assert len(looks) <= 12, looks
    finally:
        await service.close()


async def test_a_poll_does_not_wait_behind_the_shared_pool(compute: FakeCompute, make: Make) -> None:
    """The adaptors' pool is busy (a submission burst, say): results still arrive."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        service = make()
        try:
            task_id = await service.submit(ENDPOINT, ECHO, "through")
            release = threading.Event()
            busy = asyncio.get_running_loop().run_in_executor(pool, release.wait, 10)
            assert await service.result(task_id, timeout=5) == "through"
            release.set()
            await busy
        finally:
            await service.close()


async def test_a_task_that_fails_still_fails(compute: FakeCompute, make: Make) -> None:
    service = make()
    try:
        task_id = await service.submit(ENDPOINT, BROKEN, "luck")
        with pytest.raises(TaskFailed, match="no luck"):
            await service.result(task_id, timeout=10)
        late = await service.submit(ENDPOINT, SLEEP, 5)
        with pytest.raises(TimeoutError):
            await service.result(late, timeout=0.1)
    finally:
        await service.close()


def submits(fake: FakeCompute) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.path.endswith("/submit")]


async def test_concurrent_submissions_go_out_as_one_batch(compute: FakeCompute, make: Make) -> None:
    service = make()
    try:
        task_ids = await asyncio.gather(*(service.submit(ENDPOINT, ECHO, i) for i in range(30)))
        assert len(submits(compute)) == 1 and len(set(task_ids)) == 30
        results = await asyncio.gather(*(service.result(t, timeout=10) for t in task_ids))
        assert results == list(range(30)), "each caller has its own task"
    finally:
        await service.close()


async def test_a_batch_is_bounded_in_size(compute: FakeCompute, make: Make) -> None:
    service = make()
    count = 2 * MAX_TASKS_PER_SUBMIT + 10
    try:
        task_ids = await asyncio.gather(*(service.submit(ENDPOINT, ECHO, i) for i in range(count)))
        sizes = sorted(len(body["tasks"][ECHO]) for body in submits(compute))
        assert sizes == [10, MAX_TASKS_PER_SUBMIT, MAX_TASKS_PER_SUBMIT]
        assert len(set(task_ids)) == count
    finally:
        await service.close()


async def test_endpoint_configs_are_not_mixed(compute: FakeCompute, make: Make) -> None:
    service = make()
    try:
        await asyncio.gather(
            *(service.submit(ENDPOINT, ECHO, i, endpoint_config={"queue": q}) for i, q in enumerate("aab"))
        )
        configs = sorted(
            (body["user_endpoint_config"]["queue"], len(body["tasks"][ECHO])) for body in submits(compute)
        )
        assert configs == [("a", 2), ("b", 1)]
    finally:
        await service.close()


async def test_each_caller_gets_its_own_error(compute: FakeCompute, make: Make) -> None:
    """An unknown function refuses the whole batch at the service, and an argument JSON cannot carry
    fails in the gateway: only those callers see it, the others get their tasks."""
    service = make()
    try:
        outcomes = await asyncio.gather(
            service.submit(ENDPOINT, ECHO, "a"),
            service.submit(ENDPOINT, UNKNOWN, "b"),
            service.submit(ENDPOINT, ECHO, object()),
            service.submit(ENDPOINT, ECHO, "d"),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], globus_sdk.GlobusAPIError) and outcomes[1].http_status == 404
        assert isinstance(outcomes[2], Exception) and not isinstance(outcomes[2], globus_sdk.GlobusError)
        good = [outcomes[0], outcomes[3]]
        assert all(isinstance(task_id, str) for task_id in good)
        assert [await service.result(str(t), timeout=10) for t in good] == ["a", "d"]
    finally:
        await service.close()


async def test_an_outage_fails_every_caller_once(compute: FakeCompute, make: Make) -> None:
    service = make()
    try:
        await service.submit(ENDPOINT, ECHO, "warm")
        compute.fail_status = 503
        before = len(submits(compute))
        outcomes = await asyncio.gather(
            *(service.submit(ENDPOINT, ECHO, i) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(o, globus_sdk.GlobusAPIError) and o.http_status == 503 for o in outcomes)
        assert len(submits(compute)) - before <= 3, "one batch (and the SDK's retries), not one per task"
    finally:
        await service.close()


async def test_closing_stops_the_poller_even_when_a_wake_comes_in_the_same_turn(make: Make) -> None:
    """Python 3.11's `asyncio.wait_for` loses a cancellation that arrives in the same turn of the
    event loop as the end of what it waits for: a poller woken (a new task) just as the gateway
    shuts down went on polling for as long as a request waited."""
    service = make(poll_interval=30)
    waiting = asyncio.ensure_future(service.result("6d1e2f30-0000-4000-8000-000000000001", 60))
    try:
        await asyncio.sleep(0.005)  # the poller waits for the task's first look, 20 ms after it
        poller = service._poller
        assert poller is not None and not poller.done()
        service._wake.set()
        await service.close()
        await asyncio.wait({poller}, timeout=2)
        assert poller.cancelled(), "the poller ended with the service"
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
