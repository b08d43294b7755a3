"""The gateway's consumer of Globus Compute's AMQP result queues (adaptors/compute_result_queue.py),
against a real RabbitMQ server: messages packed by globus-compute-common as the service packs them,
queues declared as the service declares them, and the broker going away and coming back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import (
    EPStatusReport,
    Result,
    ResultErrorDetails,
    TaskTransition,
)
from globus_compute_common.tasks import ActorName, TaskState

from adaptors import compute_early
from adaptors.compute_early import EarlyResults
from adaptors.compute_result_queue import (
    MAX_MESSAGE_BYTES,
    RETRY_FIRST_SECONDS,
    QueuedResult,
    ResultQueue,
    _plain_result,
    read_message,
)
from testing.services.rabbitmq_server import RabbitMQServer

PREFIX = "gateway-test."


def packed(task_id: str, data: str = '"ok"', error: bool = False) -> bytes:
    details = ResultErrorDetails(code="RemoteExecutionError", user_message="boom") if error else None
    return bytes(messagepack.pack(Result(task_id=uuid.UUID(task_id), data=data, error_details=details)))


def test_a_result_is_read_with_its_task_data_and_failure() -> None:
    task_id = str(uuid.uuid4())
    assert read_message(None, packed(task_id)) == QueuedResult(task_id, '"ok"', False)
    assert read_message({}, packed(task_id, "Traceback ...", error=True)) == QueuedResult(
        task_id, "Traceback ...", True
    )


def test_a_high_assurance_result_leaves_its_data_to_a_status_call() -> None:
    task_id = str(uuid.uuid4())
    assert read_message({"high_assurance": True}, packed(task_id)) == QueuedResult(task_id, None, False)


def results() -> list[Result]:
    """Results as endpoints send them: success, failure, with details and task transitions."""
    transitions = [
        TaskTransition(timestamp=1733300000000, state=TaskState.EXEC_START, actor=ActorName.WORKER),
        TaskTransition(timestamp=1733300000100, state=TaskState.EXEC_END, actor=ActorName.WORKER),
    ]
    error = ResultErrorDetails(code="RemoteExecutionError", user_message="An error occurred")
    return [
        Result(task_id=uuid.uuid4(), data='11\n"ok"'),
        Result(task_id=uuid.uuid4(), data="Traceback (most recent call last): ...", error_details=error),
        Result(task_id=uuid.uuid4(), data="", details={"os": "Linux", "python_version": "3.11.7"}),
        Result(task_id=uuid.uuid4(), data="00\ngASVBQAAAAAAAACMAWGULg==", task_statuses=transitions),
        Result(task_id=uuid.uuid4(), data='\u00e9\U0001f600 \\ " \n'),
    ]


@pytest.mark.parametrize("result", results(), ids=["success", "failure", "details", "transitions", "escapes"])
def test_the_plain_reading_agrees_with_messagepack(result: Result) -> None:
    """The quick reading of protocol 1 gives what `messagepack.unpack` gives."""
    body = bytes(messagepack.pack(result))
    unpacked = messagepack.unpack(body)
    assert isinstance(unpacked, Result)
    expected = QueuedResult(str(unpacked.task_id), unpacked.data, unpacked.is_error)
    assert _plain_result(body) == expected == read_message(None, body)


@pytest.mark.parametrize(
    "body",
    [
        b'\x01{"message_type": "result", "data": {"task_id": "not-a-uuid", "data": "x"}}',
        b'\x01{"message_type": "result", "data": {"task_id": "%s", "data": 1}}' % str(uuid.uuid4()).encode(),
        b'\x01{"message_type": "result", "data": {"task_id": "%s", "data": "x", "error_details": "boom"}}'
        % str(uuid.uuid4()).encode(),
        b'\x01{"message_type": "task", "data": {"task_id": "%s", "data": "x"}}' % str(uuid.uuid4()).encode(),
        b'\x01["result"]',
        b"\x02{}",
    ],
    ids=["task-id", "data", "error-details", "other-type", "envelope", "protocol"],
)
def test_what_the_plain_reading_cannot_vouch_for_goes_to_messagepack(body: bytes) -> None:
    assert _plain_result(body) is None
    assert read_message(None, body) is None, "messagepack refuses it too"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not messagepack",
        b'{"message_type": "result"}',
        bytes(messagepack.pack(EPStatusReport(endpoint_id=uuid.uuid4(), global_state={}, task_statuses={}))),
        b"x" * (MAX_MESSAGE_BYTES + 1),
    ],
    ids=["empty", "garbage", "json", "not-a-result", "too-large"],
)
def test_what_is_not_a_result_is_refused(body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    assert read_message(None, body) is None
    assert caplog.records, "refused with a warning"


class Publisher:
    """The service's side: declares a task group's queue and publishes to it (blocking pika, in a
    thread, as a separate client)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def declare(self, group: str) -> None:
        await asyncio.to_thread(
            self._run, lambda channel: channel.queue_declare(PREFIX + group, durable=True)
        )

    async def publish(self, group: str, *bodies: bytes) -> None:
        def publish(channel: Any) -> None:
            for body in bodies:
                channel.basic_publish("", PREFIX + group, body, pika.BasicProperties(delivery_mode=2))

        await asyncio.to_thread(self._run, publish)

    async def depth(self, group: str) -> int:
        found: list[int] = []
        await asyncio.to_thread(
            self._run,
            lambda channel: found.append(
                channel.queue_declare(PREFIX + group, passive=True).method.message_count
            ),
        )
        return found[0]

    def _run(self, action: Callable[[Any], Any]) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            action(connection.channel())
        finally:
            connection.close()


@pytest.fixture
def broker(rabbitmq: RabbitMQServer) -> RabbitMQServer:
    """The session's broker: these tests' queues are named after fresh task group ids."""
    return rabbitmq


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def consumer(
    broker: RabbitMQServer, received: list[QueuedResult], changes: list[bool]
) -> tuple[ResultQueue, list[int]]:
    asked: list[int] = []

    async def details() -> tuple[str, str]:
        asked.append(1)
        return broker.url, PREFIX

    return ResultQueue(details, received.append, changes.append), asked


async def test_results_of_every_followed_group_are_delivered_and_acknowledged(broker: RabbitMQServer) -> None:
    publisher, received, changes = Publisher(broker.url), [], []
    groups = [str(uuid.uuid4()), str(uuid.uuid4())]
    for group in groups:
        await publisher.declare(group)
    queue, _ = await consumer(broker, received, changes)
    ids = [str(uuid.uuid4()) for _ in range(600)]
    await publisher.publish(groups[0], *(packed(task_id) for task_id in ids[:300]))
    queue.follow(groups[0])
    queue.follow(groups[1])
    await publisher.publish(groups[1], *(packed(task_id) for task_id in ids[300:]))
    try:
        await until(lambda: len(received) == 600)
        assert sorted(r.task_id for r in received) == sorted(ids)
        assert queue.up and changes == [True]
        await until(lambda: True)
        for group in groups:
            assert await publisher.depth(group) == 0, "every message acknowledged"
    finally:
        await queue.close()
    assert changes == [True, False]


async def test_an_unreadable_message_is_dropped_not_redelivered(broker: RabbitMQServer) -> None:
    publisher, received, changes = Publisher(broker.url), [], []
    group = str(uuid.uuid4())
    await publisher.declare(group)
    queue, _ = await consumer(broker, received, changes)
    queue.follow(group)
    good = str(uuid.uuid4())
    await publisher.publish(group, b"garbage", packed(good))
    try:
        await until(lambda: len(received) == 1)
        await asyncio.sleep(0.2)
        assert [r.task_id for r in received] == [good]
        assert await publisher.depth(group) == 0
    finally:
        await queue.close()


async def test_a_group_without_a_queue_is_left_to_polling_and_the_others_go_on(
    broker: RabbitMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    publisher, received, changes = Publisher(broker.url), [], []
    present, missing = str(uuid.uuid4()), str(uuid.uuid4())
    await publisher.declare(present)
    queue, _ = await consumer(broker, received, changes)
    queue.follow(present)
    queue.follow(missing)
    try:
        await until(lambda: "no Globus Compute result queue for task group" in caplog.text)
        task_id = str(uuid.uuid4())
        await publisher.publish(present, packed(task_id))
        await until(lambda: len(received) == 1)
        assert queue.up
    finally:
        await queue.close()


async def test_a_queue_refused_again_and_again_is_given_up(
    broker: RabbitMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another consumer holds the queue exclusively: each attempt is refused (403), and after three
    the group is left to polling instead of being tried every second for ever."""
    publisher, received, changes = Publisher(broker.url), [], []
    group = str(uuid.uuid4())
    await publisher.declare(group)
    holder = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        holder.channel().basic_consume(PREFIX + group, lambda *_: None, exclusive=True)
        queue, _ = await consumer(broker, received, changes)
        queue.follow(group)
        try:
            await until(lambda: "its results are polled" in caplog.text)
            assert caplog.text.count("opening it again") == 2
            assert "ChannelClosedByBroker (403)" in caplog.text
            assert not queue.up
        finally:
            await queue.close()
    finally:
        holder.close()


async def test_the_queue_is_consumed_again_after_the_broker_restarts(
    rabbitmq_private: RabbitMQServer,
) -> None:
    """Results published while the broker was down are lost to the queue (the poll finds them);
    those published after it came back are delivered, on a connection opened with fresh details."""
    broker = rabbitmq_private
    publisher, received, changes = Publisher(broker.url), [], []
    group = str(uuid.uuid4())
    await publisher.declare(group)
    queue, asked = await consumer(broker, received, changes)
    queue.follow(group)
    try:
        await until(lambda: queue.up)
        await broker.stop()
        await until(lambda: not queue.up)
        await broker.start()
        await publisher.declare(group)
        await until(lambda: queue.up, seconds=30)
        task_id = str(uuid.uuid4())
        await publisher.publish(group, packed(task_id))
        await until(lambda: [r.task_id for r in received] == [task_id])
        assert changes == [True, False, True]
        assert len(asked) >= 2, "a new URL for each connection"
    finally:
        await queue.close()


async def test_an_unreachable_broker_is_retried_without_end(caplog: pytest.LogCaptureFixture) -> None:
    received: list[QueuedResult] = []
    changes: list[bool] = []

    async def details() -> tuple[str, str]:
        return "amqp://guest:secret-password@127.0.0.1:1/%2F", PREFIX

    queue = ResultQueue(details, received.append, changes.append)
    queue.follow(str(uuid.uuid4()))
    try:
        await until(lambda: "results are polled meanwhile" in caplog.text)
        assert not queue.up and changes == []
        assert "secret-password" not in caplog.text
    finally:
        await queue.close()


def test_early_results_are_bounded_in_count_size_and_age(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(compute_early.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(compute_early, "MAX_RESULTS", 3)
    monkeypatch.setattr(compute_early, "MAX_CHARS", 10)
    early = EarlyResults()
    for task_id in "abcd":
        early.keep(QueuedResult(task_id, "x", False))
    assert len(early) == 3 and early.take("a") is None, "the oldest left first"
    early.keep(QueuedResult("big", "y" * 9, False))
    assert early.take("b") is None and early.take("c") is None, "over 3 results, then 10 characters"
    assert early.take("big") == QueuedResult("big", "y" * 9, False)
    early.keep(QueuedResult("old", "z", False))
    now[0] += compute_early.KEEP_SECONDS
    early.keep(QueuedResult("new", "z", False))
    assert early.take("old") is None and early.take("d") is None, "aged out"
    assert early.take("new") is not None and len(early) == 0


async def test_closing_stops_the_queue_even_when_its_cancellation_is_lost() -> None:
    """Python 3.11's `asyncio.wait_for` loses a cancellation that arrives in the same turn of the
    event loop as the end of the call it waits for; the queue then went on retrying for ever, and
    closing it (the gateway's shutdown) never returned. Here the URL comes in that very turn."""
    answer: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
    asked = asyncio.Event()

    async def details() -> tuple[str, str]:
        asked.set()
        return await answer

    queue = ResultQueue(details, lambda _result: None, lambda _up: None)
    queue.follow(str(uuid.uuid4()))
    await asyncio.wait_for(asked.wait(), 5)
    answer.set_result(("amqp://guest:guest@127.0.0.1:1/%2F", PREFIX))
    closing = asyncio.ensure_future(queue.close())
    done, _ = await asyncio.wait({closing}, timeout=RETRY_FIRST_SECONDS + 5)
    assert closing in done, "closing returned"
    assert queue._runner is not None and queue._runner.done()
