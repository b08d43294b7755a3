"""The gateway's HTTP client (adaptors/http_client.py) against real servers on loopback, most of
them raw asyncio servers that answer exactly the bytes a test scripts, misbehaving on purpose:
keep-alive and its limits, the retry of a request the server's close overtook, the pool's bound,
deadlines, bodies of every framing, flow control, cancellation, and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from adaptors import http_client
from adaptors.context import AdaptorContext
from adaptors.direct_api import DirectAPIEndpoint
from adaptors.forwarding import unreachable
from adaptors.http_client import HTTPClient
from adaptors.http_connection import HIGH_WATER
from adaptors.http_wire import ConnectTimeout, Disconnected, MalformedAnswer, ReadTimeout

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Script = Callable[["Raw", asyncio.StreamWriter, int], Awaitable[bool]]


async def answer_ok(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
    writer.write(OK)
    return True


@dataclass
class Raw:
    """A server that reads each request (head and Content-Length body) and answers as `script`
    says; `script` returns False to close the connection."""

    script: Script = answer_ok
    url: str = ""
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    ended: int = 0
    """Connections the client closed (end of file seen)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for number in itertools.count():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.ended += 1
                    return
                self.heads.append(head)
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                if not await self.script(self, writer, number):
                    return
                await writer.drain()
        except ConnectionError:
            self.ended += 1
        except RuntimeError:
            # uvloop refuses a write on a transport the client's close already closed, where
            # asyncio's drops it and then fails `drain` with a ConnectionError
            if not writer.transport.is_closing():
                raise
            self.ended += 1
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_server() -> AsyncIterator[Raw]:
    server = Raw()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}/v1/chat?x=1"
    try:
        yield server
    finally:
        listening.close()


@contextlib.asynccontextmanager
async def lean_client() -> AsyncIterator[HTTPClient]:
    http = HTTPClient(4096, None, {"Content-Type": "application/json"})
    try:
        yield http
    finally:
        await http.close()


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    async with raw_server() as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[HTTPClient]:
    async with lean_client() as http:
        yield http


def whole(size: int) -> int:
    return 1 << 20


async def fetch(http: HTTPClient, url: str, timeout: float = 5) -> bytes | None:
    return (await http.fetch("POST", url, b"{}", timeout=timeout, limit=whole)).body


async def eventually(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


async def test_connections_are_kept_alive_and_the_request_is_as_expected(
    raw: Raw, client: HTTPClient
) -> None:
    for _ in range(5):
        assert await fetch(client, raw.url) == b"ok"
    assert raw.connections == 1
    port = raw.url.split(":")[2].split("/")[0]
    assert (
        raw.heads[0]
        == (
            f"POST /v1/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: hpc-inference-gateway\r\n"
            "Accept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        ).encode()
    )


async def test_a_connection_the_server_closed_while_idle_is_not_reused(raw: Raw, client: HTTPClient) -> None:
    async def once(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(OK)
        return False  # closes at once after its answer

    raw.script = once
    assert await fetch(client, raw.url) == b"ok"
    await asyncio.sleep(0.05)
    assert await fetch(client, raw.url) == b"ok"
    assert raw.connections == 2 and len(raw.heads) == 2


async def streamed(http: HTTPClient, url: str) -> bytes | None:
    stream = await http.stream("POST", url, b"{}", timeout=5)
    assert stream.status == 200
    return await stream.next_piece()


@pytest.mark.parametrize("second", [fetch, streamed])
async def test_a_request_the_servers_close_overtook_is_sent_once_more(
    raw: Raw, client: HTTPClient, second: Callable[[HTTPClient, str], Awaitable[bytes | None]]
) -> None:
    """The server closes an idle connection as the next request arrives on it: nothing of an
    answer came, so the request goes again, on a new connection, whole or streamed."""

    async def closes_the_second(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:
            return False
        writer.write(OK)
        return True

    raw.script = closes_the_second
    assert await fetch(client, raw.url) == b"ok"
    assert await second(client, raw.url) == b"ok"
    assert (raw.connections, len(raw.heads)) == (2, 3)


async def test_a_request_is_not_sent_again_once_an_answer_began_nor_from_a_new_connection(
    raw: Raw, client: HTTPClient
) -> None:
    async def cut_short(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(OK if number == 0 else b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return number == 0

    raw.script = cut_short
    assert await fetch(client, raw.url) == b"ok"
    with pytest.raises(Disconnected) as cut:
        await fetch(client, raw.url)
    assert cut.value.shown == "ClientPayloadError"
    assert (raw.connections, len(raw.heads)) == (1, 2)

    async def never(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        return False

    raw.script = never
    with pytest.raises(Disconnected) as closed:
        await fetch(client, raw.url)
    assert closed.value.shown == "ServerDisconnectedError"
    assert (raw.connections, len(raw.heads)) == (2, 3)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nok",  # read until the connection closes
    ],
)
async def test_connection_close_http_10_and_bodies_until_close_are_not_reused(
    raw: Raw, client: HTTPClient, answer: bytes
) -> None:
    async def answers(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(answer)
        return b"Content-Length" in answer  # the server keeps it open unless the body needs the close

    raw.script = answers
    for _ in range(2):
        assert await fetch(client, raw.url) == b"ok"
    assert raw.connections == 2
    await eventually(lambda: raw.ended + (b"Content-Length" not in answer) * 2 >= 2)


async def test_idle_connections_expire(raw: Raw, client: HTTPClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "KEEPALIVE_SECONDS", 0.3)
    assert await fetch(client, raw.url) == b"ok"
    await eventually(lambda: raw.ended == 1)
    assert await fetch(client, raw.url) == b"ok"
    assert raw.connections == 2


async def test_the_pool_is_bounded_and_a_waiter_respects_its_deadline(raw: Raw) -> None:
    async def slow(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        await asyncio.sleep(0.5)
        writer.write(OK)
        return True

    raw.script = slow
    http = HTTPClient(1)
    try:
        first = asyncio.ensure_future(fetch(http, raw.url))
        second = asyncio.ensure_future(fetch(http, raw.url, timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectTimeout) as waited:
            await fetch(http, raw.url, timeout=0.2)
        assert unreachable(waited.value), "nothing was sent: another replica may take it"
        assert await first == b"ok" and await second == b"ok"
        assert raw.connections == 1 and len(raw.heads) == 2
    finally:
        await http.close()


async def test_a_total_deadline_and_a_streams_silence(raw: Raw, client: HTTPClient) -> None:
    async def trickles(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        await asyncio.sleep(10)
        return False

    raw.script = trickles
    started = asyncio.get_running_loop().time()
    with pytest.raises(ReadTimeout):
        await fetch(client, raw.url, timeout=0.4)
    assert 0.35 < asyncio.get_running_loop().time() - started < 1
    stream = await client.stream("POST", raw.url, b"{}", timeout=0.6)
    received = b""
    with pytest.raises(ReadTimeout):
        while (piece := await stream.next_piece()) is not None:
            received += piece
    assert received == b"x" * 8, "each piece within the silence allowed, however long it all took"


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", MalformedAnswer),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", MalformedAnswer),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", MalformedAnswer),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", Disconnected),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", Disconnected),
        (b"garbage", Disconnected),
    ],
    ids=["head-too-large", "chunk-size", "101", "content-length", "chunked-cut", "no-head"],
)
async def test_malformed_or_cut_answers_fail_and_close(
    raw: Raw, client: HTTPClient, answer: bytes, error: type[Exception]
) -> None:
    async def answers(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(answer)
        return False

    raw.script = answers
    with pytest.raises(error):
        await fetch(client, raw.url)
    raw.script = answer_ok
    assert await fetch(client, raw.url) == b"ok"
    assert raw.connections == 2


async def test_interim_answers_are_skipped_and_204_has_no_body(raw: Raw, client: HTTPClient) -> None:
    async def answers(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 0:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        else:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    raw.script = answers
    answer = await client.fetch("POST", raw.url, b"{}", timeout=5, limit=whole)
    assert (answer.status, answer.body) == (201, b"ok")
    answer = await client.fetch("POST", raw.url, b"{}", timeout=5, limit=whole)
    assert (answer.status, answer.body) == (204, b"")
    assert raw.connections == 1


async def test_chunked_answers_in_pieces_with_extensions_and_trailers(raw: Raw, client: HTTPClient) -> None:
    encoded = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\ndata\r\n2\r\n: \r\n0\r\nT: 1\r\n\r\n"
    )
    cut = 0

    async def split(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(encoded[:cut])
        await writer.drain()
        await asyncio.sleep(0.002)
        writer.write(encoded[cut:])
        return True

    raw.script = split
    for cut in range(1, len(encoded), 3):
        assert await fetch(client, raw.url) == b"data: ", cut
    assert raw.connections == 1, "every answer was read to its end, and the connection reused"


async def test_packed_answers_are_bounded_after_unpacking(raw: Raw, client: HTTPClient) -> None:
    packed = gzip.compress(bytes(50 * 1024 * 1024))

    async def answers(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        body = packed if len(server.heads) == 1 else gzip.compress(b'{"a": 1}')
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        return True

    raw.script = answers
    assert await fetch(client, raw.url) is None, "over the limit of 1 MiB once unpacked"
    assert await fetch(client, raw.url) == b'{"a": 1}'
    assert raw.connections == 2, "the answer over the limit was not read on: its connection closed"


async def test_a_packed_stream_unpacks_a_bounded_piece_at_a_time(raw: Raw, client: HTTPClient) -> None:
    packed = gzip.compress(bytes(3 * 1024 * 1024))

    async def answers(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed))
        return True

    raw.script = answers
    stream = await client.stream("POST", raw.url, b"{}", timeout=5)
    sizes = []
    while (piece := await stream.next_piece()) is not None:
        sizes.append(len(piece))
    assert sum(sizes) == 3 * 1024 * 1024 and max(sizes) <= 256 * 1024
    assert (await client.stream("POST", raw.url, b"{}", timeout=5)).status == 200
    assert raw.connections == 1, "the stream read to its end gave its connection back"


async def test_a_stream_not_read_holds_back_the_backend(raw: Raw, client: HTTPClient) -> None:
    sent = 0

    async def floods(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):
                writer.write(b"x" * 65536)
                await writer.drain()
                sent += 65536
        return False

    raw.script = floods
    stream = await client.stream("POST", raw.url, b"{}", timeout=5)
    first = await stream.next_piece()
    assert first
    await asyncio.sleep(0.5)
    connection = stream._connection
    assert connection is not None and connection.buffered <= HIGH_WATER + 256 * 1024
    assert sent < 32 * 1024 * 1024, "the backend was held back (64 MiB take it well under 0.5 s)"
    received = len(first)
    while (piece := await stream.next_piece()) is not None:
        received += len(piece)
    assert received == sent == 64 * 1024 * 1024


@pytest.mark.parametrize("streamed", [False, True])
async def test_an_abandoned_answer_closes_its_connection(
    raw: Raw, client: HTTPClient, streamed: bool
) -> None:
    async def endless(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    raw.script = endless
    if streamed:
        stream = await client.stream("POST", raw.url, b"{}", timeout=5)
        assert await stream.next_piece() == b"x"
        stream.close()
    else:
        task = asyncio.ensure_future(fetch(client, raw.url))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await eventually(lambda: raw.ended == 1)
    assert client._in_use == 0 and not client._idle


async def test_an_adaptors_stream_sends_its_request_when_first_read_and_never_if_dropped() -> None:
    """Between the adaptor's call and the first read, an error may drop the stream unstarted: it
    must have sent nothing, nor hold a connection. Read, it sends its request then."""
    async with raw_server() as raw:
        endpoint = DirectAPIEndpoint(
            "1", "local-vllm-m", "local", "vllm", "m", "adaptors.direct_api.DirectAPIEndpoint",
            config={"api_url": raw.url.split("/v1")[0] + "/v1"},
        )  # fmt: skip
        with ThreadPoolExecutor(1) as executor:
            await endpoint.startup(AdaptorContext(executor=executor, relay=None))  # type: ignore[arg-type]
            try:
                data = {"model_params": {"model": "m", "messages": [], "openai_endpoint": "chat/completions"}}
                assert (await endpoint.submit_task(data)).result == "ok"
                http = endpoint._client()
                dropped = await endpoint.submit_streaming_task(data, "request-1")
                del dropped
                gc.collect()
                read = (await endpoint.submit_streaming_task(data, "request-2")).response
                await asyncio.sleep(0.05)
                assert (len(raw.heads), http._in_use) == (1, 0)
                assert [chunk async for chunk in read] == [b"ok"]  # type: ignore[union-attr]
                assert (len(raw.heads), http._in_use, raw.connections) == (2, 0, 1)
            finally:
                await endpoint.shutdown()
