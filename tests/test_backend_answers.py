"""What the direct adaptor holds of a backend's answer is bounded: a whole answer over
`server.max_answer_bytes` (64 MiB, counted after decompression, so a small gzip that unpacks to
hundreds of MB counts as what it unpacks to) and an error answer over `server.max_error_bytes`
(64 KiB) are cut off (502 saying so), and at most 1000 characters of a backend's error message
reach the client.
Measured on a gateway process: its peak memory stays far from what the answers would have cost."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import CHAT_MODEL, auth, chat, free_port, start, write_gateway_config
from tests.processes import GatewayProcess, gateway_process

MIB = 1024 * 1024
HUGE = 300 * MIB
ERROR_MESSAGE = 10 * MIB


def gzip_of_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MIB)
    return b"".join(compressor.compress(block) for _ in range(size // MIB)) + compressor.flush()


async def hostile(request: web.Request) -> web.StreamResponse:
    """Answers as the request's `user` field says."""
    kind = (await request.json()).get("user")
    if kind == "huge":
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        block = b" " * MIB
        for _ in range(HUGE // MIB):
            await response.write(block)
        return response
    if kind == "bomb":
        body = request.app[BOMB]
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
    if kind in ("error", "long-error"):
        size = ERROR_MESSAGE if kind == "error" else 32 * 1024
        message = json.dumps({"error": {"message": "x" * size}})
        return web.Response(status=500, text=message, content_type="application/json")
    return web.json_response({"object": "chat.completion", "choices": [], "model": CHAT_MODEL})


BOMB = web.AppKey("bomb", bytes)


@pytest.fixture
async def backend_url() -> AsyncIterator[str]:
    app = web.Application(client_max_size=16 * MIB)
    app[BOMB] = gzip_of_zeros(HUGE)
    app.router.add_post("/v1/chat/completions", hostile)
    runner, url = await start(app)
    yield url
    await runner.cleanup()


@pytest.fixture
async def gateway(backend_url: str, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    async with gateway_process(write_gateway_config(tmp_path, backend_url), port=free_port()) as process:
        yield process


def memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


async def ask(gateway: GatewayProcess, kind: str, stream: bool = False) -> tuple[int, dict[str, str]]:
    url = f"{gateway.url}/resource_server/local/vllm/v1/chat/completions"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=chat(user=kind, stream=stream), headers=auth()) as response,
    ):
        document = await response.json(content_type=None)
        return response.status, document.get("error", {})


async def test_oversized_answers_and_error_messages_are_cut_off(gateway: GatewayProcess) -> None:
    assert (await ask(gateway, "small"))[0] == 200
    baseline = memory(gateway.pid, "VmRSS")
    for kind in ("huge", "bomb"):
        status, error = await ask(gateway, kind)
        assert status == 502, (kind, error)
        assert (
            error["message"] == "The backend's answer is larger than the gateway's limit of 67108864 bytes."
        )
    for stream in (False, True):
        status, error = await ask(gateway, "error", stream=stream)
        assert status == 502
        assert error["message"] == "The backend failed with an error answer over 65536 bytes."
        status, error = await ask(gateway, "long-error", stream=stream)
        assert status == 502
        assert error["message"] == "x" * 1000
    grown = memory(gateway.pid, "VmHWM") - baseline
    assert grown < 200 * MIB, f"the gateway's peak memory grew by {grown // MIB} MiB"
    assert (await ask(gateway, "small"))[0] == 200
