"""The Globus Compute function `compute-functions/vllm_inference.py`, run for real in a thread against the
fake vLLM and a recording stand-in for the gateway's streaming callback routes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adaptors.remote_errors import RemoteFailure, remote_error
from testing.fake_vllm import ACTIVE_STREAMS, DISCONNECTS, REQUESTS
from tests.conftest import CHAT_MODEL, EMBED_MODEL, Server, chat, closed_port_url, start
from tests.support import self_signed_certificate

MODULE_PATH = Path(__file__).resolve().parents[1] / "compute-functions" / "vllm_inference.py"
SECRET = "internal-secret-for-tests"
TOKEN = "stream-token-0123"
TASK_ID = "task-0001"
GATEWAY_KEYS = {
    "openai_endpoint",
    "api_port",
    "streaming_server_host",
    "streaming_server_port",
    "streaming_server_protocol",
    "stream_task_id",
    "stream_task_token",
}


def load_function() -> Callable[[dict[str, Any]], str]:
    """Loaded from its file under a private name: the folder is not a package, and the function must
    not rely on being importable anyway."""
    spec = importlib.util.spec_from_file_location("vllm_inference_under_test", MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vllm_inference  # type: ignore[no-any-return]


vllm_inference = load_function()


@dataclass
class Post:
    route: str
    headers: dict[str, str]
    body: dict[str, Any]
    size: int
    at: float

    @property
    def lines(self) -> list[str]:
        return str(self.body["data"]).split("\n")


@dataclass
class Receiver:
    """The gateway's callback routes: records every POST; answers `gone_status` to data posts after
    `gone_after` of them."""

    port: int = 0
    protocol: str = "http"
    posts: list[Post] = field(default_factory=list)
    gone_after: int | None = None
    gone_status: int = 410

    def data(self) -> list[Post]:
        return [post for post in self.posts if post.route == "data"]

    def routes(self) -> list[str]:
        return [post.route for post in self.posts]

    def lines(self) -> list[str]:
        return [line for post in self.data() for line in post.lines]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        route = request.match_info["route"]
        self.posts.append(Post(route, dict(request.headers), json.loads(raw), len(raw), time.monotonic()))
        if route == "data" and self.gone_after is not None and len(self.data()) > self.gone_after:
            return web.json_response({"error": "gone"}, status=self.gone_status)
        return web.json_response({"status": "received"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/resource_server/api/streaming/{route}/", self.handle)
        return app


async def start_receiver(receiver: Receiver, **runner_options: Any) -> web.AppRunner:
    runner = web.AppRunner(receiver.app(), handler_cancellation=True, access_log=None, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=runner_options.get("ssl_context")).start()
    receiver.port = runner.addresses[0][1]
    return runner


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    runner = await start_receiver(receiver)
    yield receiver
    await runner.cleanup()


@pytest.fixture(autouse=True)
def endpoint_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERNAL_STREAMING_SECRET", SECRET)
    for name in ("VLLM_HOST", "VLLM_TIMEOUT", "STREAMING_CALLBACK_TIMEOUT", "STREAMING_CALLBACK_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def parameters(
    backend_url: str,
    body: dict[str, Any],
    endpoint: str = "chat/completions",
    receiver: Receiver | None = None,
) -> dict[str, Any]:
    """What the gateway submits: the client's fields plus its own keys."""
    model_params = {**body, "openai_endpoint": endpoint, "api_port": port_of(backend_url)}
    if receiver is not None:
        model_params |= {
            "streaming_server_host": "127.0.0.1",
            "streaming_server_port": receiver.port,
            "streaming_server_protocol": receiver.protocol,
            "stream_task_id": TASK_ID,
            "stream_task_token": TOKEN,
        }
    return {"model_params": model_params}


async def run(document: dict[str, Any]) -> str:
    return await asyncio.to_thread(vllm_inference, document)


async def wait_until(condition: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached within {within} s"
        await asyncio.sleep(0.01)


def normalized(lines: list[str]) -> list[str]:
    """Two streams of the fake backend differ only in their ids and timestamps."""
    return [
        re.sub(r'"created":\d+', '"created":0', re.sub(r'"id":"[^"]*"', '"id":""', line)) for line in lines
    ]


async def direct_stream_lines(backend: Server, body: dict[str, Any]) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{backend.url}/v1/chat/completions", json=body) as response,
    ):
        return [line for line in (await response.text()).split("\n") if line]


# ---- non-streaming ---------------------------------------------------------------------------


async def test_chat_returns_the_answer_with_timings_as_a_json_string(backend: Server) -> None:
    body = chat("Hello", max_tokens=8, temperature=0.5)
    result = await run(parameters(backend.url, body))

    assert isinstance(result, str)
    answer = json.loads(result)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"]
    assert answer["response_time"] > 0
    expected = answer["usage"]["completion_tokens"] / answer["response_time"]
    assert answer["throughput_tokens_per_second"] == pytest.approx(expected)
    forwarded = backend.app[REQUESTS][-1]
    assert forwarded["path"] == "/v1/chat/completions"
    assert forwarded["body"] == body  # the gateway's keys stay behind, the client's fields go as they are


async def test_given_the_callback_details_the_answer_is_pushed_then_returned(
    backend: Server, receiver: Receiver
) -> None:
    body = chat("Hello")
    result = await run(parameters(backend.url, body, receiver=receiver))

    (post,) = receiver.posts
    assert post.route == "data"
    assert post.headers["X-Internal-Secret"] == SECRET
    assert post.headers["X-Stream-Task-Token"] == TOKEN
    assert post.body == {"task_id": TASK_ID, "data": "data: " + result, "type": "result"}
    assert backend.app[REQUESTS][-1]["body"] == body


async def test_a_refused_push_or_no_secret_still_returns_the_answer(
    backend: Server, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.gone_after = 0
    refused = await run(parameters(backend.url, chat("Hello"), receiver=receiver))
    assert json.loads(refused)["choices"] and len(receiver.posts) == 1

    monkeypatch.delenv("INTERNAL_STREAMING_SECRET")
    unpushed = await run(parameters(backend.url, chat("Hello"), receiver=receiver))
    assert json.loads(unpushed)["choices"] and len(receiver.posts) == 1, "no secret, no push"


async def test_an_answer_over_the_data_limit_is_not_pushed(backend: Server, receiver: Receiver) -> None:
    """Its task result carries it; a push would only be refused (413)."""
    body = {"model": EMBED_MODEL, "input": ["text"] * 3000}
    result = await run(parameters(backend.url, body, "embeddings", receiver=receiver))
    assert len(result) > 150_000
    assert receiver.posts == []


async def test_embeddings_and_completions_are_forwarded_to_their_path(backend: Server) -> None:
    embedded = json.loads(
        await run(parameters(backend.url, {"model": EMBED_MODEL, "input": "hi"}, "embeddings"))
    )
    completed = json.loads(
        await run(parameters(backend.url, {"model": CHAT_MODEL, "prompt": "Once"}, "/v1/completions/"))
    )

    assert embedded["data"][0]["object"] == "embedding"
    assert embedded["throughput_tokens_per_second"] == 0
    assert completed["object"] == "text_completion"
    assert [request["path"] for request in backend.app[REQUESTS]] == ["/v1/embeddings", "/v1/completions"]


async def test_a_vllm_error_raises_with_the_status_and_body_that_the_gateway_parses(backend: Server) -> None:
    with pytest.raises(RuntimeError) as failure:
        await run(parameters(backend.url, chat("[[status=400]] too long")))

    text = str(failure.value)
    assert "API request failed with status code: 400" in text
    body = json.loads(text.split("Response text: ", 1)[1])
    assert body["message"] == "fake backend error 400"
    assert remote_error(text) == RemoteFailure(400, "fake backend error 400", None)


async def test_an_unreachable_vllm_is_reported_as_such() -> None:
    document = parameters(closed_port_url(), chat())
    with pytest.raises(RuntimeError, match=r"vLLM is unreachable at http://127\.0\.0\.1"):
        await run(document)


async def test_vllm_host_comes_from_the_environment(backend: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_HOST", "localhost.invalid")
    with pytest.raises(RuntimeError, match=r"unreachable at http://localhost\.invalid:"):
        await run(parameters(backend.url, chat()))


async def test_health_calls_vllm_health(backend: Server) -> None:
    answer = json.loads(await run(parameters(backend.url, {}, "health")))

    assert answer["status"] == "ok"
    assert answer["status_code"] == 200
    with pytest.raises(RuntimeError, match="unreachable"):
        await run(parameters(closed_port_url(), {}, "health"))


# ---- streaming -------------------------------------------------------------------------------


async def test_a_stream_reaches_the_gateway_in_order_then_done(backend: Server, receiver: Receiver) -> None:
    body = chat("Hello", stream=True, stream_options={"include_usage": True})
    summary = json.loads(await run(parameters(backend.url, body, receiver=receiver)))

    expected = await direct_stream_lines(backend, body)
    assert normalized(receiver.lines()) == normalized(expected)
    assert receiver.lines()[-1] == "data: [DONE]"
    assert receiver.routes()[-1] == "done"
    assert receiver.routes().count("done") == 1
    assert "error" not in receiver.routes()
    data_posts = receiver.routes().count("data")
    assert receiver.posts[-1].body == {"task_id": TASK_ID, "type": "done", "data_posts": data_posts}
    for post in receiver.posts:
        assert post.headers["X-Internal-Secret"] == SECRET
        assert post.headers["X-Stream-Task-Token"] == TOKEN
        assert post.headers["Content-Type"] == "application/json"
    for post in receiver.data():
        assert post.body["task_id"] == TASK_ID
        assert post.body["type"] == "data"
        assert all(post.lines)  # no empty lines
    assert summary["streamed"] is True
    assert summary["chunks"] == len(expected)
    assert summary["throughput_tokens_per_second"] > 0
    assert set(backend.app[REQUESTS][0]["body"]).isdisjoint(GATEWAY_KEYS)


async def test_lines_are_batched_up_to_twenty(backend: Server, receiver: Receiver) -> None:
    await run(parameters(backend.url, chat("[[chunks=50]]", stream=True), receiver=receiver))

    lines = receiver.lines()
    assert len(lines) == 52  # 50 tokens, the finish chunk and [DONE]
    assert lines[-1] == "data: [DONE]"
    assert len(receiver.data()) < len(lines)
    assert all(len(post.lines) <= 20 for post in receiver.data())
    assert len(receiver.data()[0].lines) == 1  # the first token is not held back


@pytest.mark.alone("the first line within 0.3 s and the batch 0.4 to 0.75 s after it")
async def test_the_first_line_leaves_at_once_and_a_batch_leaves_after_half_a_second(
    backend: Server, receiver: Receiver
) -> None:
    started = time.monotonic()
    await run(
        parameters(backend.url, chat("[[chunks=3]] [[chunk_delay=0.4]]", stream=True), receiver=receiver)
    )

    first, second = receiver.data()[:2]
    assert len(first.lines) == 1
    assert first.at - started < 0.3
    # The second token arrives at 0.4 s and the third at 0.8 s: the second leaves alone at 0.5 s,
    # while vLLM is silent, not with the third.
    assert len(second.lines) == 1
    assert 0.4 <= second.at - first.at < 0.75


@pytest.mark.alone("stopped within 1.5 s where the whole stream takes 2 s")
@pytest.mark.parametrize("status", [410, 404])
async def test_a_gone_client_stops_vllm_at_once_and_skips_done(
    backend: Server, receiver: Receiver, status: int
) -> None:
    receiver.gone_after = 1
    receiver.gone_status = status
    started = time.monotonic()
    result = json.loads(
        await run(
            parameters(
                backend.url, chat("[[chunks=200]] [[chunk_delay=0.01]]", stream=True), receiver=receiver
            )
        )
    )
    took = time.monotonic() - started

    assert result["cancelled"] is True
    assert str(status) in result["reason"]
    assert took < 1.5  # the whole stream would take 2 s
    await wait_until(lambda: backend.app[DISCONNECTS] == 1)
    assert backend.app[ACTIVE_STREAMS] == 0
    await asyncio.sleep(0.1)
    assert receiver.routes() == ["data", "data"]


async def test_a_refused_callback_stops_vllm_and_raises(backend: Server, receiver: Receiver) -> None:
    receiver.gone_after, receiver.gone_status = 0, 401
    with pytest.raises(RuntimeError, match=r"answered 401 .*INTERNAL_STREAMING_SECRET"):
        await run(
            parameters(
                backend.url, chat("[[chunks=200]] [[chunk_delay=0.01]]", stream=True), receiver=receiver
            )
        )

    await wait_until(lambda: backend.app[DISCONNECTS] == 1)
    assert receiver.routes() == ["data", "error"]


async def test_vllm_dying_mid_stream_posts_an_error_then_raises(backend: Server, receiver: Receiver) -> None:
    with pytest.raises(RuntimeError, match="broke off"):
        await run(parameters(backend.url, chat("[[die_after=2]]", stream=True), receiver=receiver))

    assert len(receiver.lines()) == 2  # the tokens that were produced still reach the client
    assert receiver.routes()[-1] == "error"
    assert "done" not in receiver.routes()
    error = receiver.posts[-1]
    assert error.body["task_id"] == TASK_ID
    assert "broke off" in error.body["error"]
    assert error.headers["X-Stream-Task-Token"] == TOKEN


async def test_a_vllm_error_on_a_stream_is_posted_with_its_status_and_body(
    backend: Server, receiver: Receiver
) -> None:
    with pytest.raises(RuntimeError, match="status code: 400"):
        await run(parameters(backend.url, chat("[[status=400]]", stream=True), receiver=receiver))

    assert receiver.routes() == ["error"]
    message = receiver.posts[0].body["error"]
    assert remote_error(message) == RemoteFailure(400, "fake backend error 400", None)


async def test_a_missing_secret_fails_before_vllm_is_called(
    backend: Server, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTERNAL_STREAMING_SECRET")
    with pytest.raises(RuntimeError, match="INTERNAL_STREAMING_SECRET"):
        await run(parameters(backend.url, chat(stream=True), receiver=receiver))

    assert not backend.app[REQUESTS]
    assert not receiver.posts


async def test_stream_without_the_streaming_fields_is_refused(backend: Server) -> None:
    with pytest.raises(ValueError, match="stream_task_id"):
        await run(parameters(backend.url, chat(stream=True)))


async def test_large_batches_are_split_under_the_gateways_cap(receiver: Receiver) -> None:
    """A vLLM whose 20 event lines take 40 kB each: one batch must become several bodies."""
    big = "x" * 40_000
    lines = [f'data: {{"n":{index},"text":"{big}é"}}' for index in range(20)] + ["data: [DONE]"]

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write("".join(f"{line}\n\n" for line in lines).encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner, url = await start(app)
    try:
        await run(parameters(url, chat(stream=True), receiver=receiver))
    finally:
        await runner.cleanup()

    assert receiver.lines() == lines
    assert all(post.size < 150_000 for post in receiver.posts)
    assert len(receiver.data()) >= 7
    assert receiver.routes()[-1] == "done"


async def test_a_keepalive_connection_closed_by_the_gateway_is_retried(backend: Server) -> None:
    receiver = Receiver()
    runner = await start_receiver(receiver, keepalive_timeout=0.05)
    try:
        await run(
            parameters(backend.url, chat("[[chunks=3]] [[chunk_delay=0.2]]", stream=True), receiver=receiver)
        )
    finally:
        await runner.cleanup()

    assert len(receiver.lines()) == 5
    assert receiver.routes()[-1] == "done"
    assert "error" not in receiver.routes()


async def test_https_callbacks_verify_the_certificate(
    backend: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    cert_path, key_path = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    receiver = Receiver(protocol="https")
    runner = await start_receiver(receiver, ssl_context=context)
    try:
        with pytest.raises(RuntimeError, match="certificate"):
            await run(parameters(backend.url, chat(stream=True), receiver=receiver))
        assert not receiver.posts

        monkeypatch.setenv("STREAMING_CALLBACK_CA_BUNDLE", str(cert_path))
        summary = json.loads(await run(parameters(backend.url, chat(stream=True), receiver=receiver)))
    finally:
        await runner.cleanup()

    assert summary["streamed"] is True
    assert receiver.routes()[-1] == "done"


# ---- shipped alone ---------------------------------------------------------------------------

SHIPPED = """
import json, sys
from globus_compute_sdk.serialize import ComputeSerializer
for payload in json.loads(sys.stdin.read())["payloads"]:
    function = ComputeSerializer().deserialize(payload)
    print(function({"model_params": {"openai_endpoint": "health", "api_port": int(sys.argv[1])}}))
"""


async def test_the_function_works_when_the_sdk_ships_its_source_alone(
    backend: Server, tmp_path: Path
) -> None:
    """What the endpoint does: deserialize the registered function in a fresh interpreter where this
    repository is not importable, then call it."""
    from globus_compute_sdk.serialize import AllCodeStrategies, ComputeSerializer, PureSourceTextInspect

    payloads = [
        ComputeSerializer(strategy_code=strategy).serialize(vllm_inference)
        for strategy in (PureSourceTextInspect(), AllCodeStrategies())
    ]
    payloads.append(f"st\nvllm_inference:{MODULE_PATH.read_text()}")  # register_source_code(file, name)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-I", "-c", SHIPPED, str(port_of(backend.url))],
        input=json.dumps({"payloads": payloads}),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=20,
    )

    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [answer["status"] for answer in answers] == ["ok", "ok", "ok"]
