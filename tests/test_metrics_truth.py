"""Metrics and records tell the truth: clients that hang up, scrapes, fast phases (issues 15.5, 19.11)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support import (
    CHAT_MODEL,
    Server,
    auth,
    chat,
    samples,
    start_gateway,
    stdout_lines,
    value,
    write_gateway_config,
)


def metrics_url(gateway: Server) -> str:
    return gateway.url.removesuffix("/resource_server") + "/metrics"


async def scrape(http: aiohttp.ClientSession, gateway: Server) -> str:
    async with http.get(metrics_url(gateway)) as response:
        assert response.status == 200
        return await response.text()


async def hang_up(url: str, body: dict[str, object], after_first_chunk: bool) -> None:
    """A client that goes away: after the stream's first chunk, or before any answer."""
    async with aiohttp.ClientSession() as client:
        response = await client.post(url, json=body, headers=auth())
        if after_first_chunk:
            await response.content.readany()
        response.close()


async def test_a_client_that_hangs_up_is_a_499_not_a_500(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    runner, gateway = await start_gateway(write_gateway_config(tmp_path, backend.url))
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    try:
        before = await scrape(http, gateway)
        await hang_up(url, chat("[[chunks=20]][[chunk_delay=0.1]]", stream=True), after_first_chunk=True)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await hang_up(url, chat("[[delay=2]]"), after_first_chunk=False)
        await asyncio.sleep(0.5)
        after = await scrape(http, gateway)
        lines = await stdout_lines(capfd, lambda lines: sum('"route"' in line for line in lines) >= 2)
    finally:
        await runner.cleanup()
    labels = {"cluster": "local", "model": CHAT_MODEL}
    for status_class in ("5xx", "4xx"):
        grew = value(after, "gateway_requests_total", **labels, status_class=status_class) - value(
            before, "gateway_requests_total", **labels, status_class=status_class
        )
        assert grew == (2 if status_class == "4xx" else 0), status_class
    records = [json.loads(line) for line in lines if line.startswith('{"request_id"')]
    assert [record["status"] for record in records] == [499, 499]
    assert all(record["error"] == "The client closed the connection." for record in records)
    adaptor = {"adaptor": "DirectAPIEndpoint", **labels}
    assert value(after, "gateway_adaptor_duration_seconds_count", **adaptor, outcome="client_gone") == 2
    assert value(after, "gateway_adaptor_duration_seconds_count", **adaptor, outcome="backend_error") == 0
    assert value(after, "gateway_upstream_errors_total") == 0


async def test_scrapes_and_probes_are_neither_in_flight_nor_requests(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        async with http.get(f"{gateway.url}/health") as response:
            assert response.status == 200
        await scrape(http, gateway)
    async with http.post(
        f"{gateway.url}/local/vllm/v1/chat/completions", json=chat(), headers=auth()
    ) as response:
        assert response.status == 200
    text = await scrape(http, gateway)
    assert value(text, "gateway_requests_in_flight") == 0, "nothing is in flight at rest"
    routes = {
        dict(labels).get("route") for (name, labels) in samples(text) if name == "gateway_requests_total"
    }
    assert routes == {"/resource_server/{cluster}/{framework}/v1/{openai_path}"}


@pytest.mark.alone("authentication is timed under 1 ms: one preemption by another test's process exceeds it")
async def test_fast_phases_have_buckets_from_100_microseconds(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        async with http.post(
            f"{gateway.url}/local/vllm/v1/chat/completions", json=chat(), headers=auth()
        ) as response:
            assert response.status == 200
    text = await scrape(http, gateway)
    authentication = {"model": CHAT_MODEL, "phase": "authentication"}
    assert value(text, "gateway_phase_duration_seconds_count", **authentication) == 3
    within = value(text, "gateway_phase_duration_seconds_bucket", **authentication, le="0.001")
    assert within == 3, "a token looked up in the static table takes microseconds, not milliseconds"
    assert ("gateway_phase_duration_seconds_bucket", "0.0001") in {
        (name, dict(labels).get("le")) for name, labels in samples(text)
    }


async def test_429s_are_counted_by_the_limit_reached(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(config.read_text())
    document["limits"] = {"requests_per_second": 1, "burst": 1, "concurrent_per_user": 0}
    config.write_text(yaml.safe_dump(document))
    runner, gateway = await start_gateway(config)
    try:
        statuses = []
        for _ in range(3):
            async with http.post(
                f"{gateway.url}/local/vllm/v1/chat/completions", json=chat(), headers=auth()
            ) as response:
                statuses.append(response.status)
        text = await scrape(http, gateway)
    finally:
        await runner.cleanup()
    assert statuses == [200, 429, 429]
    assert value(text, "gateway_rate_limited_total", kind="requests") == 2
