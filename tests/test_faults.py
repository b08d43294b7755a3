"""Faults around the gateway, on real processes and sockets: a backend killed mid-stream, one that
accepts connections and never answers, one that answers bytes that are not HTTP or events that are
not SSE, and Redis going away and coming back.

Each fault costs only the request it hits: that request gets an OpenAI-shaped error (an error event
once its stream has started), the gateway keeps serving, and the request's record is still written.
Faults tested elsewhere are not repeated here (refused connections, headers later than the timeout,
Globus outages, database outages: see the test modules of the direct-API adaptor, Globus Auth, the
request log and the database).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.services.redis_server import RedisServer
from tests.compute_setup import SECRET, compute_config
from tests.conftest import Server, auth, chat, endpoint, free_port, start, start_gateway
from tests.processes import backend_process
from tests.support import write_gateway_config, write_yaml
from tests.test_routes import assert_openai_error, call

TIMEOUT = 0.5
"""The faulty endpoints' `api_request_timeout`."""


def chat_url(gateway: Server) -> str:
    return f"{gateway.url}/local/vllm/v1/chat/completions"


def with_id(request_id: str) -> dict[str, str]:
    return {**auth(), "X-Request-ID": request_id}


async def start_faulty_gateway(
    tmp_path: Path, backend: Server, faulty: dict[str, str], timeout: float = TIMEOUT
) -> tuple[web.AppRunner, Server]:
    """The test configuration plus one endpoint per faulty backend (model → its base URL); records
    go to the default SQLite file next to the configuration."""
    config = write_gateway_config(tmp_path, backend.url)
    entries = yaml_list(tmp_path / "endpoints.yaml")
    entries += [
        endpoint("local", model, url, config={"api_request_timeout": timeout})
        for model, url in faulty.items()
    ]
    write_yaml(tmp_path / "endpoints.yaml", entries)
    return await start_gateway(config)


def yaml_list(path: Path) -> list[Any]:
    document: list[Any] = yaml.safe_load(path.read_text())
    return document


async def stored(database: Path, request_ids: Collection[str], timeout: float = 10) -> dict[str, Any]:
    """The records of these requests, once the gateway's sink has written them (it flushes every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = read_records(database, request_ids)
        if len(rows) == len(request_ids) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


def read_records(database: Path, request_ids: Collection[str]) -> dict[str, Any]:
    if not database.exists():
        return {}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        connection.row_factory = sqlite3.Row
        marks = ", ".join("?" * len(request_ids))
        query = f"SELECT * FROM requests WHERE request_id IN ({marks})"
        try:
            rows = connection.execute(query, list(request_ids)).fetchall()
        except sqlite3.OperationalError:  # the table is created by the gateway's first migration
            return {}
    return {row["request_id"]: dict(row) for row in rows}


def error_event(text: str) -> dict[str, Any]:
    """The last event of a stream, which must be an OpenAI-shaped error."""
    events = [event for event in text.split("\n\n") if event]
    last: dict[str, Any] = assert_openai_error(json.loads(events[-1].removeprefix("data: ")))
    return last


async def still_serving(http: aiohttp.ClientSession, gateway: Server, request_id: str) -> None:
    """A normal request to another endpoint, right after the fault."""
    status, document, _ = await call(
        http, "POST", chat_url(gateway), json=chat(), headers=with_id(request_id)
    )
    assert status == 200 and document["object"] == "chat.completion"


class RawServer:
    """A TCP server that is no HTTP server: it reads the request and then stays silent, or answers
    `answer` (bytes that are not HTTP) and closes."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await reader.read(65536)
            if self.answer is not None:
                writer.write(self.answer)
                await writer.drain()
                return
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


async def test_backend_process_killed_mid_stream(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with backend_process("killable/model") as (process, url):
        runner, gateway = await start_faulty_gateway(tmp_path, backend, {"killable/model": f"{url}/v1"})
        try:
            body = chat("[[chunks=2000]][[chunk_delay=0.01]]", model="killable/model", stream=True)
            async with http.post(chat_url(gateway), json=body, headers=with_id("killed")) as response:
                assert response.status == 200
                first = await response.content.readany()
                assert first.startswith(b"data: {")
                process.kill()
                rest = await asyncio.wait_for(response.read(), 10)
            error = error_event((first + rest).decode())
            assert error["type"] == "upstream_error" and "closed the stream" in error["message"]
            await still_serving(http, gateway, "after-kill")
            records = await stored(tmp_path / "gateway.db", {"killed", "after-kill"})
        finally:
            await runner.cleanup()
    assert records["killed"]["status"] == 200 and records["killed"]["stream"] == 1
    assert records["killed"]["error"] == error["message"], "the record hides that the stream failed"
    assert records["after-kill"]["status"] == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_that_accepts_and_never_answers_is_504(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, stream: bool
) -> None:
    silent = RawServer()
    async with silent as url:
        runner, gateway = await start_faulty_gateway(tmp_path, backend, {"silent/model": url})
        try:
            started = time.monotonic()
            status, document, _ = await call(
                http, "POST", chat_url(gateway), json=chat(model="silent/model", stream=stream),
                headers=with_id("silent"),
            )  # fmt: skip
            waited = time.monotonic() - started
            assert status == 504 and silent.connections == 1
            error = assert_openai_error(document)
            assert error["type"] == "timeout_error" and f"{TIMEOUT:g} seconds" in error["message"]
            assert TIMEOUT <= waited < TIMEOUT + 5
            await still_serving(http, gateway, "after-silence")
            records = await stored(tmp_path / "gateway.db", {"silent", "after-silence"})
        finally:
            await runner.cleanup()
    assert records["silent"]["status"] == 504 and records["silent"]["error"] == error["message"]
    assert records["after-silence"]["status"] == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4],
    ids=["ssh-banner", "binary"],
)
async def test_backend_answering_bytes_that_are_not_http_is_502(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, stream: bool, answer: bytes
) -> None:
    async with RawServer(answer) as url:
        runner, gateway = await start_faulty_gateway(tmp_path, backend, {"garbage/model": url})
        try:
            status, document, _ = await call(
                http, "POST", chat_url(gateway), json=chat(model="garbage/model", stream=stream),
                headers=with_id("garbage"),
            )  # fmt: skip
            assert status == 502
            assert assert_openai_error(document)["type"] == "upstream_error"
            await still_serving(http, gateway, "after-garbage")
            records = await stored(tmp_path / "gateway.db", {"garbage", "after-garbage"})
        finally:
            await runner.cleanup()
    assert records["garbage"]["status"] == 502 and records["after-garbage"]["status"] == 200


async def test_invalid_sse_frames_pass_as_sent_and_the_stream_ends(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    """The gateway relays the backend's events byte for byte; an event that is not JSON is the
    backend's to fix, and must neither stop the stream nor the gateway."""
    body = chat("[[garbage]]", stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        assert response.status == 200
        text = await asyncio.wait_for(response.read(), 5)
    assert text == b'this is not server-sent events\n\ndata: {"choices": [\n\ndata: [DONE]\n\n'
    await still_serving(http, gateway, "after-invalid-frames")


class HeldBackend:
    """A backend that sends `first` as the start of a stream, then waits for `release` before it
    sends the end: whatever the client receives meanwhile, the gateway did not hold back."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.release = asyncio.Event()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(self.first)
        await self.release.wait()
        await response.write(b"data: [DONE]\r\n\r\n")
        await response.write_eof()
        return response


@pytest.fixture
async def held(request: pytest.FixtureRequest) -> AsyncIterator[tuple[HeldBackend, str]]:
    backend = HeldBackend(request.param)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", backend.chat)
    runner, url = await start(app)
    yield backend, f"{url}/v1"
    backend.release.set()
    await runner.cleanup()


CRLF_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\r\n\r\n'
UNENDED = b"data: " + b"x" * 4_000_000


@pytest.mark.parametrize(
    "held", [CRLF_EVENT, UNENDED], ids=["crlf-events", "event-never-ends"], indirect=True
)
async def test_events_reach_the_client_before_the_backend_finishes(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, held: tuple[HeldBackend, str]
) -> None:
    """SSE also ends events with CRLF; and a backend whose event never ends must not make the gateway
    hold all of its output (memory) until the stream ends."""
    server, url = held
    runner, gateway = await start_faulty_gateway(tmp_path, backend, {"held/model": url}, timeout=30)
    try:
        body = chat(model="held/model", stream=True)
        async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
            received = b""
            while len(received) < len(server.first) // 2:
                chunk = await asyncio.wait_for(response.content.readany(), 5)
                assert chunk, "the stream ended early"
                received += chunk
            server.release.set()
            received += await asyncio.wait_for(response.read(), 10)
        assert received == server.first + b"data: [DONE]\r\n\r\n"
    finally:
        await runner.cleanup()


async def test_headers_late_but_within_the_timeout_are_waited_for(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    """Later than the timeout is a 504: test_direct_api.py::test_timeout_is_504_not_408."""
    for stream in (False, True):
        body = chat("[[delay=0.25]]", model="slow/model", stream=stream)
        async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
            assert response.status == 200
            assert (await response.read()).rstrip().endswith(b"[DONE]" if stream else b"}")


async def test_redis_going_away_and_coming_back(
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    redis_server: RedisServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """With `redis_url`, the limiter falls back to per-process limits while Redis is away; the stream
    relay, which lives in Redis, refuses new streams with a clear 503 (and callbacks with 503, which
    the function retries). Everything works again once Redis is back, without a restart."""
    limits = {"requests_per_second": 1000, "burst": 1000, "concurrent_per_user": 100}
    config = compute_config(
        tmp_path, backend, compute, globus, free_port(), redis_url=redis_server.url, limits=limits
    )
    runner, gateway = await start_gateway(config)
    relayed_url = f"{gateway.url}/hpc/vllm/v1/chat/completions"
    relayed = chat("[[chunks=3]]", stream=True)
    callback_headers = {"X-Internal-Secret": SECRET, "X-Stream-Task-Token": "t"}
    try:
        async with http.post(relayed_url, json=relayed, headers=auth()) as response:
            assert response.status == 200 and (await response.read()).endswith(b"data: [DONE]\n\n")

        await redis_server.stop()
        await still_serving(http, gateway, "limits-without-redis")
        status, document, _ = await call(http, "POST", relayed_url, json=relayed, headers=auth())
        assert status == 503
        assert assert_openai_error(document)["code"] == "relay_unavailable"
        status, document, _ = await call(
            http, "POST", f"{gateway.url}/api/streaming/data/",
            json={"task_id": "x", "data": "data: x"}, headers=callback_headers,
        )  # fmt: skip
        assert (status, document["error"]["code"]) == (503, "relay_unavailable")

        await redis_server.start()
        await still_serving(http, gateway, "limits-with-redis-again")
        async with http.post(relayed_url, json=relayed, headers=auth()) as response:
            assert response.status == 200 and (await response.read()).endswith(b"data: [DONE]\n\n")
    finally:
        await runner.cleanup()
