"""Hostile backend answers through a real gateway: bytes that are not UTF-8 or not JSON, JSON nested
beyond any parser, lying headers, error bodies of every shape, jobs documents nested to exhaust a
parser. A backend is outside the gateway's control, so none of this may cost a 500: the client gets a
502 (or the backend's own 4xx) as OpenAI-shaped JSON, and the gateway goes on serving.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server, auth, chat, start, start_gateway, write_gateway_config
from tests.support import stdout_lines

CHAT_PATH = "/local/vllm/v1/chat/completions"


@dataclass
class Script:
    """What the hostile backend answers next, to every path."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@dataclass
class Hostile:
    url: str
    script: Script


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    script = Script()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=script.status, body=script.body, headers=script.headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner, url = await start(app)
    yield Hostile(url, script)
    await runner.cleanup()


@pytest.fixture
async def gateway(hostile: Hostile, tmp_path: Path) -> AsyncIterator[Server]:
    runner, server = await start_gateway(write_gateway_config(tmp_path, hostile.url))
    yield server
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def error_of(status: int, body: bytes) -> dict[str, Any]:
    assert status != 500 and status >= 400, (status, body[:200])
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"], error
    return error


async def call(
    client: aiohttp.ClientSession, gateway: Server, path: str = CHAT_PATH, **fields: Any
) -> tuple[int, bytes]:
    async with client.post(gateway.url + path, json=chat(**fields), headers=auth()) as response:
        return response.status, await response.read()


HOSTILE_ANSWERS = {
    "not utf-8": Script(body=b'{"choices": "\xff\xfe"}'),
    "not json": Script(body=b"<html>oops</html>"),
    "nested beyond any parser": Script(body=nested(100_000)),
    "nested in usage": Script(body=b'{"usage": ' + nested(5_000) + b"}"),
    "a json string": Script(body=b'"just a string"'),
    "error not utf-8": Script(status=400, body=b'{"message": "\xff"}'),
    "error nested beyond any parser": Script(status=400, body=nested(100_000)),
    "error nested in its message": Script(status=400, body=b'{"error": {"message": ' + nested(5000) + b"}}"),
    "error 500 nested": Script(status=500, body=b'{"error": ' + nested(100_000) + b"}"),
    "error message not a string": Script(status=422, body=b'{"error": {"message": [1, {"a": null}]}}'),
    "gzip that is not gzip": Script(
        body=b"not gzip at all", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    ),
    "deflate that is not deflate": Script(
        body=b"\x00\x01\x02", headers={"Content-Type": "application/json", "Content-Encoding": "deflate"}
    ),
    "unknown encoding": Script(
        body=b"{}", headers={"Content-Type": "application/json", "Content-Encoding": "br2"}
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_ANSWERS))
async def test_hostile_answers_are_never_a_500(
    name: str, hostile: Hostile, gateway: Server, client: aiohttp.ClientSession
) -> None:
    script = HOSTILE_ANSWERS[name]
    hostile.script.__dict__.update(script.__dict__)
    status, body = await call(client, gateway)
    if status == 200:
        json.loads(body)
    else:
        error_of(status, body)
    status, body = await call(client, gateway, stream=True)
    assert status != 500, (status, body[:300])
    if status >= 400:
        error_of(status, body)
    hostile.script.__dict__.update(Script().__dict__)
    assert (await call(client, gateway))[0] == 200


@pytest.mark.parametrize(
    "body",
    [nested(100_000), b'{"running": ' + nested(5_000) + b"}", b"\xff\xfe", b"[1, 2]", b'{"running": 3}'],
)
async def test_hostile_jobs_documents_are_never_a_500(
    body: bytes, hostile: Hostile, gateway: Server, client: aiohttp.ClientSession
) -> None:
    hostile.script.body = body
    async with client.get(gateway.url + "/local/jobs", headers=auth()) as response:
        assert response.status != 500, await response.text()
        if response.status >= 400:
            error_of(response.status, await response.read())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.sampled_from(["error", "message", "detail", "object", "usage", "choices"]), _json).map(
        lambda value: json.dumps(value).encode()
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(status=st.sampled_from([200, 201, 204, 400, 401, 404, 413, 422, 429, 500, 502, 503]), body=_bodies)
async def test_any_backend_answer_is_never_a_500(
    status: int, body: bytes, hostile: Hostile, gateway: Server, client: aiohttp.ClientSession
) -> None:
    hostile.script.status, hostile.script.body = status, body
    answered, answer = await call(client, gateway)
    assert answered != 500, (status, body, answer[:300])
    if answered >= 400:
        error_of(answered, answer)


@pytest.mark.parametrize("encoding", ["deflate", "gzip"])
async def test_a_request_body_with_a_broken_content_encoding_is_a_400(
    encoding: str, gateway: Server, client: aiohttp.ClientSession
) -> None:
    headers = {**auth(), "Content-Type": "application/json", "Content-Encoding": encoding}
    async with client.post(gateway.url + CHAT_PATH, data=b"\x00not compressed", headers=headers) as response:
        assert response.status in (400, 415), await response.text()
        error_of(response.status, await response.read())


async def test_a_backend_error_page_reaches_the_record_not_the_client(
    hostile: Hostile, gateway: Server, client: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    """An error that is not the backend's structured message (an HTML page of a proxy in front of it,
    a traceback) names internal hosts: the client gets a generic message, the record the text."""
    page = b"<html><body>502 Bad Gateway: upstream gpu-node-17.internal:8000 refused</body></html>"
    hostile.script.status, hostile.script.body = 502, page
    hostile.script.headers = {"Content-Type": "text/html"}
    for stream in (False, True):
        status, body = await call(client, gateway, stream=stream)
        error = error_of(status, body)
        assert status == 502 and "gpu-node-17" not in body.decode(), body
        assert error["message"] == "The backend failed with HTTP status 502 and no error message to pass on."
    lines = await stdout_lines(capfd, lambda lines: sum("gpu-node-17" in line for line in lines) >= 2)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert sum("gpu-node-17.internal" in (record["error"] or "") for record in records) == 2
    hostile.script.body = b'{"object": "error", "message": "maximum context length is 2048 tokens"}'
    hostile.script.status = 400
    status, body = await call(client, gateway)
    assert error_of(status, body)["message"] == "maximum context length is 2048 tokens"
