"""A stream's request leaves as the adaptor is called (adaptors/http_stream.py `StreamStart`) when
a pooled connection is free, and only then: a request that must wait for a place or a new
connection waits where the keep-alive covers it. A request sent and then never read gives its
connection up, whether it is closed or merely dropped."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor

from adaptors.context import AdaptorContext
from adaptors.direct_api import DirectAPIEndpoint
from adaptors.http_client import HTTPClient
from tests.test_http_client import Raw, eventually, fetch, lean_client, raw_server

BODY = b'{"model":"m","stream":true}'


async def test_on_an_idle_connection_the_request_leaves_before_anything_reads_it() -> None:
    async with raw_server() as raw, lean_client() as client:
        assert await fetch(client, raw.url) == b"ok"
        start = client.start_stream("POST", raw.url, BODY, timeout=5)
        await eventually(lambda: len(raw.heads) == 2)
        stream = await start.opened()
        assert (stream.status, await stream.next_piece(), await stream.next_piece()) == (200, b"ok", None)
        assert raw.connections == 1 and client._in_use == 0


async def test_a_request_sent_at_once_that_the_servers_close_overtook_goes_again() -> None:
    """Sent at once on a reused connection that the server closes as it arrives: nothing of an
    answer came, so it is sent once more, on a new connection, as the stream is opened."""

    async def closes_the_second(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        if number == 1:
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with raw_server() as raw, lean_client() as client:
        raw.script = closes_the_second
        assert await fetch(client, raw.url) == b"ok"
        start = client.start_stream("POST", raw.url, BODY, timeout=5)
        await eventually(lambda: len(raw.heads) == 2)
        stream = await start.opened()
        assert (stream.status, await stream.next_piece()) == (200, b"ok")
        assert (raw.connections, len(raw.heads)) == (2, 3)


async def test_without_an_idle_connection_the_request_waits_to_be_opened() -> None:
    """A new connection would be a wait: it happens when the stream is first read."""
    async with raw_server() as raw, lean_client() as client:
        start = client.start_stream("POST", raw.url, BODY, timeout=5)
        await asyncio.sleep(0.1)
        assert (raw.connections, raw.heads, client._in_use) == (0, [], 0)
        assert (await start.opened()).status == 200
        assert raw.connections == 1


async def test_at_the_pools_bound_the_request_waits_for_a_place_when_opened() -> None:
    async def slow(server: Raw, writer: asyncio.StreamWriter, number: int) -> bool:
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    async with raw_server() as raw:
        raw.script = slow
        client = HTTPClient(1)
        try:
            assert await fetch(client, raw.url) == b"ok"  # one idle connection, then the only place taken
            busy = asyncio.ensure_future(fetch(client, raw.url))
            await eventually(lambda: len(raw.heads) == 2)
            start = client.start_stream("POST", raw.url, BODY, timeout=5)
            await asyncio.sleep(0.05)
            assert len(raw.heads) == 2, "sent with no place free"
            stream = await start.opened()
            assert await busy == b"ok" and (stream.status, len(raw.heads)) == (200, 3)
            assert await stream.next_piece() == b"ok"
        finally:
            await client.close()


async def test_a_request_sent_and_given_up_unread_frees_its_connection() -> None:
    async with raw_server() as raw, lean_client() as client:
        assert await fetch(client, raw.url) == b"ok"
        start = client.start_stream("POST", raw.url, BODY, timeout=5)
        assert client._in_use == 1
        start.close()
        assert client._in_use == 0 and not any(client._idle.values())
        await eventually(lambda: raw.ended == 1)


async def test_a_stream_the_adaptor_opened_and_nobody_read_frees_its_connection_when_dropped() -> None:
    """An error between the adaptor's call and the first read drops the stream unstarted: no
    generator's `finally` runs then, and the connection must still not stay counted in use."""
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
                opened = await endpoint.submit_streaming_task(data, "request-1")
                await eventually(lambda: len(raw.heads) == 2)
                assert http._in_use == 1
                del opened
                gc.collect()
                assert http._in_use == 0
                await eventually(lambda: raw.ended == 1)
            finally:
                await endpoint.shutdown()
