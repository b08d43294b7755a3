"""Request bodies that never finish: authenticated requests whose body stalls or dribbles are answered
408 in OpenAI's shape once the deployed deadline passes (10 s of grace, then at least 8 KiB/s on
average, 120 s in all), directly and through the shipped nginx, which streams bodies on to the
gateway; the connection is then closed, so nothing of them stays held."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testing.services.nginx import NginxServer
from tests.conftest import TOKENS, Server, chat, free_port, start_gateway, write_gateway_config
from tests.processes import gateway_process
from tests.support import skip_without_nginx

GRACE = 10.0
"""`server.body_grace_seconds` as deployed; a stalled body is answered shortly after it."""
CHAT = "/resource_server/local/vllm/v1/chat/completions"
CALLBACK = "/resource_server/api/streaming/data/"


@dataclass
class Timed:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def error(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/json"), self
        error: dict[str, Any] = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return error


def head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {TOKENS['alice']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response, by its Content-Length: the connection may stay open a little longer (aiohttp
    reads and drops what is still sent for a few seconds before closing, so the answer arrives)."""
    raw_head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def slow_body(port: int, path: str, length: int, sent: bytes, then_every: float | None) -> Timed:
    """Sends the head and `sent`, then one byte every `then_every` seconds (None: nothing more)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(head(path, length) + sent)

    async def dribble() -> None:
        while then_every is not None:
            await asyncio.sleep(then_every)
            writer.write(b" ")
            await writer.drain()

    dribbling = asyncio.ensure_future(dribble())
    try:
        status, headers, body = await asyncio.wait_for(read_answer(reader), GRACE + 20)
        return Timed(status, headers, body, time.monotonic() - started)
    finally:
        dribbling.cancel()
        writer.close()


def body_of(length: int) -> bytes:
    """A valid chat body padded with spaces to `length` bytes."""
    document = json.dumps(chat()).encode()
    return document + b" " * (length - len(document))


async def paced(port: int, path: str, length: int, per_second: int) -> Timed:
    """A slow but honest client: the whole body, at `per_second` bytes a second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    body = body_of(length)
    writer.write(head(path, length))
    for offset in range(0, length, per_second // 10):
        writer.write(body[offset : offset + per_second // 10])
        await writer.drain()
        await asyncio.sleep(0.1)
    status, headers, answer = await asyncio.wait_for(read_answer(reader), 30)
    writer.close()
    return Timed(status, headers, answer, time.monotonic() - started)


def assert_timed_out(answer: Timed, low: float, high: float, *, closes: bool = True) -> None:
    """`closes`: the gateway says it closes the connection (nginx in front keeps its own)."""
    assert answer.status == 408, answer
    error = answer.error()
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert not closes or answer.headers.get("connection", "").lower() == "close"
    assert low <= answer.seconds <= high, answer.seconds


@pytest.fixture
async def gateway(backend: Server, tmp_path: Path) -> AsyncIterator[int]:
    """The deployed body deadline; the port of an in-process gateway, with stream callbacks on."""
    config = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(config.read_text())
    document["streaming"] = {"internal_secret": "body-deadline-secret-0123456789"}
    config.write_text(yaml.safe_dump(document))
    runner, server = await start_gateway(config)
    yield int(server.url.split(":")[2].split("/")[0])
    await runner.cleanup()


async def test_stalled_and_dribbling_bodies_are_408_and_honest_slow_ones_pass(gateway: int) -> None:
    """A stream callback without the secret has its body read too (to end the stream it names), so
    a stalled one is bound by the same deadline and then refused."""
    stalled, dribbling, honest, callback = await asyncio.gather(
        slow_body(gateway, CHAT, 100_000, b'{"model": ', then_every=None),
        slow_body(gateway, CHAT, 100_000, b'{"model": ', then_every=0.5),
        paced(gateway, CHAT, 150_000, per_second=20_000),
        slow_body(gateway, CALLBACK, 10_000, b'{"task_id": ', then_every=None),
    )
    assert callback.status in (401, 403, 408) and GRACE - 0.5 <= callback.seconds <= GRACE + 2, callback
    assert_timed_out(stalled, GRACE - 0.5, GRACE + 2)
    assert_timed_out(dribbling, GRACE - 0.5, GRACE + 2)
    assert "(10 of 100000 bytes received)" in stalled.error()["message"]
    assert honest.status == 200 and honest.seconds > 7, honest


SENT = 32 * 1024
"""What each stalled body sends: at the deployed minimum rate it buys 4 s beyond the grace."""


async def test_hundreds_of_stalled_bodies_are_all_answered_and_their_connections_closed(
    backend: Server, tmp_path: Path
) -> None:
    """Each has sent 32 KiB of a 1 MiB body, and would have held it until the gateway stopped."""
    port = free_port()
    async with gateway_process(write_gateway_config(tmp_path, backend.url), port=port):
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        started = time.monotonic()
        for _, writer in connections:
            writer.write(head(CHAT, 1 << 20) + b"[" + b" " * SENT)
        answers = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
        answered = time.monotonic() - started
        assert {status for status, _, _ in answers} == {408}
        assert answered < GRACE + SENT / 8192 + 3
        closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 15) for r, _ in connections))
        assert closed == [b""] * len(connections), "the gateway closes each connection"
        for _, writer in connections:
            writer.close()


async def closed_without_answer(port: int, path: str) -> float:
    """Sends a head and the start of a body, then nothing: seconds until the connection ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(head(path, 100_000) + b'{"model": ')
    try:
        assert await asyncio.wait_for(reader.read(), NGINX_BODY_PAUSE + 10) == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started


NGINX_BODY_PAUSE = 30.0
"""`client_body_timeout` in deploy/nginx/gateway-locations.conf."""


async def test_through_the_shipped_nginx(backend: Server, tmp_path: Path) -> None:
    """nginx streams inference bodies on as they come (proxy_request_buffering off), so the
    gateway's deadline answers them, before nginx's own limit on a pause. Other routes' bodies are
    buffered by nginx, which ends the connection (without an answer: nginx never answers its own
    body timeouts) once the body paused for `client_body_timeout`."""
    skip_without_nginx()
    runner, server = await start_gateway(write_gateway_config(tmp_path, backend.url))
    try:
        upstream = server.url.removeprefix("http://").removesuffix("/resource_server")
        async with NginxServer(tmp_path / "nginx", [upstream], port=free_port()) as nginx:
            port = int(nginx.url.rsplit(":", 1)[1])
            stalled, dribbling, buffered = await asyncio.gather(
                slow_body(port, CHAT, 100_000, b'{"model": ', then_every=None),
                slow_body(port, CHAT, 100_000, b'{"model": ', then_every=0.5),
                closed_without_answer(port, "/resource_server/local/vllm/v1/batches"),
            )
    finally:
        await runner.cleanup()
    assert_timed_out(stalled, GRACE - 0.5, GRACE + 2, closes=False)
    assert_timed_out(dribbling, GRACE - 0.5, GRACE + 2, closes=False)
    assert "x-request-id" in stalled.headers, "the gateway's answer"
    assert NGINX_BODY_PAUSE - 1 <= buffered <= NGINX_BODY_PAUSE + 5
