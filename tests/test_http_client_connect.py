"""How the gateway's HTTP client connects: a refused connection is "unreachable"; one whose request
was not all sent when its answer ended is not reused; IPv6 literals, default ports and URLs that
need encoding make the request line and Host they should; over real TLS on loopback, a
self-signed server is trusted through the context the adaptor gives, with its host name checked,
and refused under the default verification as a TLS failure (the peer answered: not
"unreachable", so no other replica is tried for it); each exchange on a kept connection keeps its
own deadline. And the client's trickiest exchanges again under uvloop, the event loop the gateway
runs on."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from adaptors.forwarding import unreachable
from adaptors.http_client import HTTPClient
from adaptors.http_wire import ConnectFailed, ReadTimeout, TLSFailed
from testing.ports import free_port
from tests import test_http_client as plain
from tests.support import self_signed_certificate
from tests.test_http_client import OK, Raw, fetch, lean_client, raw_server, whole


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with lean_client() as http:
        yield http


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[Raw, Path]]:
    certificate, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    server = Raw()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=context)
    server.url = f"https://127.0.0.1:{listening.sockets[0].getsockname()[1]}/v1/x"
    yield server, certificate
    listening.close()


async def test_a_server_trusted_through_the_context_given(tls_server: tuple[Raw, Path]) -> None:
    server, certificate = tls_server
    http = HTTPClient(4, ssl.create_default_context(cafile=str(certificate)))
    try:
        for _ in range(3):
            answer = await http.fetch("POST", server.url, b"{}", timeout=5, limit=whole)
            assert (answer.status, answer.body) == (200, b"ok")
        assert server.connections == 1
    finally:
        await http.close()


async def test_an_untrusted_server_is_refused_before_anything_is_sent(tls_server: tuple[Raw, Path]) -> None:
    server, _ = tls_server
    http = HTTPClient(4)
    try:
        with pytest.raises(TLSFailed) as refused:
            await http.fetch("POST", server.url, b"{}", timeout=5, limit=whole)
    finally:
        await http.close()
    assert refused.value.shown == "ClientConnectorCertificateError"
    assert not unreachable(refused.value)
    assert not server.heads


async def test_a_refused_connection_is_unreachable(client: HTTPClient) -> None:
    with pytest.raises(ConnectFailed) as refused:
        await fetch(client, f"http://127.0.0.1:{free_port()}/v1")
    assert unreachable(refused.value) and refused.value.shown == "ClientConnectorError"


async def test_a_connection_whose_request_was_not_all_sent_is_not_reused(client: HTTPClient) -> None:
    """A server may answer before reading the whole body: the rest must not become the next request."""
    heads_after_the_answer = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        rest = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1):
                while data := await reader.read(1 << 20):
                    rest = rest[-16:] + data
                    heads_after_the_answer.append(b"POST /v1" in rest)
        writer.close()

    listening = await asyncio.start_server(early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}/v1"
    try:
        for _ in range(2):
            answer = await client.fetch("POST", url, bytes(32 * 1024 * 1024), timeout=5, limit=whole)
            assert (answer.status, answer.body) == (413, b"no")
    finally:
        listening.close()
    assert not any(heads_after_the_answer)


async def test_ipv6_literals_and_default_ports(client: HTTPClient) -> None:
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK)
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(serve, "::1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        assert await fetch(client, f"http://[::1]:{port}/v1/x") == b"ok"
    finally:
        listening.close()
    assert f"Host: [::1]:{port}\r\n".encode() in heads[0]
    target = client._target("GET", "https://user:pw@Example.org:443/a b/ü?q=1 2")
    assert target.prefix.startswith(b"GET /a%20b/%C3%BC?q=1%202 HTTP/1.1\r\nHost: example.org\r\n")
    assert b"Authorization: Basic dXNlcjpwdw==\r\n" in target.prefix


async def test_each_exchange_on_a_kept_connection_keeps_its_deadline(client: HTTPClient) -> None:
    async with raw_server() as raw:
        await kept_deadlines(raw, client)


async def kept_deadlines(raw: Raw, client: HTTPClient) -> None:
    """The deadline's timer outlives its exchange (adaptors/http_connection.py): one that fires
    while the connection is idle, or during a later exchange due later, takes nothing from it, and
    a later exchange due sooner still ends on time."""

    async def script(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 3:
            await asyncio.sleep(10)
            return False
        if number == 2:
            await asyncio.sleep(0.6)
        writer.write(OK)
        return True

    raw.script = script
    loop = asyncio.get_running_loop()
    assert await fetch(client, raw.url, timeout=0.2) == b"ok"
    await asyncio.sleep(0.3)  # its timer fires with nothing waiting
    assert await fetch(client, raw.url, timeout=0.4) == b"ok"
    assert await fetch(client, raw.url, timeout=5) == b"ok", "the timer of the one before fired meanwhile"
    started = loop.time()
    with pytest.raises(ReadTimeout):
        await fetch(client, raw.url, timeout=0.3)
    assert 0.25 < loop.time() - started < 1.5
    assert raw.connections == 1


@pytest.mark.parametrize(
    "scenario",
    [
        plain.test_connections_are_kept_alive_and_the_request_is_as_expected,
        functools.partial(
            plain.test_a_request_the_servers_close_overtook_is_sent_once_more, second=plain.fetch
        ),
        functools.partial(
            plain.test_a_request_the_servers_close_overtook_is_sent_once_more, second=plain.streamed
        ),
        plain.test_a_request_is_not_sent_again_once_an_answer_began_nor_from_a_new_connection,
        plain.test_a_total_deadline_and_a_streams_silence,
        kept_deadlines,
        plain.test_a_stream_not_read_holds_back_the_backend,
        functools.partial(plain.test_an_abandoned_answer_closes_its_connection, streamed=True),
        functools.partial(plain.test_an_abandoned_answer_closes_its_connection, streamed=False),
    ],
    ids=[
        "keep-alive",
        "retry",
        "retry-streamed",
        "no-retry",
        "deadlines",
        "kept-deadlines",
        "flow-control",
        "stream-closed",
        "cancelled",
    ],
)
def test_under_uvloop(scenario: Callable[[Raw, HTTPClient], Awaitable[None]]) -> None:
    async def run() -> None:
        async with raw_server() as server, lean_client() as http:
            await scenario(server, http)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
