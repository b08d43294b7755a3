"""The fake backend must behave like vLLM, since the gateway's tests and benchmarks rely on it."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from testing.fake_vllm import (
    ACTIVE_STREAMS,
    DISCONNECTS,
    NO_FAULTS,
    REQUESTS,
    Faults,
    create_backend_app,
    parse_faults,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
CHAT = "/v1/chat/completions"


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_backend_app(cluster="test", models=["org/chat"]))


def chat_body(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "org/chat", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(raw: bytes) -> list[str]:
    events = [event for event in raw.decode().split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


async def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 2
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within 2 s"
        await asyncio.sleep(0.01)


async def test_health_answers_200_with_an_empty_body(client: Client) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.read() == b""


async def test_models_lists_the_configured_models(client: Client) -> None:
    response = await client.get("/v1/models")
    document = await response.json()
    assert document["object"] == "list"
    assert [(model["id"], model["object"]) for model in document["data"]] == [("org/chat", "model")]


async def test_models_without_configuration_lists_the_models_seen(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(create_backend_app())
    assert (await (await client.get("/v1/models")).json())["data"] == []
    await client.post(CHAT, json={"model": "seen/model", "messages": []})
    document = await (await client.get("/v1/models")).json()
    assert [model["id"] for model in document["data"]] == ["seen/model"]


async def test_jobs_lists_each_model_as_running(client: Client) -> None:
    response = await client.get("/jobs")
    assert await response.json() == {
        "running": [
            {"Models": "org/chat", "Framework": "vllm", "Cluster": "test", "Model Status": "running"}
        ],
        "queued": [],
        "stopped": [],
        "others": [],
        "private_batch_running": [],
        "private_batch_queued": [],
        "cluster_status": {
            "cluster": "test",
            "total_models": 1,
            "live_models": 1,
            "stopped_models": 0,
        },
    }


async def test_chat_completion_has_the_openai_shape_and_is_recorded(client: Client) -> None:
    body = chat_body("Say hello", max_tokens=16)
    response = await client.post(CHAT, json=body, headers={"Authorization": "Bearer abc"})
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["id"].startswith("chatcmpl-")
    assert document["object"] == "chat.completion"
    assert isinstance(document["created"], int)
    assert document["model"] == "org/chat"
    [choice] = document["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = document["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    [recorded] = client.app[REQUESTS]
    assert recorded["path"] == CHAT
    assert recorded["headers"]["Authorization"] == "Bearer abc"
    assert recorded["body"] == body


async def test_chat_completion_honours_n_and_max_tokens(client: Client) -> None:
    response = await client.post(CHAT, json=chat_body("hi", n=3, max_tokens=2))
    document = await response.json()
    assert [choice["index"] for choice in document["choices"]] == [0, 1, 2]
    assert {choice["finish_reason"] for choice in document["choices"]} == {"length"}
    assert document["usage"]["completion_tokens"] == 6


async def test_text_completion_has_the_openai_shape(client: Client) -> None:
    response = await client.post("/v1/completions", json={"model": "org/chat", "prompt": "Once"})
    document = await response.json()
    assert document["id"].startswith("cmpl-")
    assert document["object"] == "text_completion"
    assert document["model"] == "org/chat"
    assert document["choices"][0]["text"]
    assert document["choices"][0]["finish_reason"] == "stop"


async def test_embeddings_are_float_vectors_or_base64_float32(client: Client) -> None:
    body = {"model": "org/embed", "input": ["one", "two"]}
    floats = await (await client.post("/v1/embeddings", json=body)).json()
    assert floats["object"] == "list"
    assert floats["model"] == "org/embed"
    assert [item["index"] for item in floats["data"]] == [0, 1]
    vector = floats["data"][0]["embedding"]
    assert len(vector) == 8
    assert all(isinstance(value, float) for value in vector)
    encoded = await (await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    raw = base64.b64decode(encoded["data"][1]["embedding"])
    assert list(struct.unpack("<8f", raw)) == vector


async def test_chat_stream_sends_chunks_a_final_chunk_and_done(client: Client) -> None:
    response = await client.post(CHAT, json=chat_body("hi", stream=True))
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    events = sse_events(await response.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 5 + ["stop"]
    assert "usage" not in chunks[-1]


async def test_stream_usage_chunk_only_when_asked(client: Client) -> None:
    body = chat_body("hi", stream=True, stream_options={"include_usage": True})
    events = sse_events(await (await client.post(CHAT, json=body)).read())
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5


async def test_completion_stream_honours_chunks(client: Client) -> None:
    body = {"model": "org/chat", "prompt": "go [[chunks=3]]", "stream": True}
    events = sse_events(await (await client.post("/v1/completions", json=body)).read())
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert len(chunks) == 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("status", "kind"), [(429, "BadRequestError"), (503, "InternalServerError")])
@pytest.mark.parametrize("stream", [False, True])
async def test_status_directive_answers_a_vllm_error(
    client: Client, status: int, kind: str, stream: bool
) -> None:
    response = await client.post(CHAT, json=chat_body(f"hi [[status={status}]]", stream=stream))
    assert response.status == status
    assert await response.json() == {
        "object": "error",
        "message": f"fake backend error {status}",
        "type": kind,
        "param": None,
        "code": status,
    }


async def test_directives_are_read_from_text_parts(client: Client) -> None:
    content = [{"type": "text", "text": "look"}, {"type": "text", "text": "[[status=400]]"}]
    assert (await client.post(CHAT, json=chat_body(content))).status == 400


async def test_directives_in_embeddings_input(client: Client) -> None:
    body = {"model": "org/embed", "input": "x [[status=500]]"}
    assert (await client.post("/v1/embeddings", json=body)).status == 500


async def test_delay_waits_before_the_headers(client: Client) -> None:
    started = time.monotonic()
    response = await client.post(CHAT, json=chat_body("hi [[delay=0.2]]"))
    assert response.status == 200
    assert time.monotonic() - started >= 0.2


async def test_chunk_delay_spaces_the_chunks(client: Client) -> None:
    body = chat_body("hi [[chunks=3]][[chunk_delay=0.05]]", stream=True)
    started = time.monotonic()
    events = sse_events(await (await client.post(CHAT, json=body)).read())
    assert time.monotonic() - started >= 0.1
    assert len(events) == 5


async def test_die_after_aborts_a_stream_midway(client: Client) -> None:
    response = await client.post(CHAT, json=chat_body("hi [[die_after=2]]", stream=True))
    assert response.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for data in response.content.iter_any():
            received += data
    assert len(sse_events(received)) == 2
    assert b"[DONE]" not in received
    assert client.app[DISCONNECTS] == 0


async def test_die_after_aborts_a_plain_request_before_answering(client: Client) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post(CHAT, json=chat_body("hi [[die_after=0]]"))


async def test_garbage_is_not_json(client: Client) -> None:
    response = await client.post(CHAT, json=chat_body("hi [[garbage]]"))
    assert response.status == 200
    with pytest.raises(ValueError):
        json.loads(await response.read())


async def test_garbage_stream_is_not_valid_events(client: Client) -> None:
    response = await client.post(CHAT, json=chat_body("hi [[garbage]]", stream=True))
    assert response.status == 200
    raw = (await response.read()).decode()
    assert not raw.startswith("data: ")
    with pytest.raises(ValueError):
        json.loads(raw.split("\n\n")[1].removeprefix("data: "))


async def test_client_disconnect_is_counted(client: Client) -> None:
    body = chat_body("hi [[chunks=100]][[chunk_delay=0.02]]", stream=True)
    response = await client.post(CHAT, json=body)
    await response.content.readany()
    assert client.app[ACTIVE_STREAMS] == 1
    response.close()
    await wait_until(lambda: client.app[DISCONNECTS] == 1)
    await wait_until(lambda: client.app[ACTIVE_STREAMS] == 0)


async def test_invalid_json_is_a_400(client: Client) -> None:
    response = await client.post(CHAT, data=b"{not json")
    assert response.status == 400
    assert (await response.json())["object"] == "error"
    assert not client.app[REQUESTS]


def test_plain_prompts_skip_the_directive_scan() -> None:
    assert parse_faults("an [ordinary] prompt") is NO_FAULTS
    assert parse_faults("[[delay=0.5]] [[die_after=3]] [[garbage]]") == Faults(
        delay=0.5, die_after=3, garbage=True
    )
