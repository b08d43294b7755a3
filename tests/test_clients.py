"""What researchers actually run: the official `openai` Python client and `curl -N`."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, TOKENS, Server


def client(gateway: Server, token: str = TOKENS["alice"]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/local/vllm/v1", api_key=token, max_retries=0)


async def test_chat_completion(gateway: Server) -> None:
    async with client(gateway) as api:
        answer = await api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
    assert answer.model == CHAT_MODEL
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.total_tokens > 0


async def test_completion(gateway: Server) -> None:
    async with client(gateway) as api:
        answer = await api.completions.create(model=CHAT_MODEL, prompt="Once upon", max_tokens=8)
    assert answer.choices[0].text


async def test_embeddings(gateway: Server) -> None:
    async with client(gateway) as api:
        answer = await api.embeddings.create(model=EMBED_MODEL, input=["one", "two"])
    assert [item.index for item in answer.data] == [0, 1]
    assert all(len(item.embedding) > 0 for item in answer.data)


async def test_streaming_chat(gateway: Server) -> None:
    async with client(gateway) as api:
        stream = await api.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "[[chunks=6]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None


async def test_streaming_completion(gateway: Server) -> None:
    async with client(gateway) as api:
        stream = await api.completions.create(model=CHAT_MODEL, prompt="[[chunks=3]]", stream=True)
        chunks = [chunk async for chunk in stream]
    assert len([c for c in chunks if c.choices]) >= 3


async def test_models_list(gateway: Server) -> None:
    async with client(gateway) as api:
        models = [model.id async for model in api.models.list()]
    assert CHAT_MODEL in models and EMBED_MODEL in models


async def test_errors_reach_the_client_as_openai_errors(gateway: Server) -> None:
    async with client(gateway, token="wrong-token") as api:
        with pytest.raises(openai.AuthenticationError):
            await api.models.list()
    async with client(gateway) as api:
        with pytest.raises(openai.BadRequestError) as bad:
            await api.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], temperature=5
            )
        assert bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.APIError, match="closed the stream"):
            stream = await api.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "[[die_after=1]]"}], stream=True
            )
            async for _ in stream:
                pass


async def test_curl_streams_chunk_by_chunk(gateway: Server) -> None:
    body = json.dumps(
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "[[chunks=3]][[chunk_delay=0.3]]"}],
            "stream": True,
        }
    )
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--fail-with-body",
        "-H", f"Authorization: Bearer {TOKENS['alice']}",
        "-H", "Content-Type: application/json",
        "-d", body,
        f"{gateway.url}/local/vllm/v1/chat/completions",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), timeout=5)
    assert first.startswith(b"data: {")
    assert process.returncode is None, "the first event arrived before the backend finished"
    rest = await asyncio.wait_for(process.stdout.read(), timeout=10)
    assert await process.wait() == 0
    assert rest.rstrip().endswith(b"data: [DONE]")
