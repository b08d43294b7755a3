"""OpenAI's Responses API and Anthropic's Messages API, through the gateway to the fake vLLM, with
the official `openai` and `anthropic` clients and curl: answers, named-event streams, Anthropic's
error envelope on every failure of the Messages route, and exact token usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from proxy.core.schemas import validate_request
from proxy.errors import ApiError
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_vllm import ACTIVE_STREAMS, REQUESTS
from tests.compute_setup import compute_config
from tests.support import (
    CHAT_MODEL,
    PRIVATE_MODEL,
    TOKENS,
    Server,
    auth,
    free_port,
    start_gateway,
    value,
    write_gateway_config,
)

REPLY = "Hello! This is a reply from the fake backend."


def openai_client(gateway: Server, cluster: str = "local") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{gateway.url}/{cluster}/vllm/v1", api_key=TOKENS["alice"], max_retries=0
    )


def anthropic_client(
    gateway: Server, token: str = TOKENS["alice"], cluster: str = "local"
) -> anthropic.AsyncAnthropic:
    """`auth_token` makes the client send `Authorization: Bearer`, which the gateway checks."""
    return anthropic.AsyncAnthropic(base_url=f"{gateway.url}/{cluster}/vllm", auth_token=token, max_retries=0)


def ask(content: str = "Hello", model: str = CHAT_MODEL, **fields: Any) -> dict[str, Any]:
    """A Messages body."""
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}], **fields}


def messages_url(gateway: Server, cluster: str = "local") -> str:
    return f"{gateway.url}/{cluster}/vllm/v1/messages"


def assert_anthropic_error(document: Any, kind: str) -> str:
    """The whole envelope, so that nothing OpenAI-shaped leaks onto the Messages route."""
    assert set(document) == {"type", "error"} and document["type"] == "error"
    assert set(document["error"]) == {"type", "message"}
    assert document["error"]["type"] == kind
    message: str = document["error"]["message"]
    assert message
    return message


async def post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(url, headers=auth() if headers is None else headers, **kwargs) as response:
        return response.status, await response.json(content_type=None), response


async def metrics(http: aiohttp.ClientSession, gateway: Server) -> str:
    async with http.get(gateway.url.removesuffix("/resource_server") + "/metrics") as response:
        return await response.text()


def named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Each event as (name, data), checking the framing: an `event:` line, then one `data:` line."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


@pytest.fixture
async def limited_gateway(backend: Server, tmp_path: Path) -> AsyncIterator[Server]:
    """Alice may use 30 tokens a minute of the chat model."""
    path = write_gateway_config(tmp_path, backend.url)
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    endpoints[0]["tpm_user"] = 30
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    runner, gateway = await start_gateway(path)
    yield gateway
    await runner.cleanup()


@pytest.fixture
async def compute_gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    """The `hpc` cluster runs the compute function, which streams back through the relay."""
    runner, gateway = await start_gateway(compute_config(tmp_path, backend, compute, globus, free_port()))
    yield gateway
    await runner.cleanup()


# The Responses API


async def test_responses_with_the_openai_client(gateway: Server, backend: Server) -> None:
    async with openai_client(gateway) as api:
        answer = await api.responses.create(model=CHAT_MODEL, input="Hello", instructions="Be brief.")
    assert answer.status == "completed" and answer.output_text == REPLY
    assert answer.usage is not None and answer.usage.output_tokens == 10
    assert answer.usage.total_tokens == answer.usage.input_tokens + 10
    sent = backend.app[REQUESTS][-1]
    assert sent["path"] == "/v1/responses"
    assert sent["body"] == {"model": CHAT_MODEL, "input": "Hello", "instructions": "Be brief."}


async def test_responses_stream_event_by_event(gateway: Server, backend: Server) -> None:
    async with openai_client(gateway) as api:
        stream = await api.responses.create(
            model=CHAT_MODEL,
            input=[{"role": "user", "content": "[[chunks=3]][[chunk_delay=0.3]]"}],
            stream=True,
        )
        first = await anext(aiter(stream))
        assert backend.app[ACTIVE_STREAMS] == 1, "the first event arrived before the backend finished"
        events = [first] + [event async for event in stream]
    deltas = ["response.output_text.delta"] * 3
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.output_text == "Hello! This"
    assert "stream_options" not in backend.app[REQUESTS][-1]["body"], "the Responses API reports usage"


@pytest.mark.parametrize(
    "body",
    [
        {
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]}
            ]
        },
        {
            "input": [{"type": "function_call_output", "call_id": "c1", "output": "42"}],
            "previous_response_id": "r",
        },
        {"input": "x", "reasoning": {"effort": "low"}, "text": {"format": {"type": "json_object"}}},
        {
            "input": "x",
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "function", "name": "f"},
        },
        {
            "input": "x",
            "top_k": 5,
            "repetition_penalty": 1.1,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    ],
)
def test_responses_bodies_that_pass(body: dict[str, Any]) -> None:
    validate_request("responses", {"model": CHAT_MODEL, **body})


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"input": [{"call_id": "c1", "output": "42"}]}, "input.0.type"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "truncation": "middle"}, "truncation"),
        ({"input": "x", "messages": []}, "messages"),
    ],
)
def test_responses_bodies_that_fail_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        validate_request("responses", {"model": CHAT_MODEL, **body})
    assert refused.value.status == 400 and refused.value.param == param


async def test_responses_errors_stay_openai_shaped(gateway: Server, http: aiohttp.ClientSession) -> None:
    async with openai_client(gateway) as api:
        with pytest.raises(openai.BadRequestError) as bad:
            await api.responses.create(model=CHAT_MODEL, input="x", extra_body={"max_tokens": 5})
        assert bad.value.param == "max_tokens" and bad.value.code == "unknown_parameter"
        with pytest.raises(openai.NotFoundError):
            await api.responses.create(model="no/such-model", input="x")
        stream = await api.responses.create(model=CHAT_MODEL, input="[[die_after=1]]", stream=True)
        with pytest.raises(openai.APIError, match="closed the stream"):
            async for _ in stream:
                pass
    status, document, _ = await post(
        http, f"{gateway.url}/chatonly/vllm/v1/responses", json={"model": CHAT_MODEL, "input": "x"}
    )
    assert status == 400 and document["error"]["code"] == "unsupported_endpoint"


# The Messages API


async def test_messages_with_the_anthropic_client(gateway: Server, backend: Server) -> None:
    async with anthropic_client(gateway) as api:
        message = await api.messages.create(
            model=CHAT_MODEL, max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
        )
    assert message.content[0].type == "text" and message.content[0].text == REPLY
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 10
    sent = backend.app[REQUESTS][-1]
    assert sent["path"] == "/v1/messages"
    assert sent["body"] == {
        "model": CHAT_MODEL,
        "max_tokens": 64,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
    }


async def test_messages_stream_with_the_anthropic_helper(gateway: Server, backend: Server) -> None:
    async with (
        anthropic_client(gateway) as api,
        api.messages.stream(**ask("[[chunks=3]][[chunk_delay=0.3]]")) as stream,
    ):
        events = aiter(stream)
        first = await anext(events)
        assert backend.app[ACTIVE_STREAMS] == 1, "the first event arrived before the backend finished"
        types = [first.type] + [event.type async for event in events if event.type != "text"]
        final = await stream.get_final_message()
    assert types == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert final.content[0].type == "text" and final.content[0].text == "Hello! This"
    assert final.usage.output_tokens == 3 and final.stop_reason == "end_turn"
    assert "stream_options" not in backend.app[REQUESTS][-1]["body"], "the Messages API reports usage"


async def test_messages_stream_true_with_the_anthropic_client(gateway: Server) -> None:
    async with anthropic_client(gateway) as api:
        stream = await api.messages.create(**ask("[[chunks=4]]"), stream=True)
        events = [event async for event in stream]
    deltas = [event.delta.text for event in events if event.type == "content_block_delta"]
    assert "".join(deltas) == "Hello! This is"
    assert events[-2].type == "message_delta" and events[-2].usage.output_tokens == 4


async def test_both_apis_without_a_cluster(gateway: Server) -> None:
    """On the route where the gateway chooses the endpoint, the envelope is the same."""
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, auth_token=TOKENS["alice"], max_retries=0
    ) as api:
        async with api.messages.stream(**ask()) as stream:
            assert (await stream.get_final_message()).usage.output_tokens == 5
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await api.messages.create(**ask(model="no/such-model"))
        assert unknown.value.type == "not_found_error"
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=TOKENS["alice"], max_retries=0
    ) as api:
        answer = await api.responses.create(model=CHAT_MODEL, input="Hello")
    assert answer.output_text == REPLY


async def test_curl_passes_named_events_through_as_they_come(gateway: Server) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--fail-with-body",
        "-H", f"Authorization: Bearer {TOKENS['alice']}",
        "-H", "Content-Type: application/json",
        "-d", json.dumps(ask("[[chunks=3]][[chunk_delay=0.3]]", stream=True)),
        messages_url(gateway),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), timeout=5)
    assert first == b"event: message_start\n"
    assert process.returncode is None, "the first event arrived before the backend finished"
    rest = await asyncio.wait_for(process.stdout.read(), timeout=10)
    assert await process.wait() == 0
    events = named_events(first + rest)
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_both_apis_through_globus_compute(compute_gateway: Server, backend: Server) -> None:
    """The compute function posts lines without the blank lines between events; each event must
    still reach the client with its name, even when its lines come in two posts."""
    async with (
        anthropic_client(compute_gateway, cluster="hpc") as api,
        api.messages.stream(**ask("[[chunks=30]]")) as stream,
    ):
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and len(final.content[0].text) > 30
    assert final.usage.output_tokens == 30
    async with openai_client(compute_gateway, cluster="hpc") as api:
        stream = await api.responses.create(model=CHAT_MODEL, input="[[chunks=30]]", stream=True)
        events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.usage is not None
    assert backend.app[REQUESTS][-1]["path"] == "/v1/responses"
    async with anthropic_client(compute_gateway, cluster="hpc") as api:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await api.messages.create(**ask("[[status=400]]"), stream=True)
    assert refused.value.api_message == "fake backend error 400"


# Anthropic's error envelope on every failure of the Messages route


async def test_refused_tokens_are_anthropic_errors(gateway: Server, http: aiohttp.ClientSession) -> None:
    async with anthropic_client(gateway, token="wrong-token") as api:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await api.messages.create(**ask())
    assert refused.value.type == "authentication_error"
    for headers in ({}, {"Authorization": "Basic x"}, {"x-api-key": TOKENS["alice"]}):
        status, document, response = await post(http, messages_url(gateway), headers, json=ask())
        assert status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert_anthropic_error(document, "authentication_error")


async def test_invalid_bodies_are_anthropic_errors(gateway: Server, http: aiohttp.ClientSession) -> None:
    async with anthropic_client(gateway) as api:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await api.messages.create(**ask(), extra_body={"frequency_penalty": 1})
        assert bad.value.type == "invalid_request_error"
        assert bad.value.api_message == "Unrecognized request argument supplied: frequency_penalty"
    cases = [
        ({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        (ask(temperature=1.5), "temperature: Input should be less than or equal to 1"),
        (ask(tool_choice={"type": "tool"}), "tool_choice.name: Field required"),
        (
            ask(thinking={"type": "enabled", "budget_tokens": 64}),
            "thinking.budget_tokens: Input should be less",
        ),
    ]
    for body, expected in cases:
        status, document, _ = await post(http, messages_url(gateway), json=body)
        assert status == 400
        assert assert_anthropic_error(document, "invalid_request_error").startswith(expected)
    json_type = {**auth(), "Content-Type": "application/json"}
    status, document, _ = await post(http, messages_url(gateway), json_type, data=b"{not json")
    assert status == 400
    assert_anthropic_error(document, "invalid_request_error")
    status, document, _ = await post(http, messages_url(gateway), data=b"{}")
    assert status == 415
    assert_anthropic_error(document, "invalid_request_error")


async def test_body_over_the_limit_is_an_anthropic_error(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    status, document, _ = await post(http, messages_url(gateway), json=ask("x" * 1_100_000))
    assert status == 413
    assert_anthropic_error(document, "request_too_large")


async def test_lookup_failures_are_anthropic_errors(gateway: Server, http: aiohttp.ClientSession) -> None:
    async with anthropic_client(gateway) as api:
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await api.messages.create(**ask(model="no/such-model"))
        assert unknown.value.type == "not_found_error"
    async with anthropic_client(gateway, token=TOKENS["bob"]) as api:
        with pytest.raises(anthropic.NotFoundError) as denied:
            await api.messages.create(**ask(model=PRIVATE_MODEL))
        assert denied.value.type == "not_found_error", "a model one may not use is one that is not served"
    async with anthropic_client(gateway, cluster="chatonly") as api:
        with pytest.raises(anthropic.BadRequestError, match="not available on cluster 'chatonly'"):
            await api.messages.create(**ask())
    status, document, _ = await post(http, messages_url(gateway, cluster="nowhere"), json=ask())
    assert status == 404
    assert_anthropic_error(document, "not_found_error")


BACKEND_FAILURES = [
    ("[[status=500]]", CHAT_MODEL, 502, "api_error"),
    ("[[status=503]]", CHAT_MODEL, 503, "overloaded_error"),
    ("[[status=400]]", CHAT_MODEL, 400, "invalid_request_error"),
    ("[[delay=2]]", "slow/model", 504, "api_error"),
    ("Hello", "dead/model", 502, "api_error"),
]


@pytest.mark.parametrize(
    "content, model, status, kind, stream",
    [(*failure, stream) for failure in BACKEND_FAILURES for stream in (False, True)]
    + [("[[garbage]]", CHAT_MODEL, 502, "api_error", False)],
)
async def test_backend_failures_are_anthropic_errors(
    gateway: Server,
    http: aiohttp.ClientSession,
    content: str,
    model: str,
    status: int,
    kind: str,
    stream: bool,
) -> None:
    """Before a stream's first byte, its failure is a plain error too."""
    got, document, _ = await post(http, messages_url(gateway), json=ask(content, model, stream=stream))
    assert got == status
    message = assert_anthropic_error(document, kind)
    if content.startswith("[[status="):
        assert message == f"fake backend error {status if status < 500 else content[9:12]}"


async def test_backend_failure_raises_the_anthropic_clients_error(gateway: Server) -> None:
    async with anthropic_client(gateway) as api:
        with pytest.raises(anthropic.InternalServerError) as failed:
            await api.messages.create(**ask("[[status=500]]"))
    assert failed.value.status_code == 502 and failed.value.type == "api_error"


async def test_failure_mid_stream_is_an_anthropic_error_event(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        messages_url(gateway), json=ask("[[die_after=2]]", stream=True), headers=auth()
    ) as sent:
        assert sent.status == 200
        events = named_events(await sent.read())
    assert [name for name, _ in events][-3:] == ["content_block_delta", "content_block_delta", "error"]
    assert_anthropic_error(events[-1][1], "api_error")
    async with anthropic_client(gateway) as api:
        stream = await api.messages.create(**ask("[[die_after=2]]"), stream=True)
        with pytest.raises(anthropic.APIStatusError, match="closed the stream") as broken:
            async for _ in stream:
                pass
    assert broken.value.type == "api_error"


async def test_rate_limits_are_anthropic_errors(limited_gateway: Server, http: aiohttp.ClientSession) -> None:
    """The streamed usage is what the limit counts: one stream spends Alice's 30 tokens."""
    async with anthropic_client(limited_gateway) as api:
        stream = await api.messages.create(**ask("x" * 100), stream=True)
        async for _ in stream:
            pass
        with pytest.raises(anthropic.RateLimitError) as limited:
            await api.messages.create(**ask())
    assert limited.value.type == "rate_limit_error"
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    status, document, response = await post(http, messages_url(limited_gateway), json=ask())
    assert status == 429 and "Retry-After" in response.headers
    assert_anthropic_error(document, "rate_limit_error")


async def test_other_routes_keep_openai_errors(gateway: Server, http: aiohttp.ClientSession) -> None:
    chat_url = f"{gateway.url}/local/vllm/v1/chat/completions"
    status, document, _ = await post(http, chat_url, {}, json=ask())
    assert status == 401 and set(document["error"]) == {"message", "type", "param", "code"}
    status, document, _ = await post(http, f"{gateway.url}/local/vllm/v1/messages/extra", json=ask())
    assert status == 404 and "param" in document["error"]


# Usage


async def responses_usage(gateway: Server, stream: bool) -> tuple[int, int]:
    """What the Responses API told the client it used: streamed, in its last event."""
    async with openai_client(gateway) as api:
        if not stream:
            answer = await api.responses.create(model=CHAT_MODEL, input="Hi")
        else:
            events = [
                event async for event in await api.responses.create(model=CHAT_MODEL, input="Hi", stream=True)
            ]
            assert events[-1].type == "response.completed"
            answer = events[-1].response
    assert answer.usage is not None
    return answer.usage.input_tokens, answer.usage.output_tokens


async def messages_usage(gateway: Server, stream: bool) -> tuple[int, int]:
    """What the Messages API told the client it used: streamed, in `message_start` and `message_delta`."""
    async with anthropic_client(gateway) as api:
        if not stream:
            message = await api.messages.create(**ask("Hi there"))
        else:
            async with api.messages.stream(**ask("Hi there")) as events:
                message = await events.get_final_message()
    return message.usage.input_tokens, message.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_is_counted_for_both_apis(
    gateway: Server, http: aiohttp.ClientSession, stream: bool
) -> None:
    before = await metrics(http, gateway)
    used = [await responses_usage(gateway, stream), await messages_usage(gateway, stream)]
    after = await metrics(http, gateway)

    def grew(kind: str) -> float:
        labels = {"model": CHAT_MODEL, "kind": kind}
        return value(after, "gateway_tokens_total", **labels) - value(
            before, "gateway_tokens_total", **labels
        )

    assert grew("prompt") == sum(prompt for prompt, _ in used) > 0
    assert grew("completion") == sum(completion for _, completion in used) > 0
