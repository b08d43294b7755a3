"""Client retries: the answers tell the openai and anthropic SDKs when a retry would only repeat
work (`x-should-retry: false`) and when to come back (`Retry-After`). The SDKs retry 408, 409, 429
and every 5xx twice by default; these tests run the real openai client with its default retries
and count what reached the backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
import yaml

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_vllm import REQUESTS
from tests.compute_setup import ENDPOINT, SLOW_MODEL, compute_config
from tests.conftest import CHAT_MODEL, TOKENS, Server, auth, chat, free_port, start_gateway
from tests.test_batches import BATCH, batch_function, input_file
from tests.test_routes import assert_openai_error, call


@pytest.fixture
async def hpc_gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await start_gateway(compute_config(tmp_path, backend, compute, globus, free_port()))
    yield server
    await runner.cleanup()


def retrying_client(base_url: str, timeout: float = 30) -> openai.AsyncOpenAI:
    """The SDK's default retries (2), which a researcher's script has."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=TOKENS["alice"], timeout=timeout)


async def test_a_compute_timeout_is_not_retried(hpc_gateway: Server, compute: FakeCompute) -> None:
    async with retrying_client(f"{hpc_gateway.url}/hpc/vllm/v1") as api:
        with pytest.raises(openai.InternalServerError) as failed:
            await api.chat.completions.create(
                model=SLOW_MODEL, messages=[{"role": "user", "content": "[[delay=1.5]]"}]
            )
    assert failed.value.status_code == 504
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(compute.tasks) == 1, "each retry would have queued the same work again"


async def test_a_failed_compute_task_is_not_retried(hpc_gateway: Server, compute: FakeCompute) -> None:
    async with retrying_client(f"{hpc_gateway.url}/hpc/vllm/v1") as api:
        with pytest.raises(openai.InternalServerError) as failed:
            await api.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "[[status=500]]"}]
            )
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(compute.tasks) == 1


async def test_a_stream_whose_task_failed_before_its_first_chunk_is_not_retried(
    hpc_gateway: Server, compute: FakeCompute
) -> None:
    async with retrying_client(f"{hpc_gateway.url}/hpc/vllm/v1") as api:
        with pytest.raises(openai.InternalServerError) as failed:
            await api.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "[[status=500]]"}], stream=True
            )
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(compute.tasks) == 1


async def test_a_configuration_globus_refuses_is_not_retried(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    path = compute_config(tmp_path, backend, compute, globus, free_port())
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    hpc_chat = next(e for e in endpoints if e["cluster"] == "hpc" and e["model"] == CHAT_MODEL)
    hpc_chat["config"]["function_uuid"] = "22222222-aaaa-4bbb-8ccc-000000000009"
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    runner, gateway = await start_gateway(path)
    try:
        url = f"{gateway.url}/hpc/vllm/v1/chat/completions"
        status, document, response = await call(http, "POST", url, json=chat(), headers=auth())
    finally:
        await runner.cleanup()
    assert status == 502 and "configuration" in assert_openai_error(document)["message"]
    assert response.headers["x-should-retry"] == "false"
    assert compute.count("/submit") == 1 and not compute.tasks


async def test_offline_and_cold_start_say_when_to_come_back(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    compute.set_endpoint(ENDPOINT, status="offline")
    path = compute_config(
        tmp_path, backend, compute, globus, free_port(), chat_config={"loading_estimate_seconds": 90}
    )
    runner, gateway = await start_gateway(path)
    url = f"{gateway.url}/hpc/vllm/v1/chat/completions"
    try:
        status, _, offline = await call(http, "POST", url, json=chat(), headers=auth())
        assert status == 503 and offline.headers["Retry-After"] == "10"
        assert "x-should-retry" not in offline.headers
    finally:
        await runner.cleanup()
    compute.set_endpoint(ENDPOINT, status="online", managers=0)
    (tmp_path / "cold").mkdir()
    path = compute_config(
        tmp_path / "cold", backend, compute, globus, free_port(), chat_config={"loading_estimate_seconds": 90}
    )
    runner, gateway = await start_gateway(path)
    url = f"{gateway.url}/hpc/vllm/v1/chat/completions"
    try:
        status, _, _ = await call(http, "POST", url, json=chat(), headers=auth())
        assert status == 200, "the first request submits, and so starts the model"
        status, document, cold = await call(http, "POST", url, json=chat(), headers=auth())
        assert status == 503 and "starting" in assert_openai_error(document)["message"]
        assert 85 <= int(cold.headers["Retry-After"]) <= 90
        assert "x-should-retry" not in cold.headers
    finally:
        await runner.cleanup()


async def test_direct_api_answers(gateway: Server, backend: Server, http: aiohttp.ClientSession) -> None:
    base = f"{gateway.url}/local/vllm/v1"
    async with retrying_client(base) as api:
        with pytest.raises(openai.InternalServerError) as timed_out:
            await api.chat.completions.create(
                model="slow/model", messages=[{"role": "user", "content": "[[delay=1]]"}]
            )
        assert timed_out.value.status_code == 504
        assert timed_out.value.response.headers["x-should-retry"] == "false"
        assert len(backend.app[REQUESTS]) == 1
        with pytest.raises(openai.InternalServerError) as failed:
            await api.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "[[status=500]]"}]
            )
        assert failed.value.status_code == 502
        assert failed.value.response.headers["x-should-retry"] == "false"
        assert len(backend.app[REQUESTS]) == 2
    status, _, busy = await call(
        http, "POST", f"{base}/chat/completions", json=chat("[[status=503]]"), headers=auth()
    )
    assert status == 503 and busy.headers["Retry-After"] == "10"
    status, _, limited = await call(
        http, "POST", f"{base}/chat/completions", json=chat("[[status=429]]"), headers=auth()
    )
    assert status == 429 and limited.headers["Retry-After"] == "10"
    status, _, unreachable = await call(
        http, "POST", f"{base}/chat/completions", json=chat(model="dead/model"), headers=auth()
    )
    assert status == 502 and "x-should-retry" not in unreachable.headers, "worth a retry: nothing ran"


async def test_federated_timeouts_are_not_retried(gateway: Server, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    status, document, response = await call(
        http, "POST", url, json=chat("[[delay=1]]", model="slow/model"), headers=auth()
    )
    assert status == 503 and assert_openai_error(document)["code"] == "model_unavailable"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["Retry-After"] == "10"


async def test_maintenance_says_when_to_come_back_and_not_to_retry(
    gateway: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    (tmp_path / "maintenance.yaml").write_text(yaml.safe_dump({"local": "Down until noon."}))
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    status, document, response = await call(http, "POST", url, json=chat(), headers=auth())
    assert status == 503 and assert_openai_error(document)["code"] == "cluster_maintenance"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["Retry-After"] == "600"


async def test_the_anthropic_client_obeys_too(hpc_gateway: Server, compute: FakeCompute) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=f"{hpc_gateway.url}/hpc/vllm", auth_token=TOKENS["alice"], timeout=30
    ) as claude:
        with pytest.raises(anthropic.InternalServerError) as failed:
            await claude.messages.create(
                model=SLOW_MODEL, max_tokens=8, messages=[{"role": "user", "content": "[[delay=1.5]]"}]
            )
    assert failed.value.status_code == 504
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(compute.tasks) == 1


async def test_batch_conflicts_are_not_retried(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """409 and 429 are retried by the SDKs, but an active batch does not end within seconds."""
    compute.register_function(BATCH, batch_function)
    compute.queue_delay = 5
    config = compute_config(
        tmp_path,
        backend,
        compute,
        globus,
        free_port(),
        database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        batches={"max_active_per_user": 1},
        chat_config={"batch_endpoint_uuid": ENDPOINT, "batch_function_uuid": BATCH},
    )
    runner, gateway = await start_gateway(config)
    url = f"{gateway.url}/hpc/vllm/v1/batches"
    try:
        first = {"input_file": input_file(tmp_path, "a.jsonl"), "model": CHAT_MODEL}
        assert (await call(http, "POST", url, json=first, headers=auth()))[0] == 200
        status, _, ongoing = await call(http, "POST", url, json=first, headers=auth())
        assert status == 409 and ongoing.headers["x-should-retry"] == "false"
        second = {"input_file": input_file(tmp_path, "b.jsonl"), "model": CHAT_MODEL}
        status, _, quota = await call(http, "POST", url, json=second, headers=auth())
        assert status == 429 and quota.headers["x-should-retry"] == "false"
    finally:
        await runner.cleanup()
