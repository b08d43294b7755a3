"""Request ids, Prometheus metrics and exact token usage, over HTTP against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.core.usage import ask_for_usage
from proxy.records.schema import connect
from proxy.records.usage_store import UsageStore
from testing.fake_vllm import REQUESTS
from tests.processes import wait_until_serving
from tests.support import (
    CHAT_MODEL,
    TOKENS,
    USERS,
    Server,
    auth,
    chat,
    free_port,
    samples,
    start_gateway,
    summed_value,
    value,
    write_gateway_config,
)

ROOT = Path(__file__).resolve().parent.parent


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


def chat_url(gateway: Server) -> str:
    return f"{gateway.url}/local/vllm/v1/chat/completions"


async def test_request_ids(gateway: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/health", headers={"X-Request-ID": "abc-123"}) as response:
        assert response.headers["X-Request-ID"] == "abc-123"
    async with http.get(f"{gateway.url}/whoami", headers={"X-Request-ID": "bad id\twith spaces"}) as response:
        assert response.status == 401
        generated = response.headers["X-Request-ID"]
        assert len(generated) == 32 and generated != "bad id\twith spaces"
    async with http.post(chat_url(gateway), json=chat(stream=True), headers=auth()) as response:
        assert len(response.headers["X-Request-ID"]) == 32
        await response.read()


async def test_metrics_move_when_requests_flow(gateway: Server, http: aiohttp.ClientSession) -> None:
    metrics_url = gateway.url.removesuffix("/resource_server") + "/metrics"
    before = await scrape(http, metrics_url)
    async with http.post(chat_url(gateway), json=chat(), headers=auth()) as response:
        assert response.status == 200
    async with http.post(
        chat_url(gateway), json=chat("[[chunks=4]]", stream=True), headers=auth()
    ) as response:
        await response.read()
    async with http.post(chat_url(gateway), json=chat("[[status=500]]"), headers=auth()) as response:
        assert response.status == 502
    after = await scrape(http, metrics_url)
    route = "/resource_server/{cluster}/{framework}/v1/{openai_path}"
    labels = {"route": route, "cluster": "local", "framework": "vllm", "model": CHAT_MODEL}

    def grew(name: str, by: float, **extra: str) -> None:
        assert value(after, name, **extra) - value(before, name, **extra) == by, name

    grew("gateway_requests_total", 2, **labels, status_class="2xx")
    grew("gateway_requests_total", 1, **labels, status_class="5xx")
    adaptor = {"adaptor": "DirectAPIEndpoint", "cluster": "local", "model": CHAT_MODEL}
    grew("gateway_adaptor_duration_seconds_count", 2, **adaptor, outcome="ok")
    grew("gateway_adaptor_duration_seconds_count", 1, **adaptor, outcome="backend_error")
    grew("gateway_stream_first_chunk_seconds_count", 1, model=CHAT_MODEL)
    for phase in ("authentication", "total"):
        grew("gateway_phase_duration_seconds_count", 3, **adaptor, phase=phase)
    grew("gateway_phase_duration_seconds_count", 1, **adaptor, phase="first_byte")
    assert value(after, "gateway_tokens_total", model=CHAT_MODEL, kind="completion") > value(
        before, "gateway_tokens_total", model=CHAT_MODEL, kind="completion"
    )
    assert value(after, "gateway_requests_in_flight") == 0, "a scrape is not counted in flight"
    label_values = {v for _, labels in samples(after) for _, v in labels}
    assert not label_values & {TOKENS["alice"], USERS["alice"]["id"], USERS["alice"]["username"]}


async def test_stream_usage_is_exact_without_changing_the_clients_stream(
    gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        chat_url(gateway), json=chat("[[chunks=3]]", stream=True), headers=auth()
    ) as response:
        events = (await response.read()).decode().split("\n\n")
    assert backend.app[REQUESTS][-1]["body"]["stream_options"] == {"include_usage": True}
    assert not any('"usage"' in event for event in events), "the client did not ask for usage"
    assert events[-2] == "data: [DONE]"
    asked = chat("[[chunks=3]]", stream=True, stream_options={"include_usage": True})
    async with http.post(chat_url(gateway), json=asked, headers=auth()) as response:
        events = (await response.read()).decode().split("\n\n")
    usage = [json.loads(e.removeprefix("data: ")) for e in events if '"usage"' in e]
    assert usage and usage[-1]["choices"] == [] and usage[-1]["usage"]["completion_tokens"] == 3


def test_only_chat_and_completions_streams_are_asked_for_usage() -> None:
    """The one field the gateway adds to what the client sent, merged into the client's own options;
    Responses and Messages streams report usage unasked and go to the backend as sent."""
    chat_params = {"openai_endpoint": "chat/completions", "stream_options": {"continuous_usage_stats": True}}
    assert ask_for_usage(chat_params) is True
    assert chat_params["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    asked = {"openai_endpoint": "completions", "stream_options": {"include_usage": True}}
    assert ask_for_usage(asked) is False and asked["stream_options"] == {"include_usage": True}
    for path in ("responses", "messages"):
        params: dict[str, Any] = {"openai_endpoint": path}
        assert ask_for_usage(params) is False and params == {"openai_endpoint": path}


async def configured_gateway(backend: Server, tmp_path: Path, **settings: Any) -> tuple[Any, Server]:
    path = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(path.read_text()) | settings
    path.write_text(yaml.safe_dump(document))
    return await start_gateway(path)


async def test_metrics_only_for_allowed_networks(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await configured_gateway(backend, tmp_path, metrics={"allow": ["10.0.0.0/8"]})
    try:
        async with http.get(gateway.url.removesuffix("/resource_server") + "/metrics") as response:
            assert response.status == 403
            assert (await response.json())["error"]["type"] == "permission_error"
    finally:
        await runner.cleanup()


async def test_metrics_on_their_own_port(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    runner, gateway = await configured_gateway(backend, tmp_path, metrics={"port": port, "path": "/prom"})
    try:
        async with http.get(gateway.url.removesuffix("/resource_server") + "/prom") as response:
            assert response.status == 404
        assert "gateway_requests_total" in await scrape(http, f"http://127.0.0.1:{port}/prom")
    finally:
        await runner.cleanup()


async def test_metrics_switched_off(backend: Server, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """For sites that do not scrape, and for the benchmark's comparison with everything off."""
    runner, gateway = await configured_gateway(backend, tmp_path, metrics={"enabled": False})
    try:
        async with http.post(chat_url(gateway), json=chat(stream=True), headers=auth()) as response:
            assert response.status == 200
            await response.read()
        async with http.post(chat_url(gateway), json=chat(), headers=auth()) as response:
            assert response.status == 200
        async with http.get(gateway.url.removesuffix("/resource_server") + "/metrics") as response:
            assert response.status == 404
    finally:
        await runner.cleanup()


async def test_two_worker_processes_are_summed(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Processes sharing a metrics directory: a scrape of either one sees both one's requests."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    processes, urls = [], []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        port = free_port()
        config = write_gateway_config(tmp_path / name, backend.url, port=port)
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "--config",
                str(config),
                cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            await wait_until_serving(http, f"{url}/resource_server/health", timeout=10)
        for url, count in zip(urls, (3, 5), strict=True):
            for _ in range(count):
                async with http.post(
                    f"{url}/resource_server/local/vllm/v1/chat/completions", json=chat(), headers=auth()
                ) as response:
                    assert response.status == 200
        for url in urls:
            total = await summed_value(
                http, f"{url}/metrics", "gateway_requests_total", 8, model=CHAT_MODEL, status_class="2xx"
            )
            assert total == 8
    finally:
        for process in processes:
            process.terminate()
            await process.wait()


@pytest.mark.parametrize("path", ["/resource_server/health", "/resource_server/status"])
async def test_health_checks_never_reach_a_backend(
    gateway: Server, backend: Server, http: aiohttp.ClientSession, path: str
) -> None:
    before = len(backend.app[REQUESTS])
    async with http.get(gateway.url.removesuffix("/resource_server") + path) as response:
        assert response.status == 200
    assert len(backend.app[REQUESTS]) == before


@pytest.mark.parametrize("shared", [False, True])
async def test_rate_limits_answer_429_with_retry_after(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, redis_url: str, shared: bool
) -> None:
    settings: dict[str, Any] = {"limits": {"requests_per_second": 1, "burst": 2, "concurrent_per_user": 0}}
    if shared:
        settings["redis_url"] = redis_url
    runner, gateway = await configured_gateway(backend, tmp_path, **settings)
    try:
        statuses = []
        for _ in range(3):
            async with http.post(chat_url(gateway), json=chat(), headers=auth()) as response:
                statuses.append(response.status)
                retry_after = response.headers.get("Retry-After")
                document = await response.json()
        assert statuses == [200, 200, 429]
        assert retry_after == "1" and document["error"]["type"] == "rate_limit_error"
        async with http.post(chat_url(gateway), json=chat(), headers=auth("bob")) as response:
            assert response.status == 200, "limits are per user"
    finally:
        await runner.cleanup()


async def test_tokens_per_minute_from_the_endpoint_fields(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    path = write_gateway_config(tmp_path, backend.url)
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    endpoints[0]["tpm_user"] = 20
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    runner, gateway = await start_gateway(path)
    try:
        statuses = []
        for _ in range(4):
            async with http.post(chat_url(gateway), json=chat(max_tokens=16), headers=auth()) as response:
                statuses.append(response.status)
        assert statuses[0] == 200 and statuses[-1] == 429
        async with http.post(chat_url(gateway), json=chat(), headers=auth("bob")) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()


async def test_concurrent_streams_per_user(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    limits = {"requests_per_second": 0, "concurrent_per_user": 1}
    runner, gateway = await configured_gateway(backend, tmp_path, limits=limits)
    try:
        body = chat("[[chunks=5]][[chunk_delay=0.1]]", stream=True)
        async with http.post(chat_url(gateway), json=body, headers=auth()) as first:
            await first.content.readany()
            async with http.post(chat_url(gateway), json=chat(), headers=auth()) as second:
                assert second.status == 429
            await first.read()
        async with http.post(chat_url(gateway), json=chat(), headers=auth()) as third:
            assert third.status == 200, "the stream's slot was released at its end"
    finally:
        await runner.cleanup()


async def test_maintenance_without_a_restart(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    path = write_gateway_config(tmp_path, backend.url)
    runner, gateway = await start_gateway(path)
    cli = [sys.executable, "-m", "proxy", "maintenance", "--config", str(path)]
    try:
        process = await asyncio.create_subprocess_exec(
            *cli,
            "on",
            "local",
            "--message",
            "GPU upgrade until Monday",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await process.communicate()
        assert process.returncode == 0 and b"local: GPU upgrade until Monday" in output
        await asyncio.sleep(1.1)
        async with http.post(chat_url(gateway), json=chat(), headers=auth()) as response:
            assert response.status == 503
            assert (await response.json())["error"]["message"] == "GPU upgrade until Monday"
        async with http.get(f"{gateway.url}/status") as response:
            assert (await response.json())["local"] is False
        async with http.get(f"{gateway.url}/local/jobs", headers=auth()) as response:
            jobs = await response.json()
        assert jobs["running"] == [] and {job["Model Status"] for job in jobs["stopped"]} == {"stopped"}
        assert CHAT_MODEL in {job["Models"] for job in jobs["stopped"]}
        process = await asyncio.create_subprocess_exec(*cli, "off", "local", cwd=ROOT)
        assert await process.wait() == 0
        await asyncio.sleep(1.1)
        async with http.post(chat_url(gateway), json=chat(), headers=auth()) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()


async def test_maintenance_from_the_configuration(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await configured_gateway(backend, tmp_path, maintenance={"local": "Down for a week"})
    try:
        async with http.post(chat_url(gateway), json=chat(), headers=auth()) as response:
            assert (
                response.status == 503 and (await response.json())["error"]["code"] == "cluster_maintenance"
            )
    finally:
        await runner.cleanup()


async def test_each_request_leaves_a_json_line_and_a_stored_record(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    runner, gateway = await configured_gateway(
        backend, tmp_path, request_log={"store_prompts": True, "trusted_proxies": ["127.0.0.1/32"]}
    )
    try:
        headers = {**auth(), "X-Request-ID": "req-42", "X-Forwarded-For": "198.51.100.7, 127.0.0.1"}
        async with http.post(chat_url(gateway), json=chat("Count me"), headers=headers) as response:
            answer = await response.json()
        async with http.post(chat_url(gateway), json=chat(stream=True), headers=auth("bob")) as response:
            await response.read()
        async with http.get(f"{gateway.url}/whoami", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
    finally:
        await runner.cleanup()
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    chat_line = next(line for line in lines if line["request_id"] == "req-42")
    assert chat_line["username"] == "alice@uni.edu" and chat_line["status"] == 200
    assert chat_line["client_ip"] == "198.51.100.7" and chat_line["model"] == CHAT_MODEL
    assert chat_line["total_tokens"] == answer["usage"]["total_tokens"]
    assert "Count me" in chat_line["prompt"] and chat_line["result"]
    stream_line = next(line for line in lines if line["username"] == "bob@other.org")
    assert stream_line["stream"] is True and stream_line["completion_tokens"] and stream_line["ttfc_ms"] > 0
    refused = next(line for line in lines if line["status"] == 401)
    assert refused["error"] == "Invalid or expired access token." and "wrong" not in json.dumps(refused)
    database = await connect(f"sqlite:///{tmp_path / 'gateway.db'}")
    try:
        by_user = {row["user"]: row for row in await UsageStore(database).usage(since=0, by="user")}
    finally:
        await database.close()
    assert by_user["alice@uni.edu"]["total_tokens"] == answer["usage"]["total_tokens"]
    assert by_user["bob@other.org"]["requests"] == 1


async def test_forwarded_for_is_ignored_from_untrusted_peers(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    runner, gateway = await configured_gateway(
        backend, tmp_path, request_log={"trusted_proxies": ["10.0.0.1/32"]}
    )
    try:
        headers = {"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "spoof"}
        async with http.get(f"{gateway.url}/status", headers=headers) as response:
            assert response.status == 200
        async with http.get(f"{gateway.url}/health", headers={"X-Request-ID": "probe"}) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()
    output = capfd.readouterr().out
    line = next(json.loads(x) for x in output.splitlines() if '"spoof"' in x)
    assert line["client_ip"] == "127.0.0.1"
    assert '"probe"' not in output, "health probes leave no record"
