"""Asynchronous task routes (`/{cluster}/{framework}/process`, `.../tasks/{task_id}`) end to end: the
real SDKs against the fake Globus Auth and Compute, whose "remote" function behaves like the
existing SAM3 service, called the way the existing command-line client calls it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.services.redis_server import RedisServer
from tests.compute_setup import ENDPOINT, SERVICE_ID, SERVICE_SECRET, compute_config
from tests.conftest import Server, auth, free_port, start_gateway, write_yaml
from tests.test_routes import assert_openai_error, call

SEGMENT = "11111111-aaaa-4bbb-8ccc-000000000010"


def segment_request(data_uri: str) -> dict[str, Any]:
    """The body of the existing client's `Sam3Resource.submit_image`."""
    return {
        "inference_type": "single-image",
        "data_uri": data_uri,
        "single_image_prompt": "granule",
        "weights_dir_override": None,
    }


def tasks_config(
    directory: Path, backend: Server, compute: FakeCompute, globus: FakeGlobus, **settings: Any
) -> Path:
    """The compute test setup, plus a `sam3service` framework on `hpc` with one endpoint."""
    path = compute_config(directory, backend, compute, globus, free_port(), **settings)
    clusters = yaml.safe_load((directory / "clusters.yaml").read_text())
    for cluster in clusters:
        if cluster["cluster_name"] == "hpc":
            cluster["frameworks"].append("sam3service")
    endpoints = yaml.safe_load((directory / "endpoints.yaml").read_text())
    endpoints.append(
        {
            "cluster": "hpc",
            "framework": "sam3service",
            "model": "sam3",
            "endpoint_adapter": "adaptors.globus_compute.GlobusComputeEndpoint",
            "config": {
                "api_port": 1,
                "endpoint_uuid": ENDPOINT,
                "function_uuid": SEGMENT,
                "client_id": SERVICE_ID,
                "client_secret": SERVICE_SECRET,
                "compute_url": compute.url,
                "auth_url": globus.auth_url,
                "endpoint_config_fields": {"weights_dir_override": "sam3_weights_dir"},
            },
        }
    )
    write_yaml(directory / "clusters.yaml", clusters)
    write_yaml(directory / "endpoints.yaml", endpoints)
    return path


@pytest.fixture
def release(compute: FakeCompute) -> threading.Event:
    """Set it to let held tasks finish."""
    released = threading.Event()

    def segment(data: dict[str, Any]) -> str:
        if data["data_uri"] == "fail":
            raise RuntimeError("no weights in /models/sam3")
        if data["data_uri"] == "hold":
            released.wait(10)
        return json.dumps({"input_image": data["data_uri"], "boxes": [[0, 0, 1, 1]], "scores": [0.9]})

    compute.register_function(SEGMENT, segment)
    return released


@pytest.fixture
async def gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, release: threading.Event, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await start_gateway(tasks_config(tmp_path, backend, compute, globus))
    yield server
    release.set()
    await runner.cleanup()


async def submit(http: aiohttp.ClientSession, gateway: Server, data_uri: str, user: str = "alice") -> str:
    status, document, _ = await call(
        http,
        "POST",
        f"{gateway.url}/hpc/sam3service/process",
        json=segment_request(data_uri),
        headers=auth(user),
    )
    assert status == 200, document
    assert set(document) == {"task_id"}
    return str(document["task_id"])


async def result(
    http: aiohttp.ClientSession, gateway: Server, task_id: str, user: str = "alice"
) -> tuple[int, Any, aiohttp.ClientResponse]:
    return await call(http, "GET", f"{gateway.url}/hpc/sam3service/tasks/{task_id}", headers=auth(user))


async def finished(http: aiohttp.ClientSession, gateway: Server, task_id: str) -> tuple[int, Any]:
    """Polls as the existing client does, until the task is no longer pending."""
    for _ in range(100):
        status, document, _ = await result(http, gateway, task_id)
        if status != 202:
            return status, document
        await asyncio.sleep(0.1)
    raise AssertionError("the task stayed pending")


async def test_pending_then_result_for_the_submitter_only(
    gateway: Server, compute: FakeCompute, release: threading.Event, http: aiohttp.ClientSession
) -> None:
    task_id = await submit(http, gateway, "hold")
    expected = segment_request("hold")
    del expected["weights_dir_override"]
    assert compute.task(task_id).args == [expected]
    submitted = [r.json for r in compute.requests if r.path.endswith("/submit")]
    assert "user_endpoint_config" not in submitted[-1]
    status, document, response = await result(http, gateway, task_id)
    assert (status, document) == (202, {"status": "task_accepted_and_pending", "task_id": task_id})
    assert response.headers["Retry-After"] == "2"

    status, stranger, _ = await result(http, gateway, task_id, user="bob")
    unknown_status, unknown, _ = await result(http, gateway, "5f0c8a9e-1111-4222-8333-444455556666")
    assert status == unknown_status == 404
    assert assert_openai_error(stranger)["code"] == assert_openai_error(unknown)["code"] == "task_not_found"

    release.set()
    status, document = await finished(http, gateway, task_id)
    assert status == 200
    assert document == {
        "result": {"input_image": "hold", "boxes": [[0, 0, 1, 1]], "scores": [0.9]},
        "task_id": task_id,
    }
    assert (await result(http, gateway, task_id, user="bob"))[0] == 404
    status, _, _ = await call(http, "GET", f"{gateway.url}/hpc/vllm/tasks/{task_id}", headers=auth())
    assert status == 404, "a task is read under the framework that started it"


async def test_configuration_fields_go_to_the_endpoint_config(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    """The existing client's `weights_dir_override` reaches the SAM3 endpoint's template, not the function."""
    body = {**segment_request("image"), "weights_dir_override": "/eagle/sam3-weights"}
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/hpc/sam3service/process", json=body, headers=auth()
    )
    assert status == 200
    assert "weights_dir_override" not in compute.task(document["task_id"]).args[0]
    submit = [r.json for r in compute.requests if r.path.endswith("/submit")][-1]
    assert submit["user_endpoint_config"] == {"sam3_weights_dir": "/eagle/sam3-weights"}


async def test_a_failed_task_is_a_502_with_the_remote_error(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    task_id = await submit(http, gateway, "fail")
    status, document = await finished(http, gateway, task_id)
    assert status == 502
    message = assert_openai_error(document)["message"]
    assert message == "The model's backend failed: The remote task failed (RuntimeError)."
    assert "/models/sam3" not in message, "the function's own text names paths: it stays in the log"


async def bounded(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, directory: Path, redis_url: str | None
) -> None:
    http = aiohttp.ClientSession()
    bounds = {"max_remembered": 2, "lifetime_seconds": 1.5}
    config = tasks_config(directory, backend, compute, globus, tasks=bounds, redis_url=redis_url)
    runner, gateway = await start_gateway(config)
    try:
        first, second, third = [await submit(http, gateway, f"image-{n}") for n in range(3)]
        assert (await result(http, gateway, first))[0] == 404, "the oldest is forgotten beyond the bound"
        assert (await finished(http, gateway, third))[0] == 200
        assert (await result(http, gateway, second))[0] in (200, 202)
        await asyncio.sleep(1.6)
        assert (await result(http, gateway, third))[0] == 404, "forgotten after its lifetime"
    finally:
        await runner.cleanup()
        await http.close()


async def test_tasks_are_remembered_in_bounded_number_and_time(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, release: threading.Event, tmp_path: Path
) -> None:
    await bounded(backend, compute, globus, tmp_path, None)


async def test_in_redis_too(
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    release: threading.Event,
    tmp_path: Path,
    redis_url: str,
) -> None:
    await bounded(backend, compute, globus, tmp_path, redis_url)


async def test_with_redis_any_gateway_process_reads_a_task(
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    release: threading.Event,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    redis_url = redis_server.url
    gateways = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        gateways.append(
            await start_gateway(tasks_config(tmp_path / name, backend, compute, globus, redis_url=redis_url))
        )
    try:
        (_, one), (_, two) = gateways
        task_id = await submit(http, one, "image")
        assert (await finished(http, two, task_id))[0] == 200
        assert (await result(http, two, task_id, user="bob"))[0] == 404
        await redis_server.stop()
        status, document, _ = await result(http, two, task_id)
        assert status == 503 and assert_openai_error(document)["code"] == "tasks_unavailable"
    finally:
        for runner, _ in gateways:
            await runner.cleanup()


async def test_process_refusals(gateway: Server, http: aiohttp.ClientSession) -> None:
    url = f"{gateway.url}/hpc/sam3service/process"
    status, document, _ = await call(http, "POST", url, json=["not", "an", "object"], headers=auth())
    assert status == 400 and assert_openai_error(document)["code"] == "invalid_request"
    json_type = {"Content-Type": "application/json", **auth()}
    status, document, _ = await call(http, "POST", url, data=b"{", headers=json_type)
    assert status == 400 and assert_openai_error(document)["code"] == "invalid_json"
    status, document, _ = await call(http, "POST", url, json=segment_request("x"))
    assert status == 401
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/hpc/nothing/process", json=segment_request("x"), headers=auth()
    )
    assert status == 400 and assert_openai_error(document)["code"] == "unsupported_framework"
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/local/vllm/process", json=segment_request("x"), headers=auth()
    )
    assert status == 400 and assert_openai_error(document, param="model")["code"] == "model_required"
    body = {**segment_request("x"), "model": "intfloat/e5-small-v2"}
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/local/vllm/process", json=body, headers=auth()
    )
    assert status == 400 and "asynchronous tasks" in assert_openai_error(document)["message"]


async def test_reading_a_task_counts_against_the_rate_limit(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, release: threading.Event, tmp_path: Path
) -> None:
    """Every read asks Globus Compute: a client polling in a tight loop is slowed like any other."""
    limits = {"requests_per_second": 1, "burst": 3, "concurrent_per_user": 0}
    runner, gateway = await start_gateway(tasks_config(tmp_path, backend, compute, globus, limits=limits))
    try:
        async with aiohttp.ClientSession() as http:
            task_id = await submit(http, gateway, "hold")
            statuses = [(await result(http, gateway, task_id))[0] for _ in range(4)]
    finally:
        await runner.cleanup()
    assert statuses[0] == 202 and statuses[-1] == 429
