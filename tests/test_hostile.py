"""Hostile input through real HTTP to a real gateway: bodies nested to exhaust the parser, bytes that
are not UTF-8, oversized headers, path tricks, model names that slugify to another model's endpoint,
CR/LF meant for headers or log lines, callbacks with forged credentials, and arbitrary JSON.

No input may cost a 500, reach a backend it does not name exactly, or leave anything but an
OpenAI-shaped error, requests aiohttp cannot even parse included.
Covered elsewhere: ordinary malformed bodies, bodies over the size limit and the two simplest path
tricks (test_routes.py), callbacks with wrong, empty or forged secrets and tokens (test_relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testing.fake_vllm import REQUESTS
from tests.conftest import CHAT_MODEL, PRIVATE_MODEL, TOKENS, Server, auth, chat, free_port, start_gateway
from tests.processes import gateway_process
from tests.support import stdout_lines, write_gateway_config
from tests.test_corpus_http import with_served_model
from tests.test_schemas import VALID, json_values, paths, replaced

SECRET = "hostile-secret-0123456789"
CHAT_PATH = "/local/vllm/v1/chat/completions"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    raw_head: bytes
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        error: dict[str, Any] = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        return error


@pytest.fixture
async def gateway(backend: Server, tmp_path: Path) -> AsyncIterator[Server]:
    """The usual test gateway, with streaming callbacks configured."""
    config = write_gateway_config(tmp_path, backend.url, max_body_bytes=1_000_000)
    document = yaml.safe_load(config.read_text())
    document["streaming"] = {"internal_secret": SECRET}
    config.write_text(yaml.safe_dump(document))
    runner, server = await start_gateway(config)
    yield server
    await runner.cleanup()


async def send(gateway: Server, request: bytes) -> Answer:
    """Bytes as they are, on a fresh connection that the request asks to close: aiohttp's client
    would refuse to send most of these."""
    host, port = gateway.url.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, head, body)


def post(path: str, body: bytes, *, token: str = TOKENS["alice"], extra: bytes = b"") -> bytes:
    return (
        (
            f"POST /resource_server{path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n" + extra + b"\r\n"


async def still_serving(gateway: Server) -> None:
    answer = await send(gateway, post(CHAT_PATH, json.dumps(chat()).encode()))
    assert answer.status == 200 and json.loads(answer.body)["object"] == "chat.completion"


def nested(opening: bytes, closing: bytes, depth: int) -> bytes:
    return opening * depth + b"1" + closing * depth


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        nested(b"[", b"]", 100_000),
        nested(b'{"a":', b"}", 100_000),
        b'{"model": "x", "messages": ' + nested(b"[", b"]", 100_000) + b"}",
    ],
    ids=["unclosed-arrays", "arrays", "objects", "in-a-field"],
)
async def test_json_nested_beyond_any_parser_is_400(gateway: Server, body: bytes) -> None:
    answer = await send(gateway, post(CHAT_PATH, body))
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_json"
    await still_serving(gateway)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("depth", [900, 960, 980, 990, 1000, 5000])
async def test_json_nested_near_the_parsers_limit_in_free_form_fields(
    gateway: Server, depth: int, stream: bool
) -> None:
    """Fields the schema leaves free are forwarded as JSON again: the depth the parser accepted must
    not fail later, when the body is encoded for the backend."""
    for path, body, field in [
        (CHAT_PATH, chat(stream=stream), "guided_json"),
        (CHAT_PATH, chat(stream=stream), "chat_template_kwargs"),
        ("/local/vllm/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "stream": stream}, "guided_json"),
    ]:
        raw = json.dumps(body)[:-1].encode() + f', "{field}": '.encode() + nested(b'{"a":', b"}", depth)
        answer = await send(gateway, post(path, raw + b"}"))
        assert answer.status in (200, 400), (path, field, answer)
        if answer.status == 400:
            assert answer.error()["code"] == "invalid_json"


async def test_bytes_that_are_not_utf8(gateway: Server) -> None:
    """In the body (a JSON string that is not UTF-8) and in credentials, where a 500 was the answer."""
    answer = await send(gateway, post(CHAT_PATH, b'{"model": "\xff\xfe", "messages": []}'))
    assert (answer.status, answer.error()["code"]) == (400, "invalid_json")
    for token in (b"\xff\xfe\xfd-token", b"alice-token-0001\x80"):
        request = get(b"/resource_server/whoami", b"Authorization: Bearer " + token + b"\r\n")
        answer = await send(gateway, request)
        assert answer.status == 401 and answer.error()["type"] == "authentication_error"
    await still_serving(gateway)


async def test_oversized_request_heads_are_refused_and_the_gateway_goes_on(gateway: Server) -> None:
    """aiohttp refuses these before any route runs (8190 bytes a line, 128 headers); the answer is
    still OpenAI-shaped (proxy/edge/malformed.py). nginx in front refuses them first."""
    for request in [
        get(b"/resource_server/health", b"X-Big: " + b"a" * 20_000 + b"\r\n"),
        get(b"/resource_server/health", b"".join(b"X-H%d: 1\r\n" % n for n in range(200))),
        get(b"/resource_server/health?" + b"q" * 20_000),
        get(b"/resource_server/" + b"a" * 20_000),
    ]:
        answer = await send(gateway, request)
        assert answer.status == 400
        assert answer.error()["code"] == "malformed_request"
        assert b"aaaa" not in answer.body and b"qqqq" not in answer.body
    answer = await send(gateway, get(b"/resource_server/health", b"X-Big: " + b"a" * 7_000 + b"\r\n"))
    assert answer.status == 200
    await still_serving(gateway)


PATH_TRICKS = [
    b"/resource_server/..%2fresource_server/local/vllm/v1/chat/completions",
    b"/resource_server/local/..%2f..%2f/v1/chat/completions",
    b"/resource_server/%2e%2e/vllm/v1/chat/completions",
    b"/resource_server/local%00/vllm/v1/chat/completions",
    b"/resource_server/local/vllm%00/v1/chat/completions",
    b"/resource_server/local%252fvllm/vllm/v1/chat/completions",
    b"/resource_server/local/vllm%252f/v1/chat/completions",
    b"/resource_server/%6c%6f%63%61%6c/%76%6c%6c%6d/v1/chat%2fcompletions",
    b"/resource_server/l%D0%BEcal/vllm/v1/chat/completions",  # Cyrillic o
    b"/resource_server/%EF%BD%8C%EF%BD%8F%EF%BD%83%EF%BD%81%EF%BD%8C/vllm/v1/chat/completions",  # fullwidth
    b"/resource_server/LOCAL/VLLM/v1/chat/completions",
    b"/resource_server/local/vllm/v1/chat/completions/..",
    b"/resource_server/local/vllm/v1/chat/./completions",
    b"/resource_server/uni%2f..%2flocal/vllm/v1/chat/completions",
    b"/resource_server/local/vllm/v1/chat/completions%00",
    b"/resource_server/loc\xc3\xa1l/vllm/v1/chat/completions",
]


@pytest.mark.parametrize("path", PATH_TRICKS, ids=range(len(PATH_TRICKS)))
async def test_path_tricks_never_reach_a_backend(gateway: Server, backend: Server, path: bytes) -> None:
    """Only the exact cluster and framework names route: a decoded, doubly encoded, NUL-ended or
    look-alike name is another name, and ends in a 4xx before any backend is asked."""
    body = json.dumps(chat()).encode()
    request = post("", body).replace(b"POST /resource_server HTTP", b"POST " + path + b" HTTP")
    before = len(backend.app[REQUESTS])
    answer = await send(gateway, request)
    assert 400 <= answer.status < 500, answer
    answer.error()
    assert len(backend.app[REQUESTS]) == before


LOOK_ALIKES = [
    "meta-llamameta-llama-31-8b-instruct",
    "meta llama/meta llama 3.1 8b instruct",
    "meta-llama/Meta-Llama-3.1-8B-Instruct!",
    "meta-llama/Meta-Llama-3.1-8B-Instruct\u200b",
    "meta-llama/Meta-Llama-3.1-8B-\uff29nstruct",
    "m\u00e9ta-llama/Meta-Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-8B-Instruct\r\n",
    "-meta-llama/Meta-Llama-3.1-8B-Instruct_",
    PRIVATE_MODEL.replace("/", ""),
]


@pytest.mark.parametrize("model", LOOK_ALIKES)
async def test_a_model_name_that_only_slugifies_alike_is_another_model(
    gateway: Server, backend: Server, model: str
) -> None:
    """Endpoints are keyed by Django's slug, which drops and folds characters: the name must still
    be the endpoint's own, or the backend is asked for a model the access lists never saw."""
    before = len(backend.app[REQUESTS])
    answer = await send(gateway, post(CHAT_PATH, json.dumps(chat(model=model)).encode()))
    assert answer.status == 404 and answer.error()["code"] == "model_not_found"
    assert len(backend.app[REQUESTS]) == before


async def test_the_case_of_a_model_name_does_not_matter(gateway: Server, backend: Server) -> None:
    """As in the existing gateway, whose slug lowercases the model."""
    answer = await send(gateway, post(CHAT_PATH, json.dumps(chat(model=CHAT_MODEL.upper())).encode()))
    assert answer.status == 200
    assert backend.app[REQUESTS][-1]["body"]["model"] == CHAT_MODEL.upper()


INJECTIONS = ["x\r\nX-Injected: 1", "x\nX-Injected: 1", "x\rX-Injected: 1", "x\r\n\r\nHTTP/1.1 200 OK"]


@pytest.mark.parametrize("model", INJECTIONS)
async def test_cr_and_lf_in_a_model_reach_no_header_and_no_log_line(
    gateway: Server, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, model: str
) -> None:
    capfd.readouterr()
    for path in (CHAT_PATH, "/local/vllm/v1/embeddings"):
        body = {"model": model, "input": "x"} if "embeddings" in path else chat(model=model)
        answer = await send(gateway, post(path, json.dumps(body).encode()))
        assert answer.status == 404 and answer.error()["param"] == "model"
        assert b"X-Injected" not in answer.raw_head and answer.raw_head.count(b"HTTP/1.1") == 1
    lines = await stdout_lines(capfd, until=lambda lines: len(lines) >= 2)
    assert len(lines) == 2 and all(json.loads(line)["status"] == 404 for line in lines)
    assert not any("\n" in record.getMessage() or "\r" in record.getMessage() for record in caplog.records)


async def test_cr_in_a_header_value_is_refused_before_it_is_echoed(gateway: Server) -> None:
    """The request id is the one client value the gateway puts in a response header."""
    answer = await send(gateway, get(b"/resource_server/health", b"X-Request-ID: a\rX-Injected: 1\r\n"))
    assert answer.status == 400 and b"X-Injected" not in answer.raw_head
    answer = await send(gateway, get(b"/resource_server/health", b"X-Request-ID: a:b.c-d_e\r\n"))
    assert answer.status == 200 and answer.headers["x-request-id"] == "a:b.c-d_e"


CALLBACK = "/api/streaming/data/"


@pytest.mark.parametrize(
    "headers, body, status, code",
    [
        (b"", b'{"task_id": "x", "data": "x"}', 401, "invalid_secret"),
        (b"X-Internal-Secret: \xff\xfe\r\nX-Stream-Task-Token: t\r\n", b"{}", 401, "invalid_secret"),
        (b"X-Internal-Secret: " + SECRET.encode() + b"x\r\nX-Stream-Task-Token: t\r\n", b"{}", 401, None),
        (b"X-Internal-Secret: " + SECRET.encode() + b"\r\n", b"{}", 401, "invalid_stream_token"),
        (
            b"X-Internal-Secret: " + SECRET.encode() + b"\r\nX-Stream-Task-Token: \xff\r\n",
            b'{"task_id": "x", "data": "x"}',
            401,
            "invalid_stream_token",
        ),
        (
            b"X-Internal-Secret: " + SECRET.encode() + b"\r\nX-Stream-Task-Token: t\r\n",
            b"{not json",
            400,
            "invalid_json",
        ),
        (
            b"X-Internal-Secret: " + SECRET.encode() + b"\r\nX-Stream-Task-Token: t\r\n",
            nested(b"[", b"]", 70_000),
            400,
            "invalid_json",
        ),
    ],
    ids=["no-secret", "secret-not-utf8", "secret-longer", "no-token", "token-not-utf8", "not-json", "deep"],
)
async def test_callbacks_with_hostile_credentials_or_bodies(
    gateway: Server, headers: bytes, body: bytes, status: int, code: str | None
) -> None:
    request = post(CALLBACK, body, token="unused").replace(b"Authorization: Bearer unused\r\n", headers)
    answer = await send(gateway, request)
    assert answer.status == status
    error = answer.error()
    assert code is None or error["code"] == code


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKENS['alice']}"}) as session:
        yield session


async def answers_without_a_server_error(
    client: aiohttp.ClientSession, gateway: Server, route: str, body: Any
) -> None:
    """Any body gets an answer below 500, and an error is OpenAI-shaped JSON."""
    data = json.dumps(with_served_model(route, body), allow_nan=False)
    headers = {"Content-Type": "application/json"}
    async with client.post(f"{gateway.url}/local/vllm/v1/{route}", data=data, headers=headers) as response:
        assert response.status < 500, (route, body, await response.text())
        if response.status >= 400:
            error = (await response.json())["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]


def _finite(value: Any) -> bool:
    """JSON has no NaN or infinities: aiohttp's client could not send them."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


finite_json = json_values.filter(_finite)
ROUTES = sorted({route for route, _ in VALID})
HTTP_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HTTP_SETTINGS
@given(route=st.sampled_from(ROUTES), body=finite_json)
async def test_any_json_value_through_http(
    gateway: Server, client: aiohttp.ClientSession, route: str, body: Any
) -> None:
    await answers_without_a_server_error(client, gateway, route, body)


@HTTP_SETTINGS
@given(case=st.sampled_from(VALID), data=st.data(), value=finite_json)
async def test_near_valid_bodies_through_http(
    gateway: Server, client: aiohttp.ClientSession, case: tuple[str, dict[str, Any]], data: Any, value: Any
) -> None:
    """A valid body of each path with one value anywhere in it swapped for arbitrary JSON."""
    route, body = case
    path = data.draw(st.sampled_from(paths(body)))
    await answers_without_a_server_error(client, gateway, route, replaced(body, path, value))


SLOW_CLIENTS = 200
KEEPALIVE_SECONDS = 2.0


async def dribble(port: int, closed: list[float]) -> None:
    """A slowloris: a request head, one byte every 0.2 s, never finished; notes when it is cut off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /resource_server/health HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        while not reader.at_eof():
            writer.write(b"a")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1024), 0.2)
    except ConnectionError:
        pass
    finally:
        closed.append(time.monotonic())
        writer.close()


@pytest.mark.alone("hundreds of slow clients, and a request among them answered within 1 s")
async def test_slowloris_neither_stops_others_nor_holds_connections_forever(
    backend: Server, tmp_path: Path
) -> None:
    """Connections whose request head never ends cost the gateway little while they last, and the
    keep-alive timer, which aiohttp arms when a connection opens and after each response, closes them
    (so `timeouts.keepalive_seconds` is also the limit on a request head; nginx's client_header_timeout
    plays that part in front of it)."""
    port = free_port()
    config = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(config.read_text())
    document["timeouts"]["keepalive_seconds"] = KEEPALIVE_SECONDS
    config.write_text(yaml.safe_dump(document))
    url = f"http://127.0.0.1:{port}/resource_server"
    async with gateway_process(config, port=port), aiohttp.ClientSession() as http:
        closed: list[float] = []
        started = time.monotonic()
        slow = [asyncio.ensure_future(dribble(port, closed)) for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.5)
        for _ in range(10):
            asked = time.monotonic()
            async with http.post(f"{url}{CHAT_PATH}", json=chat(), headers=auth()) as response:
                assert response.status == 200
            assert time.monotonic() - asked < 1.0, "a normal request waited behind the slow clients"
        await asyncio.wait_for(asyncio.gather(*slow), KEEPALIVE_SECONDS + 10)
    assert len(closed) == SLOW_CLIENTS
    assert all(moment - started >= KEEPALIVE_SECONDS - 0.5 for moment in closed)


MALFORMED_HEADS = [
    b"Authorization: Bearer leaked-token-0001\x01x\r\n",
    b"Authorization Bearer leaked-token-0002\r\n",
    b"X Bad: leaked-token-0003\r\n",
    b"Authorization: Bearer leaked-token-0004\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
    b"Authorization: Bearer leaked-token-0005\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"Authorization: Bearer leaked-token-0006\r\n\x00: leaked-token-0006\r\n",
]


@pytest.mark.parametrize("head", MALFORMED_HEADS)
async def test_requests_aiohttp_cannot_parse_leave_no_token_in_the_answer_or_the_log(
    backend: Server, tmp_path: Path, head: bytes
) -> None:
    """aiohttp would answer in plain text quoting the offending line (up to ~100 bytes of it, a token
    included), and log it with a traceback, for every such request."""
    port = free_port()
    config = write_gateway_config(tmp_path, backend.url)
    async with gateway_process(config, port=port) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /resource_server/local/vllm/v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + head + b"\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head_bytes, _, body = answer.partition(b"\r\n\r\n")
        assert b" 400 " in head_bytes.split(b"\r\n", 1)[0], answer
        assert b"content-type: application/json" in head_bytes.lower(), answer
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "malformed_request")
        assert b"leaked-token" not in answer
        deadline = time.monotonic() + 5
        while "refused a malformed request" not in gateway.log_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log = gateway.log_text()
    assert "refused a malformed request from 127.0.0.1" in log
    assert "leaked-token" not in log and "Traceback" not in log
