"""The request corpus through the real gateway: valid bodies reach the backend unchanged and
answer 200; invalid ones answer 400 naming the offending `param`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testing.fake_vllm import REQUESTS
from tests.conftest import CHAT_MODEL, EMBED_MODEL, Server, auth
from tests.test_routes import assert_openai_error

CORPUS = Path(__file__).parent / "corpus"
ROUTES = {"chat/completions": "chat_completions", "completions": "completions", "embeddings": "embeddings"}


def corpus(kind: str) -> list[tuple[str, Any]]:
    return [
        (path, case)
        for path, name in ROUTES.items()
        for case in json.loads((CORPUS / f"{name}.json").read_text())[kind]
    ]


def with_served_model(path: str, body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
        return {**body, "model": EMBED_MODEL if path == "embeddings" else CHAT_MODEL}
    return body


async def test_valid_requests_reach_the_backend_unchanged(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    cases = corpus("valid")
    assert len(cases) >= 30
    for path, body in cases:
        sent = with_served_model(path, body)
        async with http.post(f"{gateway.url}/local/vllm/v1/{path}", json=sent, headers=auth()) as response:
            assert response.status == 200, (path, body, await response.text())
        assert backend.app[REQUESTS][-1]["body"] == sent


@pytest.mark.parametrize(
    "path, case", corpus("invalid"), ids=lambda value: getattr(value, "get", lambda _: "")("why")
)
async def test_invalid_requests_name_the_param(
    gateway: Server, http: aiohttp.ClientSession, path: str, case: dict[str, Any]
) -> None:
    body = json.dumps(with_served_model(path, case["body"]))
    headers = {**auth(), "Content-Type": "application/json"}
    async with http.post(f"{gateway.url}/local/vllm/v1/{path}", data=body, headers=headers) as response:
        assert response.status == 400, case["why"]
        assert_openai_error(await response.json(), case["param"])


def test_the_corpus_is_large_enough() -> None:
    assert len(corpus("valid")) >= 30 and len(corpus("invalid")) >= 60
