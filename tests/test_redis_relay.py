"""The Redis transport of the stream relay, through a real redis-server, with the deployed defaults:
blocking reads that outlive their block time, bounded Redis streams, few connections for many
waiting streams, and a Redis that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio

from adaptors import StreamError
from proxy.core import callback_relay, callback_relay_redis
from proxy.core.callback_relay import Delivery, Event, RelayedStream, RelayFull, RelayUnavailable
from proxy.core.callback_relay_redis import (
    COMMAND_CONNECTIONS,
    COMMAND_TIMEOUT_SECONDS,
    READ_BLOCK_SECONDS,
    READ_COUNT,
    READ_MARGIN_SECONDS,
    READERS,
)
from proxy.core.state import STATE
from testing.services.redis_server import RedisServer
from tests.conftest import Server, start_gateway
from tests.test_relay import collect, post, relay_config, sse


async def test_a_stream_silent_longer_than_the_keepalive_completes(
    backend: Server, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """An HPC job silent for more than the deployed keep-alive (15 s, so more than redis-py's
    default socket timeout of 5 s) still reaches its client once it speaks."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_url))
    try:
        stream = await gateway.app[STATE].relay.open()
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


@pytest.mark.alone("2,000 streams at once: a CPU load of its own")
async def test_two_thousand_waiting_streams_share_a_few_connections(
    backend: Server, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Streams waiting for HPC jobs are read through the process's few reader connections, not one
    blocking connection each; every one of them still gets its chunks."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_server.url))
    observer = redis.asyncio.Redis.from_url(redis_server.url)
    relay = gateway.app[STATE].relay
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
            chunks = [chunk for chunk in received if not chunk.startswith(b":")]
            assert error is None and chunks == [f"data: {number}\n\n".encode()]
    finally:
        await observer.aclose()
        await runner.cleanup()


@pytest.mark.alone(
    "the posts counted when Redis holds 1,000 must be all that get in: under load one is counted late"
)
async def test_a_stream_whose_client_stops_reading_stays_bounded_in_redis(
    backend: Server, tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """2,500 posts to a stream whose client pauses: Redis holds at most `max_queued_chunks` (1,000 by
    default) of them, the function's callbacks wait, and everything arrives once the client reads."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_server.url))
    observer = redis.asyncio.Redis.from_url(redis_server.url)
    tasks: list[asyncio.Task[None]] = []
    try:
        stream = await gateway.app[STATE].relay.open()
        events_key = f"gateway:relay:{stream.stream_id}:events"
        chunks = stream.events()
        posted = 0
        received: list[bytes] = []

        async def function() -> None:
            nonlocal posted
            body = {"task_id": stream.stream_id}
            for number in range(2500):
                data = {**body, "data": sse(f"{number:04d}" + "x" * 500)}
                status, answer = await post(http, gateway, "data", data, stream.token)
                assert status == 200, (number, status, answer)
                posted += 1
            status, answer = await post(http, gateway, "done", {**body, "data_posts": 2500}, stream.token)
            assert status == 200, ("done", status, answer)

        async def read_the_rest() -> None:
            async for chunk in chunks:  # posts that waited together arrive as one chunk
                if not chunk.startswith(b":"):
                    received.extend(event[:10] for event in chunk.split(b"\n\n") if event)
                    assert await observer.xlen(events_key) <= 1000

        sender = asyncio.create_task(function(), name="the function's posts")
        tasks.append(sender)
        first = await asyncio.wait_for(anext(chunks), 10)
        assert first.startswith(b"data: 0000")
        deadline = time.monotonic() + 30
        while await observer.xlen(events_key) < 1000 and time.monotonic() < deadline and not sender.done():
            await asyncio.sleep(0.1)
        held = posted
        await asyncio.sleep(1.5)
        assert not sender.done(), sender.exception()
        assert posted == held < 1000 + 2 * READ_COUNT  # the callbacks wait for the client
        assert await observer.xlen(events_key) == 1000
        received.extend(event[:10] for event in first.split(b"\n\n") if event)
        reading = asyncio.create_task(read_the_rest(), name="the client's reads")
        tasks.append(reading)
        finished, _ = await asyncio.wait({sender, reading}, timeout=60, return_when=asyncio.FIRST_EXCEPTION)
        for task in (sender, reading):  # a refused post, or a failed read, says why
            assert task in finished, f"{task.get_name()} still waiting after 60 s; {posted} posted"
            task.result()
        assert received == [f"data: {number:04d}".encode() for number in range(2500)]
    finally:
        for task in tasks:
            task.cancel()
        await observer.aclose()
        await runner.cleanup()


class SilencingProxy:
    """A TCP relay to the real redis-server that can fall silent: it then keeps accepting connections
    and reading what clients send, and never answers (a Redis host that hangs, or a black-holed
    network)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.silent:
                while await reader.read(65536):
                    pass
                return
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(upstream_writer)
            await asyncio.gather(self._pump(reader, upstream_writer), self._pump(upstream_reader, writer))
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.silent:
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.mark.alone("streams must end within 1 to 1.5 s of the deployed read and command timeouts")
async def test_a_redis_that_stops_answering_ends_the_waiting_streams_within_seconds(
    backend: Server, tmp_path: Path, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """Waiting streams end with a clear error once their reads outlast the block time by the margin;
    new streams and callbacks are refused with a 503 after the command timeout."""
    proxy = SilencingProxy(redis_server.port)
    async with proxy as url:
        runner, gateway = await start_gateway(relay_config(tmp_path, backend, url))
        relay = gateway.app[STATE].relay
        try:
            streams = [await relay.open() for _ in range(20)]
            clients = [asyncio.ensure_future(collect(stream)) for stream in streams]
            await asyncio.sleep(1)
            assert not any(client.done() for client in clients)
            proxy.silent = True
            silenced = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*clients), 30)
            assert time.monotonic() - silenced < READ_BLOCK_SECONDS + READ_MARGIN_SECONDS + 1
            for received, error in results:
                assert error is not None and error.code == 503
                assert "stream relay is unavailable" in error.message
                assert received == [] or set(received) == {b": waiting for the model\n\n"}

            started = time.monotonic()
            body = {"task_id": streams[0].stream_id, "data": sse("x")}
            status, answer = await asyncio.wait_for(post(http, gateway, "data", body, streams[0].token), 30)
            assert (status, answer["error"]["code"]) == (503, "relay_unavailable")
            assert time.monotonic() - started < COMMAND_TIMEOUT_SECONDS + 1.5
            started = time.monotonic()
            with pytest.raises(RelayUnavailable):
                await relay.open()
            assert time.monotonic() - started < COMMAND_TIMEOUT_SECONDS + 1.5
        finally:
            await runner.cleanup()


@pytest.mark.alone("how many posts get in before the 410, and when, depends on how fast the reader drains")
async def test_a_stream_full_for_too_long_is_ended(
    backend: Server,
    tmp_path: Path,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that never reads again (its process died, or it hangs) does not hold the function's
    callbacks for ever: past the back-pressure limit the stream ends, and callbacks answer 410."""
    monkeypatch.setattr(callback_relay_redis, "BACKPRESSURE_LIMIT_SECONDS", 1.0)
    runner, gateway = await start_gateway(
        relay_config(tmp_path, backend, redis_server.url, max_queued_chunks=5)
    )
    try:
        stream = await gateway.app[STATE].relay.open()
        chunks = stream.events()
        body = {"task_id": stream.stream_id, "data": sse("x")}
        assert (await post(http, gateway, "data", body, stream.token))[0] == 200
        assert await asyncio.wait_for(anext(chunks), 10) == b"data: x\n\n"
        statuses = []
        started = time.monotonic()
        while not statuses or statuses[-1] == 200:
            statuses.append((await post(http, gateway, "data", body, stream.token))[0])
        assert statuses[-1] == 410 and len(statuses) <= 5 + 2 * READ_COUNT + 1
        assert 1.0 <= time.monotonic() - started < 5
        with pytest.raises(StreamError, match="stopped reading") as ended:
            async for _ in chunks:
                pass
        assert ended.value.code == 504
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("transport", ["local", "redis"])
async def test_a_process_relays_at_most_max_streams(
    backend: Server,
    tmp_path: Path,
    redis_server: RedisServer,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streams opened and never read (the request failed in between) stop counting once they have
    outlived any client's stream."""
    monkeypatch.setattr(callback_relay, "ABANDONED_GRACE_SECONDS", 0.5)
    redis_url = redis_server.url if transport == "redis" else None
    config = relay_config(tmp_path, backend, redis_url, max_streams=3, total_timeout_seconds=1)
    runner, gateway = await start_gateway(config)
    relay = gateway.app[STATE].relay
    try:
        streams = [await relay.open() for _ in range(3)]
        with pytest.raises(RelayFull) as refused:
            await relay.open()
        assert (refused.value.status, refused.value.code) == (503, "relay_full")
        assert refused.value.headers["Retry-After"].isdigit()
        await relay.deliver(streams[0].stream_id, streams[0].token, Event("done"))
        assert await collect(streams[0]) == ([], None)
        await relay.open()
        with pytest.raises(RelayFull):
            await relay.open()
        await asyncio.sleep(1.6)
        await relay.open()
    finally:
        await runner.cleanup()
