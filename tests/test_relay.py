"""The callback relay: remote functions POST chunks, the waiting client gets them in order.

Runs against both relays: in-process, and through a real Redis where the callback may land on
another gateway than the one holding the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from adaptors import StreamError
from proxy.core import callback_relay
from proxy.core.callback_relay import Delivery, Event, LocalRelay, RelayedStream
from proxy.core.state import STATE
from proxy.settings.streaming import StreamingSettings
from tests.conftest import Server, start_gateway, write_gateway_config

SECRET = "relay-secret-0123456789"


def relay_config(directory: Path, backend: Server, redis_url: str | None, **streaming: Any) -> Path:
    path = write_gateway_config(directory, backend.url)
    document = yaml.safe_load(path.read_text())
    document["streaming"] = {"internal_secret": SECRET, "callback_url": "http://127.0.0.1:1", **streaming}
    if redis_url:
        document["redis_url"] = redis_url
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(params=["local", "redis"])
async def gateways(
    request: pytest.FixtureRequest, backend: Server, tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[Server, Server]]:
    """(the gateway holding the client, the gateway receiving callbacks): one and the same without Redis."""
    shared = redis_url if request.param == "redis" else None
    runners, servers = [], []
    for name in ("a", "b") if shared else ("a",):
        (tmp_path / name).mkdir()
        runner, server = await start_gateway(
            relay_config(tmp_path / name, backend, shared, keepalive_seconds=0.2)
        )
        runners.append(runner)
        servers.append(server)
    yield servers[0], servers[-1]
    for runner in runners:
        await runner.cleanup()


async def post(
    http: aiohttp.ClientSession,
    gateway: Server,
    kind: str,
    body: dict[str, Any],
    token: str,
    secret: str = SECRET,
) -> tuple[int, Any]:
    headers = {"X-Internal-Secret": secret, "X-Stream-Task-Token": token}
    async with http.post(f"{gateway.url}/api/streaming/{kind}/", json=body, headers=headers) as response:
        return response.status, await response.json()


async def collect(stream: RelayedStream) -> tuple[list[bytes], StreamError | None]:
    received: list[bytes] = []
    try:
        async for chunk in stream.events():
            received.append(chunk)
    except StreamError as error:
        return received, error
    return received, None


def sse(*payloads: str) -> str:
    return "\n".join(f"data: {payload}" for payload in payloads)


async def test_chunks_arrive_in_order_and_done_ends_the_stream(
    gateways: tuple[Server, Server], http: aiohttp.ClientSession
) -> None:
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    client = asyncio.ensure_future(collect(stream))
    body = {"task_id": stream.stream_id, "type": "data"}
    assert (await post(http, receiver, "data", {**body, "data": sse('{"n": 1}', '{"n": 2}')}, stream.token))[
        0
    ] == 200
    assert (await post(http, receiver, "data", {**body, "data": sse('{"n": 3}') + "\n\n"}, stream.token))[
        0
    ] == 200
    assert (await post(http, receiver, "data", {**body, "data": sse("[DONE]")}, stream.token))[0] == 200
    status, answer = await post(
        http, receiver, "done", {"task_id": stream.stream_id, "type": "done"}, stream.token
    )
    assert (status, answer["status"]) == (200, "received")
    received, error = await asyncio.wait_for(client, 5)
    assert error is None
    text = b"".join(chunk for chunk in received if not chunk.startswith(b":")).decode()
    assert text == 'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: {"n": 3}\n\ndata: [DONE]\n\n'
    status, answer = await post(http, receiver, "data", {**body, "data": sse("late")}, stream.token)
    assert status == 410 and answer["error"]["code"] == "stream_gone"
    assert b"gateway_relay_chunks_total 3.0" in receiver.app[STATE].metrics.exposition()


async def test_keepalives_while_waiting_for_the_first_chunk(
    gateways: tuple[Server, Server], http: aiohttp.ClientSession
) -> None:
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    events = stream.events()
    assert await asyncio.wait_for(anext(events), 2) == b": waiting for the model\n\n"
    await post(http, receiver, "data", {"task_id": stream.stream_id, "data": sse("x")}, stream.token)
    assert await asyncio.wait_for(anext(events), 2) == b"data: x\n\n"
    assert await asyncio.wait_for(anext(events), 2) == b": keep-alive\n\n"
    await events.aclose()


async def test_error_callback_ends_with_the_backends_status(
    gateways: tuple[Server, Server], http: aiohttp.ClientSession
) -> None:
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    client = asyncio.ensure_future(collect(stream))
    await post(http, receiver, "data", {"task_id": stream.stream_id, "data": sse("a")}, stream.token)
    vllm = json.dumps(
        {"object": "error", "message": "This model's maximum context length is 8192", "code": 400}
    )
    text = f"API request failed with status code: 400\nResponse text: {vllm}"
    assert (await post(http, receiver, "error", {"task_id": stream.stream_id, "error": text}, stream.token))[
        0
    ] == 200
    received, error = await asyncio.wait_for(client, 5)
    assert error is not None and error.code == 400 and "maximum context length" in error.message
    assert b"data: a\n\n" in received


async def test_done_that_overtakes_data_waits_for_it(
    gateways: tuple[Server, Server], http: aiohttp.ClientSession
) -> None:
    """Our function says how many data posts it made; a done arriving first still ends after them."""
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    client = asyncio.ensure_future(collect(stream))
    done = asyncio.ensure_future(
        post(http, receiver, "done", {"task_id": stream.stream_id, "data_posts": 2}, stream.token)
    )
    await asyncio.sleep(0.1)
    for payload in ("one", "two"):
        await post(http, receiver, "data", {"task_id": stream.stream_id, "data": sse(payload)}, stream.token)
    assert (await done)[0] == 200
    received, error = await asyncio.wait_for(client, 5)
    assert error is None
    assert [chunk for chunk in received if not chunk.startswith(b":")] == [b"data: one\n\n", b"data: two\n\n"]


async def test_client_gone_makes_callbacks_answer_410(
    gateways: tuple[Server, Server], http: aiohttp.ClientSession
) -> None:
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    events = stream.events()
    await post(http, receiver, "data", {"task_id": stream.stream_id, "data": sse("a")}, stream.token)
    assert await anext(events) == b"data: a\n\n"
    await events.aclose()
    status, answer = await post(
        http, receiver, "data", {"task_id": stream.stream_id, "data": sse("b")}, stream.token
    )
    assert status == 410 and "stop sending" in answer["error"]["message"]


@pytest.mark.parametrize(
    "change, status, code",
    [
        ({"secret": "wrong-secret-0123456789"}, 401, "invalid_secret"),
        ({"secret": ""}, 401, "invalid_secret"),
        ({"token": ""}, 401, "invalid_stream_token"),
        ({"token": "forged"}, 403, "stream_bad_token"),
        ({"task_id": "00000000-0000-4000-8000-000000000000"}, 404, "stream_unknown"),
        ({"body": {"data": "x"}}, 400, None),
        ({"body": {"task_id": 7, "data": "x"}}, 400, None),
        ({"body": {"task_id": "ID", "data": 7}}, 400, None),
        ({"body": {"task_id": "ID", "data": "data: \ud800"}}, 400, None),
        ({"body": {"task_id": "ID", "data": "x" * 150_001}}, 413, "request_too_large"),
    ],
)
async def test_bad_callbacks_are_refused(
    gateways: tuple[Server, Server],
    http: aiohttp.ClientSession,
    change: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    body = change.get("body", {"task_id": change.get("task_id", stream.stream_id), "data": sse("x")})
    if body.get("task_id") == "ID":
        body["task_id"] = stream.stream_id
    got, answer = await post(
        http, receiver, "data", body, change.get("token", stream.token), change.get("secret", SECRET)
    )
    assert got == status
    if code:
        assert answer["error"]["code"] == code
    assert set(answer["error"]) == {"message", "type", "param", "code"}


async def test_control_callbacks_are_capped_smaller(
    gateways: tuple[Server, Server], http: aiohttp.ClientSession
) -> None:
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    body = {"task_id": stream.stream_id, "error": "x" * 15_001}
    assert (await post(http, receiver, "error", body, stream.token))[0] == 413


async def test_callbacks_need_no_bearer_token_but_are_refused_without_a_secret(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = relay_config(tmp_path, backend, None)
    document = yaml.safe_load(config.read_text())
    del document["streaming"]["internal_secret"]
    config.write_text(yaml.safe_dump(document))
    runner, gateway = await start_gateway(config)
    try:
        status, answer = await post(http, gateway, "done", {"task_id": "x"}, "token")
        assert status == 503 and answer["error"]["code"] == "not_configured"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "limits, fragment",
    [
        ({"first_chunk_timeout_seconds": 0.3}, "sent nothing within 0.3 seconds"),
        ({"silence_timeout_seconds": 0.3}, "sent nothing for 0.3 seconds"),
        ({"total_timeout_seconds": 0.5}, "limit of 0.5 seconds"),
    ],
)
async def test_limits_end_the_stream_with_an_error(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, limits: dict[str, float], fragment: str
) -> None:
    runner, gateway = await start_gateway(
        relay_config(tmp_path, backend, None, keepalive_seconds=0.1, **limits)
    )
    try:
        stream = await gateway.app[STATE].relay.open()
        client = asyncio.ensure_future(collect(stream))
        if "first_chunk_timeout_seconds" not in limits:
            for _ in range(3):
                await post(
                    http, gateway, "data", {"task_id": stream.stream_id, "data": sse("x")}, stream.token
                )
                await asyncio.sleep(0.1)
        _, error = await asyncio.wait_for(client, 5)
        assert error is not None and error.code == 504 and fragment in error.message
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "secret, token, fragment",
    [
        ("wrong-secret-0123456789", None, "check INTERNAL_STREAMING_SECRET"),
        (SECRET, "forged", "stream token"),
    ],
)
async def test_a_refused_callback_ends_its_stream_with_the_reason(
    gateways: tuple[Server, Server],
    http: aiohttp.ClientSession,
    secret: str,
    token: str | None,
    fragment: str,
) -> None:
    """Every later callback would be refused too: the client learns why now, not at a time limit."""
    holder, receiver = gateways
    stream = await holder.app[STATE].relay.open()
    client = asyncio.ensure_future(collect(stream))
    body = {"task_id": stream.stream_id, "data": sse("x")}
    assert (await post(http, receiver, "data", body, token or stream.token, secret))[0] in (401, 403)
    received, error = await asyncio.wait_for(client, 5)
    assert error is not None and error.code == 502
    assert "callbacks were refused" in error.message and fragment in error.message
    assert [chunk for chunk in received if not chunk.startswith(b":")] == []


async def test_ended_streams_are_remembered_for_a_while_and_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Late callbacks for ended streams get 410 while remembered (then 404); the memory forgets the
    oldest first, by age and beyond its bound, without copying the rest at each release."""
    monkeypatch.setattr(callback_relay, "MAX_GONE_REMEMBERED", 3)
    relay = LocalRelay(StreamingSettings(gone_memory_seconds=60))
    streams = [await relay.open() for _ in range(5)]
    for stream in streams:
        await relay._release(stream.stream_id, finished=False)
    answers = [await relay.deliver(s.stream_id, s.token, Event("data", b"x")) for s in streams]
    assert answers == [Delivery.UNKNOWN] * 2 + [Delivery.GONE] * 3

    now = time.monotonic()
    relay._forget_gone(now + 59)
    assert len(relay._gone) == 3
    relay._forget_gone(now + 61)
    assert relay._gone == {}


async def test_chunks_that_waited_together_leave_as_one_in_order() -> None:
    """One write to the client for what arrived while it was busy, the end still after it."""
    relay = LocalRelay(StreamingSettings())
    stream = await relay.open()
    for number in range(3):
        event = Event("data", f"data: {number}\n\n".encode())
        assert await relay.deliver(stream.stream_id, stream.token, event) is Delivery.ACCEPTED
    assert await relay.deliver(stream.stream_id, stream.token, Event("error", b"broke", 502))
    received, error = await collect(stream)
    assert received == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n"]
    assert error is not None and (error.message, error.code) == ("broke", 502)


async def test_a_full_local_stream_makes_callbacks_wait_in_order() -> None:
    """At `max_queued_chunks` waiting, a callback waits for the client to read; one that gives up
    waiting passes its turn on, and nothing is lost or reordered."""
    relay = LocalRelay(StreamingSettings(max_queued_chunks=2))
    stream = await relay.open()

    def deliver(number: int) -> asyncio.Future[Delivery]:
        event = Event("data", f"data: {number}\n\n".encode())
        return asyncio.ensure_future(relay.deliver(stream.stream_id, stream.token, event))

    posts = [deliver(number) for number in range(5)]
    await asyncio.sleep(0.05)
    assert [post.done() for post in posts] == [True, True, False, False, False]
    posts[2].cancel()
    events = stream.events()
    assert await anext(events) == b"data: 0\n\ndata: 1\n\n"
    await asyncio.sleep(0.05)
    assert [post.done() for post in posts[3:]] == [True, True]
    assert await anext(events) == b"data: 3\n\ndata: 4\n\n"
    assert await relay.deliver(stream.stream_id, stream.token, Event("done")) is Delivery.ACCEPTED
    assert [chunk async for chunk in events] == []
