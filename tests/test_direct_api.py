"""The direct-API adaptor against the real fake backend: forwarding, error mapping, streaming."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adaptors.context import AdaptorContext
from adaptors.direct_api import DirectAPIEndpoint
from proxy.core.state import STATE
from testing.fake_vllm import ACTIVE_STREAMS, DISCONNECTS, REQUESTS
from tests.conftest import CHAT_MODEL, Server, auth, chat
from tests.support import value
from tests.test_routes import assert_openai_error, call


def chat_url(gateway: Server) -> str:
    return f"{gateway.url}/local/vllm/v1/chat/completions"


async def wait_for(condition: Any, seconds: float = 1.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_forwards_exactly_the_clients_fields(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    body = chat("Hi", temperature=0.2, top_k=5, chat_template_kwargs={"enable_thinking": False})
    status, document, _ = await call(http, "POST", chat_url(gateway), json=body, headers=auth())
    assert status == 200
    assert document["object"] == "chat.completion" and document["model"] == CHAT_MODEL
    forwarded = backend.app[REQUESTS][-1]
    assert forwarded["path"] == "/v1/chat/completions"
    assert forwarded["body"] == body
    assert "Authorization" not in forwarded["headers"]


async def test_the_clients_bytes_are_forwarded_as_they_came(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    """Nothing to change in them: not encoded again, so spacing, key order and escapes stay."""
    sent = json.dumps({"max_tokens": 4, **chat("h\u00e9llo \u2028")}, indent=1).encode()
    headers = {**auth(), "Content-Type": "application/json"}
    status, _, _ = await call(http, "POST", chat_url(gateway), data=sent, headers=headers)
    assert status == 200
    assert backend.app[REQUESTS][-1]["raw"] == sent


@pytest.mark.parametrize(
    "sent, expected",
    [
        # orjson cannot say what these mean as the standard library reads them: encoded again
        (
            b'{"chat_template_kwargs":{"n":12345678901234567890123,"x":1e400}',
            {"chat_template_kwargs": {"n": 12345678901234567890123, "x": float("inf")}},
        ),
        (b'{"user":"\\ud800"', {"user": "\ud800"}),
        (b'\xef\xbb\xbf{"user": "bom"', {"user": "bom"}),
    ],
    ids=["big-integer-and-infinity", "lone-surrogate", "byte-order-mark"],
)
async def test_a_body_orjson_cannot_read_is_encoded_as_before(
    gateway: Server, backend: Server, http: aiohttp.ClientSession, sent: bytes, expected: dict[str, Any]
) -> None:
    fields = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]})
    body = sent + b", " + fields[1:].encode()
    headers = {**auth(), "Content-Type": "application/json"}
    status, _, _ = await call(http, "POST", chat_url(gateway), data=body, headers=headers)
    assert status == 200
    forwarded = backend.app[REQUESTS][-1]
    assert forwarded["raw"] != body
    assert {key: forwarded["body"][key] for key in expected} == expected


async def test_a_stream_asked_for_its_usage_is_encoded_once_with_it(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    sent = json.dumps(chat("Hi", stream=True), indent=1).encode()
    headers = {**auth(), "Content-Type": "application/json"}
    async with http.post(chat_url(gateway), data=sent, headers=headers) as response:
        assert response.status == 200
        await response.read()
    forwarded = backend.app[REQUESTS][-1]
    assert forwarded["body"] == {**json.loads(sent), "stream_options": {"include_usage": True}}
    assert b"\n" not in forwarded["raw"]


async def test_completions_and_embeddings(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    url = f"{gateway.url}/local/vllm/v1/completions"
    status, document, _ = await call(
        http, "POST", url, json={"model": CHAT_MODEL, "prompt": "x"}, headers=auth()
    )
    assert (status, document["object"]) == (200, "text_completion")
    url = f"{gateway.url}/local/vllm/v1/embeddings"
    body = {"model": "intfloat/e5-small-v2", "input": ["a", "b"]}
    status, document, _ = await call(http, "POST", url, json=body, headers=auth())
    assert status == 200 and len(document["data"]) == 2
    assert backend.app[REQUESTS][-1]["path"] == "/v1/embeddings"


@pytest.mark.parametrize(
    "upstream, expected", [(400, 400), (404, 404), (422, 422), (429, 429), (500, 502), (503, 503)]
)
async def test_upstream_status_is_mapped(
    gateway: Server, http: aiohttp.ClientSession, upstream: int, expected: int
) -> None:
    for stream in (False, True):
        body = chat(f"[[status={upstream}]]", stream=stream)
        status, document, _ = await call(http, "POST", chat_url(gateway), json=body, headers=auth())
        assert status == expected
        assert assert_openai_error(document)["message"] == f"fake backend error {upstream}"


async def test_connection_refused_is_502(gateway: Server, http: aiohttp.ClientSession) -> None:
    for stream in (False, True):
        body = chat(model="dead/model", stream=stream)
        status, document, _ = await call(http, "POST", chat_url(gateway), json=body, headers=auth())
        assert status == 502
        error = assert_openai_error(document)
        assert error["type"] == "upstream_error" and "Cannot reach the backend" in error["message"]


async def test_timeout_is_504_not_408(gateway: Server, http: aiohttp.ClientSession) -> None:
    for stream in (False, True):
        body = chat("[[delay=3]]", model="slow/model", stream=stream)
        status, document, _ = await call(http, "POST", chat_url(gateway), json=body, headers=auth())
        assert status == 504
        assert "0.5 seconds" in assert_openai_error(document)["message"]


async def test_invalid_json_from_backend_is_502(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(
        http, "POST", chat_url(gateway), json=chat("[[garbage]]"), headers=auth()
    )
    assert status == 502
    assert "invalid JSON" in assert_openai_error(document)["message"]


async def test_backend_dying_before_an_answer_is_502(gateway: Server, http: aiohttp.ClientSession) -> None:
    """A stream that fails before its first byte still gets a plain status, not an event."""
    for stream in (False, True):
        body = chat("[[die_after=0]]", stream=stream)
        status, document, response = await call(http, "POST", chat_url(gateway), json=body, headers=auth())
        assert status == 502
        assert response.content_type == "application/json"
        assert assert_openai_error(document)["type"] == "upstream_error"


async def read_events(response: aiohttp.ClientResponse) -> list[str]:
    text = (await response.read()).decode()
    return [event for event in text.split("\n\n") if event]


async def test_stream_headers_and_events(gateway: Server, http: aiohttp.ClientSession) -> None:
    body = chat("[[chunks=4]]", stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        events = await read_events(response)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)


async def test_first_chunk_arrives_while_the_backend_still_generates(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    body = chat("[[chunks=3]][[chunk_delay=0.3]]", stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        first = await response.content.readany()
        assert first.startswith(b"data: ")
        assert backend.app[ACTIVE_STREAMS] == 1
        rest = await response.read()
    assert rest.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("prompt", ["[[chunks=200]][[chunk_delay=0.05]]", "[[chunks=2]][[chunk_delay=30]]"])
async def test_client_disconnect_closes_the_upstream_request(
    gateway: Server, backend: Server, http: aiohttp.ClientSession, prompt: str
) -> None:
    response = await http.post(chat_url(gateway), json=chat(prompt, stream=True), headers=auth())
    assert await response.content.readany()
    assert backend.app[ACTIVE_STREAMS] == 1
    response.close()
    assert await wait_for(lambda: backend.app[DISCONNECTS] == 1, seconds=1.0)
    assert backend.app[ACTIVE_STREAMS] == 0


async def test_backend_dying_mid_stream_ends_with_an_error_event(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    body = chat("[[chunks=5]][[die_after=2]]", stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        assert response.status == 200
        events = await read_events(response)
    assert len(events) == 3
    error = json.loads(events[-1].removeprefix("data: "))
    assert error["error"]["code"] is None
    assert error["error"]["type"] == "upstream_error"
    assert "closed the stream" in error["error"]["message"]


async def test_silent_backend_mid_stream_ends_with_a_timeout_event(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    body = chat("[[chunks=3]][[chunk_delay=5]]", model="slow/model", stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        events = await read_events(response)
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["type"] == "timeout_error" and "0.5 seconds" in error["message"]


async def test_a_slow_reader_holds_back_the_backend_and_loses_nothing(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    """Backpressure: the gateway must not buffer a stream the client is not reading. The backend
    could send these ~30 MB in well under a second if nothing held it back."""
    body = chat("[[chunks=20000]]", n=8, stream=True)
    async with http.post(chat_url(gateway), json=body, headers=auth()) as response:
        received = await response.content.readany()
        await asyncio.sleep(1.0)
        assert backend.app[ACTIVE_STREAMS] == 1, "the backend finished: someone buffered the stream"
        received += await response.read()
    assert received.endswith(b"data: [DONE]\n\n")
    assert received.count(b'"index":7') >= 20000


async def test_backend_errors_by_kind_in_metrics(gateway: Server, http: aiohttp.ClientSession) -> None:
    cases = [
        ("dead/model", "Hi", "connect"),
        ("slow/model", "[[delay=3]]", "timeout"),
        (CHAT_MODEL, "[[status=404]]", "4xx"),
        (CHAT_MODEL, "[[status=500]]", "5xx"),
    ]
    for model, prompt, _ in cases:
        await call(http, "POST", chat_url(gateway), json=chat(prompt, model=model), headers=auth())
    text = gateway.app[STATE].metrics.exposition().decode()
    for model, _, kind in cases:
        assert value(text, "gateway_upstream_errors_total", model=model, kind=kind) == 1, (model, kind)


async def test_a_cookie_one_answer_sets_never_goes_out_with_later_requests() -> None:
    """The adaptor's session is shared by every user of the endpoint: a backend's Set-Cookie (a load
    balancer's session cookie, say) must not travel with anyone's next request."""
    cookies_seen: list[str | None] = []

    async def chat_completions(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        response = web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        response.set_cookie("session", "alice-only")
        return response

    backend = web.Application()
    backend.router.add_post("/v1/chat/completions", chat_completions)
    runner = web.AppRunner(backend)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    endpoint = DirectAPIEndpoint(
        "1", "local-vllm-m", "local", "vllm", "m", "adaptors.direct_api.DirectAPIEndpoint",
        config={"api_url": f"http://127.0.0.1:{port}/v1"},
    )  # fmt: skip
    with ThreadPoolExecutor(1) as executor:
        await endpoint.startup(AdaptorContext(executor=executor, relay=None))  # type: ignore[arg-type]
        try:
            for _ in range(2):
                data = {"model_params": {"model": "m", "messages": [], "openai_endpoint": "chat/completions"}}
                answer = await endpoint.submit_task(data)
                assert answer.error_code is None, answer
        finally:
            await endpoint.shutdown()
            await runner.cleanup()
    assert cookies_seen == [None, None]
