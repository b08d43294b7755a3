"""Request bodies that never finish: authenticated requests whose body stalls or dribbles are answered
408 in OpenAI's shape once the deployed deadline passes (10 s of grace, then at least 8 KiB/s on
average, 120 s in all), directly and through the shipped nginx, which streams bodies on to the
gateway; the connection is then closed, so nothing of them stays held.

The scenarios wait out the same deadlines independently, so they run at the same time (see
`Scenarios`): the module takes as long as its longest wait, not their sum."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from testing.fake_vllm import create_backend_app
from testing.services.nginx import NginxServer
from tests.processes import gateway_process
from tests.support import (
    CHAT_MODEL,
    EMBED_MODEL,
    TOKENS,
    chat,
    free_port,
    skip_without_nginx,
    start,
    start_gateway,
    write_gateway_config,
)

# The scenarios start together in one module-scoped fixture: `make test` keeps the module on one worker.
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("body_deadline")]

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


@dataclass
class Scenarios:
    """The module's long waits, started together (each waits out the deployed deadline, and the one
    through nginx also its `client_body_timeout`): each test awaits its own and checks it."""

    direct: asyncio.Future[tuple[Timed, Timed, Timed, Timed]]
    hundreds: asyncio.Future[tuple[list[int], float, list[bytes]]]
    through_nginx: asyncio.Future[tuple[Timed, Timed, float]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scenarios(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scenarios]:
    """One fake backend and one in-process gateway (the deployed body deadline, stream callbacks on)
    for the direct and nginx scenarios; the hundreds of stalled bodies go to a gateway process."""
    directory = tmp_path_factory.mktemp("body-deadline")
    backend_runner, backend_url = await start(create_backend_app(models=[CHAT_MODEL, EMBED_MODEL]))
    config = write_gateway_config(directory, backend_url)
    document = yaml.safe_load(config.read_text())
    document["streaming"] = {"internal_secret": "body-deadline-secret-0123456789"}
    config.write_text(yaml.safe_dump(document))
    runner, server = await start_gateway(config)
    upstream = server.url.removeprefix("http://").removesuffix("/resource_server")
    running = Scenarios(
        direct=asyncio.ensure_future(direct(int(upstream.rsplit(":", 1)[1]))),
        hundreds=asyncio.ensure_future(hundreds(directory / "process", backend_url)),
        through_nginx=asyncio.ensure_future(through_nginx(directory / "nginx", upstream)),
    )
    yield running
    futures = (running.direct, running.hundreds, running.through_nginx)
    for future in futures:
        future.cancel()
    await asyncio.gather(*futures, return_exceptions=True)
    await runner.cleanup()
    await backend_runner.cleanup()


async def direct(port: int) -> tuple[Timed, Timed, Timed, Timed]:
    return await asyncio.gather(
        slow_body(port, CHAT, 100_000, b'{"model": ', then_every=None),
        slow_body(port, CHAT, 100_000, b'{"model": ', then_every=0.5),
        paced(port, CHAT, 150_000, per_second=20_000),
        slow_body(port, CALLBACK, 10_000, b'{"task_id": ', then_every=None),
    )


async def test_stalled_and_dribbling_bodies_are_408_and_honest_slow_ones_pass(scenarios: Scenarios) -> None:
    """A stream callback without the secret has its body read too (to end the stream it names), so
    a stalled one is bound by the same deadline and then refused."""
    stalled, dribbling, honest, callback = await scenarios.direct
    assert callback.status in (401, 403, 408) and GRACE - 0.5 <= callback.seconds <= GRACE + 2, callback
    assert_timed_out(stalled, GRACE - 0.5, GRACE + 2)
    assert_timed_out(dribbling, GRACE - 0.5, GRACE + 2)
    assert "(10 of 100000 bytes received)" in stalled.error()["message"]
    assert honest.status == 200 and honest.seconds > 7, honest


SENT = 32 * 1024
"""What each stalled body sends: at the deployed minimum rate it buys 4 s beyond the grace."""


async def hundreds(directory: Path, backend_url: str) -> tuple[list[int], float, list[bytes]]:
    """Statuses, seconds until all were answered, and what each connection read after its answer."""
    directory.mkdir()
    port = free_port()
    async with gateway_process(write_gateway_config(directory, backend_url), port=port):
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        try:
            started = time.monotonic()
            for _, writer in connections:
                writer.write(head(CHAT, 1 << 20) + b"[" + b" " * SENT)
            answers = await asyncio.gather(*(read_answer(reader) for reader, _ in connections))
            answered = time.monotonic() - started
            closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 15) for r, _ in connections))
        finally:
            for _, writer in connections:
                writer.close()
    return [status for status, _, _ in answers], answered, closed


async def test_hundreds_of_stalled_bodies_are_all_answered_and_their_connections_closed(
    scenarios: Scenarios,
) -> None:
    """Each has sent 32 KiB of a 1 MiB body, and would have held it until the gateway stopped."""
    statuses, answered, closed = await scenarios.hundreds
    assert set(statuses) == {408}
    assert answered < GRACE + SENT / 8192 + 3
    assert closed == [b""] * len(statuses), "the gateway closes each connection"


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


async def through_nginx(directory: Path, upstream: str) -> tuple[Timed, Timed, float]:
    skip_without_nginx()
    async with NginxServer(directory, [upstream], port=free_port()) as nginx:
        port = int(nginx.url.rsplit(":", 1)[1])
        return await asyncio.gather(
            slow_body(port, CHAT, 100_000, b'{"model": ', then_every=None),
            slow_body(port, CHAT, 100_000, b'{"model": ', then_every=0.5),
            closed_without_answer(port, "/resource_server/local/vllm/v1/batches"),
        )


async def test_through_the_shipped_nginx(scenarios: Scenarios) -> None:
    """nginx streams inference bodies on as they come (proxy_request_buffering off), so the
    gateway's deadline answers them, before nginx's own limit on a pause. Other routes' bodies are
    buffered by nginx, which ends the connection (without an answer: nginx never answers its own
    body timeouts) once the body paused for `client_body_timeout`."""
    stalled, dribbling, buffered = await scenarios.through_nginx
    assert_timed_out(stalled, GRACE - 0.5, GRACE + 2, closes=False)
    assert_timed_out(dribbling, GRACE - 0.5, GRACE + 2, closes=False)
    assert "x-request-id" in stalled.headers, "the gateway's answer"
    assert NGINX_BODY_PAUSE - 1 <= buffered <= NGINX_BODY_PAUSE + 5
