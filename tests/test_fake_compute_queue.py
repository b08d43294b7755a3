"""The fake Compute service pushes results to a real RabbitMQ as the real service does.

The key check is globus-compute-sdk's own ``Executor``: its ``_ResultWatcher`` asks the fake for the AMQP
URL, consumes the task group's queue with pika and completes futures from the Result messages alone (it
never polls, except for high-assurance results). Other tests read the queue with pika the same way
(``basic_consume``, manual acks) and decode with ``messagepack.unpack``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import globus_sdk
import pika
import pika.exceptions
import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.sdk.batch import Batch
from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS, Executor
from globus_compute_sdk.serialize import ComputeSerializer

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.services.rabbitmq_server import RabbitMQServer
from tests.test_fake_compute import (
    BROKEN,
    ENDPOINT,
    GENERATE,
    MODEL_PARAMS,
    SERVICE_ID,
    SERVICE_SECRET,
    Clients,
    blocking,
    broken,
    build_clients,
    generate,
    sdk_client,
)

PAYLOAD = {"model_params": MODEL_PARAMS}


@pytest.fixture
async def globus() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        running.add_client(SERVICE_ID, SERVICE_SECRET)
        yield running


def fake_compute(globus: FakeGlobus, broker_url: str | None) -> FakeCompute:
    fake = FakeCompute(accepted_tokens=lambda t: t in globus.issued_tokens, result_broker_url=broker_url)
    fake.add_endpoint(ENDPOINT)
    fake.register_function(GENERATE, generate)
    fake.register_function(BROKEN, broken)
    return fake


@pytest.fixture
async def compute(globus: FakeGlobus, rabbitmq: RabbitMQServer) -> AsyncIterator[FakeCompute]:
    async with fake_compute(globus, rabbitmq.url) as running:
        yield running


@pytest.fixture
async def clients(globus: FakeGlobus, compute: FakeCompute) -> Clients:
    return await blocking(build_clients, globus, compute)


async def submit(
    clients: Clients, *functions: str, create_queue: bool = True
) -> tuple[str, dict[str, list[str]]]:
    """One batch as the Executor sends it (``request_queue`` is its ``create_queue``): the task group
    and the task ids by function."""
    batch = Batch(task_group_id=None, request_queue=create_queue)
    for function_id in functions:
        batch.add(function_id, args=(PAYLOAD,))
    answer = await blocking(clients.v3.submit, ENDPOINT, batch.prepare())
    return answer["task_group_id"], answer["tasks"]


def consume(url: str, queue: str, count: int, timeout: float = 5.0) -> list[tuple[Any, Result]]:
    """As ``_ResultWatcher`` consumes: manual acks, each body unpacked to a Result."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    received: list[tuple[Any, Result]] = []
    try:
        channel = connection.channel()
        for method, properties, body in channel.consume(queue, inactivity_timeout=timeout):
            if method is None:
                break
            result = messagepack.unpack(body)
            assert isinstance(result, Result)
            received.append((properties, result))
            channel.basic_ack(method.delivery_tag)
            if len(received) == count:
                break
        channel.cancel()
    finally:
        connection.close()
    return received


def waiting_messages(url: str, queue: str) -> int | None:
    """How many messages wait in `queue`; None when there is no such queue."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.message_count)
    except pika.exceptions.ChannelClosedByBroker as closed:
        assert closed.reply_code == 404
        return None
    finally:
        if connection.is_open:
            connection.close()


async def settled(compute: FakeCompute, task_ids: list[str]) -> None:
    """Every task finished and everything published confirmed by the broker."""
    for task_id in task_ids:
        await compute.settled(task_id)
    assert compute.result_queues is not None
    await compute.result_queues.settled()


async def shut_down(executor: Executor) -> None:
    """The Executor's shutdown leaves its result watcher running (it lives for the task group, and
    reconnects for a minute when the broker goes away): stop it as well, so no thread outlives the test."""
    await blocking(executor.shutdown, wait=True, cancel_futures=True)
    watcher = _RESULT_WATCHERS.get(executor.task_group_id) if executor.task_group_id else None
    if watcher is not None:
        await blocking(watcher.shutdown, wait=True)
        assert not watcher.is_alive()


async def test_the_compute_sdks_executor_gets_results_and_failures_over_amqp(
    compute: FakeCompute, clients: Clients
) -> None:
    client = sdk_client(clients, compute)
    executor = Executor(endpoint_id=ENDPOINT, client=client)
    try:
        good = executor.submit_to_registered_function(GENERATE, args=(PAYLOAD,))
        bad = executor.submit_to_registered_function(BROKEN, args=(PAYLOAD,))

        assert await blocking(good.result, 20) == generate(PAYLOAD)
        with pytest.raises(TaskExecutionFailed) as failed:
            await blocking(bad.result, 20)
    finally:
        await shut_down(executor)

    assert failed.value.remote_data == compute.task(bad.task_id).exception
    assert "max_tokens too large" in str(failed.value)
    assert compute.count("/v2/get_amqp_result_connection_url") >= 1
    assert compute.count("/batch_status") == 0 and compute.count(f"/tasks/{good.task_id}") == 0
    submitted = next(r for r in compute.requests if r.path.endswith("/submit"))
    assert submitted.json["create_queue"] is True


async def test_a_high_assurance_result_makes_the_executor_poll_for_it(
    compute: FakeCompute, clients: Clients
) -> None:
    compute.high_assurance_results = True
    executor = Executor(endpoint_id=ENDPOINT, client=sdk_client(clients, compute))
    try:
        future = executor.submit_to_registered_function(GENERATE, args=(PAYLOAD,))
        assert await blocking(future.result, 20) == generate(PAYLOAD)
    finally:
        await shut_down(executor)
    assert compute.count("/batch_status") == 1


async def test_messages_are_the_endpoints_results(
    compute: FakeCompute, clients: Clients, rabbitmq: RabbitMQServer
) -> None:
    group, tasks = await submit(clients, GENERATE, BROKEN)
    good, bad = tasks[GENERATE][0], tasks[BROKEN][0]
    await settled(compute, [good, bad])

    received = await blocking(consume, rabbitmq.url, compute.queue_prefix + group, 2)

    by_task = {str(result.task_id): (properties, result) for properties, result in received}
    assert set(by_task) == {good, bad}
    properties, result = by_task[good]
    assert not result.is_error and result.data == compute.task(good).result
    assert ComputeSerializer().deserialize(result.data) == generate(PAYLOAD)
    assert result.details is not None and result.details["endpoint_id"] == ENDPOINT
    assert result.task_statuses is not None
    assert [s.state.value for s in result.task_statuses] == ["execution-start", "execution-end"]
    assert properties.delivery_mode == 2 and properties.headers is None
    assert properties.timestamp == int(compute.task(good).finished_at or 0)
    properties, result = by_task[bad]
    assert result.is_error and result.data == compute.task(bad).exception
    assert result.error_details is not None and result.error_details.code == "RemoteExecutionError"
    assert "max_tokens too large" in result.data


async def test_high_assurance_messages_carry_no_data(
    compute: FakeCompute, clients: Clients, rabbitmq: RabbitMQServer
) -> None:
    compute.high_assurance_results = True
    group, tasks = await submit(clients, GENERATE)
    await settled(compute, tasks[GENERATE])

    [(properties, result)] = await blocking(consume, rabbitmq.url, compute.queue_prefix + group, 1)

    assert properties.headers == {"high_assurance": True}
    assert result.data == "" and str(result.task_id) == tasks[GENERATE][0]


async def test_without_create_queue_nothing_is_pushed(
    compute: FakeCompute, clients: Clients, rabbitmq: RabbitMQServer
) -> None:
    group, tasks = await submit(clients, GENERATE, create_queue=False)
    await settled(compute, tasks[GENERATE])

    assert compute.result_queues is not None and compute.result_queues.published == 0
    assert await blocking(waiting_messages, rabbitmq.url, compute.queue_prefix + group) is None


async def test_when_pushing_stops_results_stay_pollable(
    compute: FakeCompute, clients: Clients, rabbitmq: RabbitMQServer
) -> None:
    compute.publish_results = False
    group, tasks = await submit(clients, GENERATE)
    await settled(compute, tasks[GENERATE])

    assert await blocking(waiting_messages, rabbitmq.url, compute.queue_prefix + group) == 0
    document = (await blocking(clients.v2.get_task_batch, tasks[GENERATE]))["results"][tasks[GENERATE][0]]
    assert document["status"] == "success" and document["result"] == compute.task(tasks[GENERATE][0]).result


async def test_the_url_route_answers_the_broker_and_prefix(compute: FakeCompute, clients: Clients) -> None:
    answer = await blocking(clients.v2.get_result_amqp_url)
    assert answer.data == {"queue_prefix": compute.queue_prefix, "connection_url": compute.result_broker_url}


async def test_without_a_broker_the_url_route_is_unavailable(globus: FakeGlobus) -> None:
    async with fake_compute(globus, None) as compute:
        clients = await blocking(build_clients, globus, compute)
        with pytest.raises(globus_sdk.ComputeAPIError) as unavailable:
            await blocking(clients.v2.get_result_amqp_url)
        _group, tasks = await submit(clients, GENERATE)  # create_queue is ignored
        await compute.settled(tasks[GENERATE][0])
    assert unavailable.value.http_status == 503


async def test_create_queue_must_be_a_boolean(compute: FakeCompute, clients: Clients) -> None:
    body = Batch(task_group_id=None).prepare() | {"create_queue": "yes"}
    body["tasks"] = {GENERATE: []}
    with pytest.raises(globus_sdk.ComputeAPIError) as malformed:
        await blocking(clients.v3.submit, ENDPOINT, body)
    assert malformed.value.http_status == 422


async def test_a_broker_outage_leaves_polls_working_and_the_fake_reconnects(
    globus: FakeGlobus, rabbitmq_private: RabbitMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "testing.fake_globus.compute_results_queue")
    async with fake_compute(globus, rabbitmq_private.url) as compute:
        clients = await blocking(build_clients, globus, compute)
        publisher = compute.result_queues
        assert publisher is not None and publisher.connected
        await rabbitmq_private.stop()

        group, tasks = await submit(clients, GENERATE)  # the queue cannot be declared: answered anyway
        await compute.settled(tasks[GENERATE][0])
        results = (await blocking(clients.v2.get_task_batch, tasks[GENERATE]))["results"]
        assert results[tasks[GENERATE][0]]["status"] == "success"
        assert publisher.dropped == 1 and not publisher.connected
        assert any("dropping results" in record.getMessage() for record in caplog.records)

        await rabbitmq_private.start()
        async with asyncio.timeout(10):
            while not publisher.connected:
                await asyncio.sleep(0.05)
        group, tasks = await submit(clients, GENERATE)
        await settled(compute, tasks[GENERATE])
        received = await blocking(consume, rabbitmq_private.url, compute.queue_prefix + group, 1)
    assert [str(result.task_id) for _properties, result in received] == tasks[GENERATE]
    assert publisher.connections == 2
