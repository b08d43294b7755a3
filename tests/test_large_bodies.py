"""A user sending large bodies does not stall everyone else: with the deployed limits, a gateway
process receiving 20 MB chat bodies back to back from one user keeps answering `/health` (and
other users) promptly. Parsing is CPU work on the event loop; the gateway reads, parses and
validates large bodies in turns, after the user's rate limits admitted the request."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import CHAT_MODEL, EMBED_MODEL, auth, chat, free_port, write_gateway_config
from tests.processes import backend_process, gateway_process

SENDERS = 6
SECONDS = 8.0


def large_body() -> bytes:
    """About 20 MB: a long conversation of many short turns, the costliest shape to parse. For the
    endpoint whose backend is down: the gateway does all its work (read, parse, validate, encode
    for the backend), then answers 502 at once, and no backend keeps the bodies."""
    turns = [{"role": "user", "content": f"turn {n}: " + "word " * 16} for n in range(160_000)]
    return json.dumps({"model": "dead/model", "messages": turns, "max_tokens": 4}).encode()


async def send_large(url: str, body: bytes, until: float, statuses: Counter[int]) -> None:
    headers = {**auth(), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < until:
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()
                statuses[response.status] += 1
                if response.status == 429:
                    await asyncio.sleep(float(response.headers["Retry-After"]))


async def poll(url: str, until: float, **request: object) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < until:
            started = time.monotonic()
            async with http.request("POST" if request else "GET", url, **request) as response:  # type: ignore[arg-type]
                await response.read()
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    return latencies


@pytest.mark.alone("median latencies under 0.6 s and 1 s while 20 MB bodies are parsed: it measures the CPU")
async def test_health_and_other_users_stay_fast_while_a_user_sends_20_mb_bodies(tmp_path: Path) -> None:
    async with backend_process(CHAT_MODEL, EMBED_MODEL) as (_, backend_url):
        config = write_gateway_config(tmp_path, backend_url)
        document = yaml.safe_load(config.read_text())
        del document["limits"], document["server"]["port"]  # the deployed limits and body size
        config.write_text(yaml.safe_dump(document))
        port = free_port()
        async with gateway_process(config, port=port) as gateway:
            base = f"{gateway.url}/resource_server"
            body = large_body()
            assert 19_000_000 < len(body) < 20 * 1024 * 1024
            statuses: Counter[int] = Counter()
            until = time.monotonic() + SECONDS
            senders = [send_large(f"{base}/local/vllm/v1/chat/completions", body, until, statuses)] * SENDERS
            flooding = asyncio.gather(*senders)
            await asyncio.sleep(1.0)
            health, other_user = await asyncio.gather(
                poll(f"{base}/health", until),
                poll(f"{base}/local/vllm/v1/chat/completions", until, json=chat(), headers=auth("bob")),
            )
            await flooding
    assert statuses[502] >= 4, statuses
    assert set(statuses) <= {502, 429, 503}, statuses
    print(f"health: median {statistics.median(health):.3f} s, max {max(health):.3f} s")
    print(f"another user: median {statistics.median(other_user):.3f} s, max {max(other_user):.3f} s")
    # Medians: the machine is shared, and a single slow answer says more about it than the gateway.
    # Before large bodies took turns, /health's median was 1.2 s here (0.9 to 2.3 s in production).
    assert statistics.median(health) < 0.6, "/health waited behind the parsing of large bodies"
    assert statistics.median(other_user) < 1.0, "another user's request waited behind large bodies"


async def test_a_user_over_the_limits_is_refused_before_the_body_is_read(tmp_path: Path) -> None:
    """A request past the user's rate is answered 429 at once, though its 10 MB body never comes."""
    async with backend_process(CHAT_MODEL) as (_, backend_url):
        config = write_gateway_config(tmp_path, backend_url)
        document = yaml.safe_load(config.read_text())
        document["limits"] = {"requests_per_second": 0.1, "burst": 1}
        del document["server"]["port"]
        config.write_text(yaml.safe_dump(document))
        port = free_port()
        async with gateway_process(config, port=port) as gateway, aiohttp.ClientSession() as http:
            url = f"{gateway.url}/resource_server/local/vllm/v1/chat/completions"
            async with http.post(url, json=chat(), headers=auth()) as response:
                assert response.status == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /resource_server/local/vllm/v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                + f"Authorization: Bearer {auth()['Authorization'].split()[1]}\r\n".encode()
                + b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{"
            )
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            writer.close()
    assert answer.startswith(b"HTTP/1.1 429 "), answer
