"""The Redis transport of the stream relay, through a real redis-server, with the deployed defaults:
blocking reads that outlive their block time, bounded Redis streams, few connections for many
waiting streams, and a Redis that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import redis.asyncio

from proxy.callbacks import RELAY
from proxy.redis_relay import COMMAND_CONNECTIONS, READ_COUNT, READERS
from proxy.relay import Delivery, Event, RelayedStream
from tests.conftest import Server, start_gateway
from tests.redis_server import RedisServer
from tests.test_relay import collect, post, relay_config, sse


async def test_a_stream_silent_longer_than_the_keepalive_completes(
    backend: Server, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """An HPC job silent for more than the deployed keep-alive (15 s, so more than redis-py's
    default socket timeout of 5 s) still reaches its client once it speaks."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_url))
    try:
        stream = await gateway.app[RELAY].open()
        client = asyncio.ensure_future(collect(stream))
        started = time.monotonic()
        await asyncio.sleep(16.5)
        assert not client.done(), client.result()
        body = {"task_id": stream.stream_id}
        assert (await post(http, gateway, "data", {**body, "data": sse("late")}, stream.token))[0] == 200
        assert (await post(http, gateway, "done", body, stream.token))[0] == 200
        received, error = await asyncio.wait_for(client, 10)
        assert error is None
        assert received[-1] == b"data: late\n\n"
        assert received[0] == b": waiting for the model\n\n"
        assert time.monotonic() - started > 16
    finally:
        await runner.cleanup()


async def test_two_thousand_waiting_streams_share_a_few_connections(
    backend: Server, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Streams waiting for HPC jobs are read through the process's few reader connections, not one
    blocking connection each; every one of them still gets its chunks."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_server.url))
    observer = redis.asyncio.Redis.from_url(redis_server.url)
    relay = gateway.app[RELAY]
    try:
        streams = [await relay.open() for _ in range(2000)]
        clients = [asyncio.ensure_future(collect(stream)) for stream in streams]
        await asyncio.sleep(1.5)  # every stream is waiting on a read
        assert not any(client.done() for client in clients)
        clients_listed = await observer.client_list()
        info = await observer.info("clients")
        assert info["connected_clients"] == len(clients_listed)
        assert len(clients_listed) - 1 <= READERS + COMMAND_CONNECTIONS  # less the observer
        semaphore = asyncio.Semaphore(64)

        async def finish(number: int, stream: RelayedStream) -> None:
            async with semaphore:
                chunk = Event("data", f"data: {number}\n\n".encode())
                assert await relay.deliver(stream.stream_id, stream.token, chunk) == Delivery.ACCEPTED
                assert await relay.deliver(stream.stream_id, stream.token, Event("done")) == Delivery.ACCEPTED

        await asyncio.gather(*(finish(number, stream) for number, stream in enumerate(streams)))
        results = await asyncio.wait_for(asyncio.gather(*clients), 30)
        for number, (received, error) in enumerate(results):
            assert error is None and received == [f"data: {number}\n\n".encode()]
    finally:
        await observer.aclose()
        await runner.cleanup()


async def test_a_stream_whose_client_stops_reading_stays_bounded_in_redis(
    backend: Server, tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """2,500 posts to a stream whose client pauses: Redis holds at most `max_queued_chunks` (1,000 by
    default) of them, the function's callbacks wait, and everything arrives once the client reads."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_server.url))
    observer = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        stream = await gateway.app[RELAY].open()
        events_key = f"gateway:relay:{stream.stream_id}:events"
        chunks = stream.events()
        posted = 0

        async def function() -> None:
            nonlocal posted
            body = {"task_id": stream.stream_id}
            for number in range(2500):
                data = {**body, "data": sse(f"{number:04d}" + "x" * 500)}
                assert (await post(http, gateway, "data", data, stream.token))[0] == 200
                posted += 1
            assert (await post(http, gateway, "done", {**body, "data_posts": 2500}, stream.token))[0] == 200

        sender = asyncio.ensure_future(function())
        assert (await asyncio.wait_for(anext(chunks), 10)).startswith(b"data: 0000")
        deadline = time.monotonic() + 30
        while await observer.xlen(events_key) < 1000 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        held = posted
        await asyncio.sleep(1.5)
        assert posted == held < 1000 + 2 * READ_COUNT  # the callbacks wait for the client
        assert await observer.xlen(events_key) == 1000
        received = [b"data: 0000"]
        async for chunk in chunks:
            if not chunk.startswith(b":"):
                received.append(chunk[:10])
                assert await observer.xlen(events_key) <= 1000
        await asyncio.wait_for(sender, 10)
        assert received == [f"data: {number:04d}".encode() for number in range(2500)]
    finally:
        await observer.aclose()
        await runner.cleanup()
