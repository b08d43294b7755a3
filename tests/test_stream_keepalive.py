"""A direct-API stream whose backend is slow to answer: the client gets the headers and SSE comments
while it waits, as Globus Compute streams do, instead of nothing until the first chunk. The last
tests drive `write_stream`'s keep-alive on a real server with scripted adaptor streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from adaptors import StreamError
from proxy.core.state import STATE
from proxy.core.streaming import WAITING, write_stream
from proxy.errors import ApiError
from testing.fake_vllm import ACTIVE_STREAMS, DISCONNECTS
from tests.conftest import CHAT_MODEL, TOKENS, Server, auth, chat, start_gateway, write_gateway_config
from tests.support import start, value


@pytest.fixture
async def quick_keepalives(backend: Server, tmp_path: Path) -> AsyncIterator[Server]:
    """The chat endpoint sends its comments every 0.2 s instead of 15 s."""
    path = write_gateway_config(tmp_path, backend.url)
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    endpoints[0]["config"]["keepalive_seconds"] = 0.2
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    runner, server = await start_gateway(path)
    yield server
    await runner.cleanup()


def chat_url(gateway: Server) -> str:
    return f"{gateway.url}/local/vllm/v1/chat/completions"


async def test_headers_and_a_comment_arrive_while_the_backend_waits(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    """With the defaults as deployed: the first comment after 15 s of silence."""
    started = time.monotonic()
    body = chat("[[delay=17]][[chunks=2]]", stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        headed = time.monotonic() - started
        assert response.status == 200 and response.content_type == "text/event-stream"
        assert await response.content.readuntil(b"\n\n") == WAITING
        commented = time.monotonic() - started
        rest = await response.content.read()
    assert 14.5 < headed < 16.5 and commented < 16.5, "headers and a comment, long before the first chunk"
    assert rest.startswith(b"data: {") and rest.rstrip().endswith(b"data: [DONE]")


@pytest.mark.alone("three to six keep-alive comments in the second before the first chunk")
async def test_comments_repeat_and_clients_ignore_them(
    quick_keepalives: Server, http: aiohttp.ClientSession
) -> None:
    body = chat("[[delay=1]][[chunks=3]]", stream=True)
    async with http.post(chat_url(quick_keepalives), json=body, headers=auth()) as response:
        events = (await response.read()).split(b"\n\n")
    kinds = [event[:5] for event in events if event]
    first_data = kinds.index(b"data:")
    assert 3 <= first_data <= 6 and set(kinds[:first_data]) == {WAITING[:5]}
    exposition = quick_keepalives.app[STATE].metrics.exposition().decode()
    assert value(exposition, "gateway_stream_first_chunk_seconds_sum") >= 0.9, "the first data, not a comment"
    async with openai.AsyncOpenAI(
        base_url=f"{quick_keepalives.url}/local/vllm/v1", api_key=TOKENS["alice"], max_retries=0
    ) as api:
        stream = await api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "[[delay=0.7]][[chunks=3]]"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text


async def test_a_quick_refusal_is_still_a_plain_status_and_a_late_one_an_event(
    quick_keepalives: Server, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        chat_url(quick_keepalives), json=chat("[[status=400]]", stream=True), headers=auth()
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["message"] == "fake backend error 400"
    async with http.post(
        chat_url(quick_keepalives), json=chat("[[delay=0.5]][[status=400]]", stream=True), headers=auth()
    ) as response:
        assert response.status == 200
        body = await response.read()
    assert body.startswith(WAITING)
    last = json.loads(body.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
    assert last["error"]["message"] == "fake backend error 400"


async def test_a_client_leaving_while_the_backend_waits_ends_the_request(
    quick_keepalives: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    response = await http.post(
        chat_url(quick_keepalives), json=chat("[[delay=30]]", stream=True), headers=auth()
    )
    assert await response.content.readuntil(b"\n\n") == WAITING
    response.close()
    deadline = time.monotonic() + 5
    while backend.app[ACTIVE_STREAMS] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert backend.app[ACTIVE_STREAMS] == 0 and backend.app[DISCONNECTS] == 1, (
        "the backend request was dropped"
    )


Source = Callable[[], AsyncIterator[bytes]]


@contextlib.asynccontextmanager
async def writing(source: Source, every: float) -> AsyncIterator[str]:
    """A real server whose one route writes `source()` with `write_stream`, keep-alives every
    `every` seconds; a failure before the first byte is the route's 502 with its message."""

    async def route(request: web.Request) -> web.StreamResponse:
        try:
            return (await write_stream(request, source(), keepalive_seconds=every)).response
        except ApiError as exc:
            return web.json_response({"message": exc.message}, status=exc.status)

    app = web.Application()
    app.router.add_get("/stream", route)
    runner, url = await start(app)
    try:
        yield f"{url}/stream"
    finally:
        await runner.cleanup()


def events(body: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


async def test_comments_until_the_first_output_and_none_after(http: aiohttp.ClientSession) -> None:
    """The source speaks only once the client has read three comments, then keeps quiet for more
    than three periods: a machine too busy can only make comments fewer, never fail this."""
    three_read = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        await asyncio.wait_for(three_read.wait(), 10)
        yield b"data: 1\n\n"
        await asyncio.sleep(0.35)
        yield b"data: 2\n\n"

    async with writing(source, 0.1) as url, http.get(url) as response:
        for _ in range(3):
            assert await response.content.readuntil(b"\n\n") == WAITING
        three_read.set()
        items = events(await response.read())
    first = items.index(b"data: 1\n\n")  # a fourth comment may have left before the source woke
    assert set(items[:first]) <= {WAITING}
    assert items[first:] == [b"data: 1\n\n", b"data: 2\n\n"], "no comment once the model has spoken"


async def test_the_adaptors_own_comments_are_written_and_put_the_next_keepalive_off(
    http: aiohttp.ClientSession,
) -> None:
    async def source() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b": starting\n\n"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)
        yield b"data: 1\n\n"

    async with writing(source, 0.5) as url, http.get(url) as response:
        items = events(await response.read())
    assert items[:4] == [b": starting\n\n"] * 4, "no keep-alive while the adaptor writes its own"
    assert 1 <= items.count(WAITING) <= 3 and items[-1] == b"data: 1\n\n"


async def test_a_failure_before_any_byte_is_a_status_and_after_a_comment_an_event(
    http: aiohttp.ClientSession,
) -> None:
    def refusing(delay: float) -> Source:
        async def source() -> AsyncIterator[bytes]:
            await asyncio.sleep(delay)
            raise StreamError("the backend refused", 400)
            yield b"never"

        return source

    async with writing(refusing(0.05), 0.2) as url, http.get(url) as response:
        assert response.status == 400 and (await response.json())["message"] == "the backend refused"
    async with writing(refusing(0.3), 0.2) as url, http.get(url) as response:
        assert response.status == 200
        items = events(await response.read())
    assert items[0] == WAITING
    assert json.loads(items[-1].removeprefix(b"data: "))["error"]["message"] == "the backend refused"


async def test_an_empty_stream_ends_with_its_comments(http: aiohttp.ClientSession) -> None:
    async def empty() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.25)
        return
        yield b"never"

    async with writing(empty, 0.1) as url, http.get(url) as response:
        assert response.status == 200 and set(events(await response.read())) == {WAITING}


async def test_a_client_leaving_while_it_waits_closes_the_source(http: aiohttp.ClientSession) -> None:
    cancelled: list[bool] = []

    async def silent() -> AsyncIterator[bytes]:
        try:
            await asyncio.sleep(30)
            yield b"late"
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async with writing(silent, 0.05) as url:
        response = await http.get(url)
        assert await response.content.readuntil(b"\n\n") == WAITING
        response.close()
        deadline = time.monotonic() + 5
        while not cancelled and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert cancelled == [True]
