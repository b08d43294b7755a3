"""A gateway whose Globus Compute results come from the service's AMQP result queue (the default), with
polling as the safety net: the fake Compute service publishing to a real RabbitMQ broker, as the
service does for the SDK's Executor. An answer without any status call naming its task can only have
come from the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adaptors.compute_result_queue import RETRY_FIRST_SECONDS
from proxy.core.state import STATE
from testing.existing_function import existing_vllm_function
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.services.rabbitmq_server import RabbitMQServer
from tests.compute_setup import ENDPOINT, INFER, LEGACY, QSTAT, SECRET, compute_config, load_function, qstat
from tests.conftest import Server, auth, chat, free_port, start_gateway
from tests.support import value
from tests.test_routes import call

FAILING = "11111111-aaaa-4bbb-8ccc-000000000021"
QUEUE_ONLY = {"push_results": False}
"""Our function's answer is not pushed through the relay either: it can only come by queue or poll."""


def failing(parameters: dict[str, Any]) -> str:
    raise RuntimeError("the model server is gone")


@asynccontextmanager
async def publishing(globus: FakeGlobus, broker: RabbitMQServer) -> AsyncIterator[FakeCompute]:
    """The tests' fake Compute service, publishing its results to `broker`."""
    fake = FakeCompute(
        accepted_tokens=lambda token: token in globus.issued_tokens, result_broker_url=broker.url
    )
    async with fake:
        fake.add_endpoint(ENDPOINT)
        fake.register_function(INFER, load_function())
        fake.register_function(QSTAT, qstat)
        fake.register_function(LEGACY, existing_vllm_function)
        fake.register_function(FAILING, failing)
        yield fake


@pytest.fixture
async def queued(
    globus: FakeGlobus, rabbitmq: RabbitMQServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeCompute]:
    monkeypatch.setenv("INTERNAL_STREAMING_SECRET", SECRET)
    async with publishing(globus, rabbitmq) as fake:
        yield fake


async def gateway_for(
    tmp_path: Path, backend: Server, compute: FakeCompute, globus: FakeGlobus, **chat_config: Any
) -> tuple[Any, Server]:
    tmp_path.mkdir(exist_ok=True)
    path = compute_config(
        tmp_path, backend, compute, globus, free_port(), chat_config={**QUEUE_ONLY, **chat_config}
    )
    return await start_gateway(path)


@pytest.fixture
async def gateway(
    backend: Server, queued: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await gateway_for(tmp_path, backend, queued, globus)
    yield server
    await runner.cleanup()


async def ask(http: aiohttp.ClientSession, gateway: Server, content: str = "Hi") -> tuple[int, Any, float]:
    started = time.monotonic()
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/hpc/vllm/v1/chat/completions", json=chat(content), headers=auth()
    )
    return status, document, time.monotonic() - started


def status_calls_naming(compute: FakeCompute, task_id: str) -> int:
    return sum(
        1
        for request in compute.requests
        if request.path.endswith("/batch_status") and task_id in (request.json or {}).get("task_ids", [])
    )


def submits(compute: FakeCompute) -> list[dict[str, Any]]:
    return [request.json for request in compute.requests if request.path.endswith("/submit")]


async def answered_by_queue(
    http: aiohttp.ClientSession, gateway: Server, compute: FakeCompute, seconds: float = 10.0
) -> tuple[int, Any]:
    """Requests until one is answered without a status call naming its task (the first ones may
    come before the gateway's connection to the broker is open, and be polled); that answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = set(compute.tasks)
        status, document, _ = await ask(http, gateway)
        (task_id,) = set(compute.tasks) - before
        if status_calls_naming(compute, task_id) == 0:
            return status, document
        await asyncio.sleep(0.1)
    raise AssertionError("no answer came from the result queue")


async def test_answers_come_from_the_queue_in_one_task_group(
    gateway: Server, queued: FakeCompute, http: aiohttp.ClientSession
) -> None:
    status, document = await answered_by_queue(http, gateway, queued)
    assert status == 200, document
    results = await asyncio.gather(*(ask(http, gateway) for _ in range(20)))
    assert all(
        status == 200 and document["choices"][0]["message"]["content"] for status, document, _ in results
    )
    bodies = submits(queued)
    assert all(body["create_queue"] is True for body in bodies)
    first_group = bodies[0].get("task_group_id")
    assert first_group is None, "the service makes the group"
    groups = {task.task_group_id for task in queued.tasks.values()}
    assert len(groups) == 1, "later submissions join the first group"
    assert all(body["task_group_id"] in groups for body in bodies[1:])
    text = gateway.app[STATE].metrics.exposition().decode()
    assert value(text, "gateway_compute_results_total", source="queue") >= 1
    assert value(text, "gateway_compute_result_queues") == 1


async def test_when_the_service_stops_publishing_answers_are_polled(
    gateway: Server, queued: FakeCompute, http: aiohttp.ClientSession
) -> None:
    assert (await answered_by_queue(http, gateway, queued))[0] == 200
    queued.publish_results = False
    status, document, _ = await ask(http, gateway)
    assert status == 200, document
    task_id = list(queued.tasks)[-1]
    assert status_calls_naming(queued, task_id) >= 1


async def test_a_high_assurance_result_is_read_by_a_status_call_at_once(
    gateway: Server, queued: FakeCompute, http: aiohttp.ClientSession
) -> None:
    assert (await answered_by_queue(http, gateway, queued))[0] == 200
    queued.high_assurance_results = True
    status, document, _ = await ask(http, gateway)
    assert status == 200, document
    assert document["choices"][0]["message"]["content"]
    assert status_calls_naming(queued, list(queued.tasks)[-1]) >= 1


async def test_a_pushed_failure_is_answered_as_a_polled_one(
    backend: Server, queued: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    polled_runner, polled = await gateway_for(
        tmp_path / "polled", backend, queued, globus, function_uuid=FAILING, result_queue=False
    )
    pushed_runner, pushed = await gateway_for(
        tmp_path / "pushed", backend, queued, globus, function_uuid=FAILING
    )
    try:
        by_poll = await ask(http, polled)
        by_queue = await answered_by_queue(http, pushed, queued)
    finally:
        await pushed_runner.cleanup()
        await polled_runner.cleanup()
    assert by_poll[0] >= 500
    assert by_queue == by_poll[:2]


async def test_while_the_broker_is_down_answers_are_polled_and_after_it_the_queue_again(
    backend: Server,
    globus: FakeGlobus,
    rabbitmq_private: RabbitMQServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INTERNAL_STREAMING_SECRET", SECRET)
    async with publishing(globus, rabbitmq_private) as fake:
        runner, gateway = await gateway_for(tmp_path, backend, fake, globus)
        try:
            assert (await answered_by_queue(http, gateway, fake))[0] == 200
            await rabbitmq_private.stop()
            status, document, _ = await ask(http, gateway)
            assert status == 200, document
            assert status_calls_naming(fake, list(fake.tasks)[-1]) >= 1
            await rabbitmq_private.start()
            reopened = RETRY_FIRST_SECONDS * (1 + 2 + 4 + 8 + 16)
            assert (await answered_by_queue(http, gateway, fake, reopened))[0] == 200
        finally:
            await runner.cleanup()


async def test_a_service_without_queues_is_polled_with_a_warning(
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The deployed default (`result_queue` on) against a service whose queues are out of reach."""
    runner, gateway = await gateway_for(tmp_path, backend, compute, globus, result_queue=True)
    try:
        status, document, _ = await ask(http, gateway)
        assert status == 200, document
        async with asyncio.timeout(5):
            while "results are polled" not in caplog.text:
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    assert "secret" not in caplog.text.lower().replace("internal_streaming_secret", "")
