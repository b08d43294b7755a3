"""The RabbitMQ helper gives a real broker that can go away and come back on the same URL, with its
durable queues and persistent messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pika
import pika.exceptions
import pytest

from testing.services import rabbitmq_server
from testing.services.rabbitmq_server import RabbitMQServer


def publish(url: str, queue: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def take(url: str, queue: str) -> bytes | None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        _method, _properties, body = connection.channel().basic_get(queue, auto_ack=True)
        return body  # type: ignore[no-any-return]
    finally:
        connection.close()


async def test_publish_stop_restart_keeps_durable_messages(rabbitmq_private: RabbitMQServer) -> None:
    url = rabbitmq_private.url
    assert url.startswith("amqp://guest:guest@127.0.0.1:") and url.endswith("/%2F")
    await asyncio.to_thread(publish, url, "kept", b"one")

    await rabbitmq_private.stop()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        await asyncio.to_thread(pika.BlockingConnection, pika.URLParameters(url))
    await rabbitmq_private.restart()

    assert rabbitmq_private.url == url
    assert await asyncio.to_thread(take, url, "kept") == b"one"
    assert await asyncio.to_thread(take, url, "kept") is None


async def test_two_brokers_run_side_by_side(rabbitmq: RabbitMQServer, tmp_path: Path) -> None:
    """Each node has a name of its own: a second one on the machine (another worker's) starts too."""
    async with RabbitMQServer(tmp_path) as other:
        assert other.node_name != rabbitmq.node_name and other.port != rabbitmq.port
        await asyncio.to_thread(publish, other.url, "mine", b"two")
        assert await asyncio.to_thread(take, other.url, "mine") == b"two"
    assert not other.running


def test_the_node_runs_in_its_directory(rabbitmq: RabbitMQServer) -> None:
    """Files the node writes where it runs (Mnesia's core file, when killed mid-write) land beside its
    data, not in the checkout the tests were started from."""
    assert rabbitmq.process is not None
    assert Path(f"/proc/{rabbitmq.process.pid}/cwd").resolve() == rabbitmq.directory.resolve()


def test_a_missing_broker_fails_with_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(rabbitmq_server, "SERVER", tmp_path / "rabbitmq-server")
    with pytest.raises(pytest.fail.Exception) as failed:
        RabbitMQServer(tmp_path).command(5672)
    assert "apt-get install -y --no-install-recommends rabbitmq-server" in str(failed.value)
