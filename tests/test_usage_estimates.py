"""A stream cut short is charged what it delivered: no client escapes token limits by hanging up
before the usage event, and the record says the count is an estimate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.core.usage import UsageScanner, estimate_prompt_tokens
from tests.conftest import Server, auth, chat, start_gateway, write_gateway_config
from tests.support import stdout_lines

OPENAI_NAMES = {"prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens"}


async def scanned(events: list[bytes]) -> UsageScanner:
    scanner = UsageScanner(OPENAI_NAMES, strip_usage_event=False)

    async def source() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    async for _ in scanner.scan(source()):
        pass
    return scanner


def chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


async def test_a_stream_with_its_usage_is_charged_exactly() -> None:
    usage_event = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
    scanner = await scanned([chunk("a"), chunk("b"), usage_event, b"data: [DONE]\n\n"])
    usage = scanner.final_usage(chat())
    assert usage is not None and not usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 2, 9)


async def test_a_stream_cut_before_its_usage_is_charged_an_estimate() -> None:
    body = chat("x" * 400)
    scanner = await scanned([chunk("a"), chunk("b"), chunk("c")])
    usage = scanner.final_usage(body)
    assert usage is not None and usage.estimated
    assert usage.completion_tokens == 3
    assert usage.prompt_tokens == estimate_prompt_tokens(body) >= 100
    assert usage.total_tokens == usage.prompt_tokens + 3


async def test_anthropic_input_tokens_are_kept_and_only_the_output_estimated() -> None:
    names = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens"}
    scanner = UsageScanner(names, strip_usage_event=False)
    start_data = {"type": "message_start", "message": {"usage": {"input_tokens": 11}}}
    start = b"event: message_start\ndata: " + json.dumps(start_data).encode() + b"\n\n"
    delta = b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'

    async def source() -> AsyncIterator[bytes]:
        yield start
        yield delta
        yield delta

    async for _ in scanner.scan(source()):
        pass
    usage = scanner.final_usage({"messages": []})
    assert usage is not None and usage.estimated
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 3)


async def test_nothing_delivered_is_nothing_charged() -> None:
    assert (await scanned([])).final_usage(chat()) is None


@pytest.fixture
async def limited_gateway(backend: Server, tmp_path: Path) -> AsyncIterator[Server]:
    path = write_gateway_config(tmp_path, backend.url)
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    endpoints[0]["tpm_user"] = 60
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    runner, gateway = await start_gateway(path)
    yield gateway
    await runner.cleanup()


async def cut_stream(http: aiohttp.ClientSession, gateway: Server) -> int:
    """Reads the first events of a long stream, then hangs up; the status it was answered with."""
    body = chat("[[chunks=40]][[chunk_delay=0.05]] " + "word " * 40, stream=True)
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    async with http.post(url, json=body, headers=auth()) as response:
        if response.status == 200:
            await response.content.readuntil(b"\n\n")
            await response.content.readuntil(b"\n\n")
        return response.status


async def test_hanging_up_early_does_not_escape_the_token_limit(
    limited_gateway: Server, capfd: pytest.CaptureFixture[str]
) -> None:
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            statuses.append(await cut_stream(http, limited_gateway))
            await asyncio.sleep(0.3)
    assert statuses[0] == 200 and 429 in statuses, statuses
    lines = await stdout_lines(capfd, lambda lines: any('"usage_estimated":true' in line for line in lines))
    records = [json.loads(line) for line in lines if line.startswith("{")]
    cut = [record for record in records if record["stream"] and record["status"] != 429]
    assert cut and all(record["usage_estimated"] for record in cut), cut
    assert all(record["completion_tokens"] >= 2 and record["prompt_tokens"] > 0 for record in cut)
