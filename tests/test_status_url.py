"""The Metis-style status-URL cluster: its own status document mapped to the jobs shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from testing.fake_vllm import REQUESTS
from tests.conftest import Server, auth, start, start_gateway, write_gateway_config, write_yaml

METIS_STATUS = {
    "gpt-oss-120b": {
        "model": "gpt-oss-120b-131072",
        "description": "gpt oss 131K",
        "status": "Live",
        "model_version": 1,
        "model_key": "secret-key-do-not-show",
        "url": "https://internal.example/gpt",
        "endpoint_id": "internal-id",
    },
    "maverick": {"model": "Llama-4-Maverick", "description": "mav", "status": "Live", "model_version": 4},
    "old": {"model": "Old-Model", "description": "retired", "status": "Stopped"},
    "soon": {"model": "New-Model", "description": "loading", "status": "Starting"},
}


@pytest.fixture
async def metis() -> AsyncIterator[Server]:
    async def status(_: web.Request) -> web.Response:
        return web.json_response(METIS_STATUS)

    app = web.Application()
    app.router.add_get("/status", status)
    runner, url = await start(app)
    yield Server(url=url, app=app)
    await runner.cleanup()


async def test_metis_status_in_the_jobs_shape(
    metis: Server, backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = write_gateway_config(tmp_path, backend.url)
    cluster = {
        "cluster_name": "metis",
        "cluster_adapter": "resource_server_async.clusters.metis.MetisCluster",
        "frameworks": ["api"],
        "openai_endpoints": ["chat/completions"],
        "config": {"status_url": f"{metis.url}/status"},
    }
    endpoints = [
        {
            "cluster": "metis",
            "framework": "api",
            "model": model,
            "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
            "config": {"api_url": f"{backend.url}/v1"},
        }
        for model in ("gpt-oss-120b-131072", "Llama-4-Maverick", "Old-Model", "New-Model")
    ]
    write_yaml(tmp_path / "clusters.yaml", [cluster])
    write_yaml(tmp_path / "endpoints.yaml", endpoints)
    runner, gateway = await start_gateway(config)
    try:
        async with http.get(f"{gateway.url}/metis/jobs", headers=auth()) as response:
            assert response.status == 200
            jobs = await response.json()
    finally:
        await runner.cleanup()
    assert [job["Models"] for job in jobs["running"]] == ["gpt-oss-120b-131072", "Llama-4-Maverick"]
    assert jobs["running"][0] == {
        "Models": "gpt-oss-120b-131072",
        "Framework": "api",
        "Cluster": "metis",
        "Model Status": "running",
        "Description": "gpt-oss-120b-131072 - gpt oss 131K",
        "Model Version": 1,
    }
    assert [job["Models"] for job in jobs["stopped"]] == ["Old-Model"]
    assert [(job["Models"], job["Model Status"]) for job in jobs["queued"]] == [("New-Model", "starting")]
    status = {"cluster": "metis", "total_models": 4, "live_models": 2, "stopped_models": 1}
    assert jobs["cluster_status"] == status
    assert "secret-key-do-not-show" not in str(jobs)


async def test_a_failing_status_source_is_not_asked_by_every_request(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    calls = []

    async def broken(_: web.Request) -> web.Response:
        calls.append(1)
        return web.json_response({"detail": "scheduler down"}, status=500)

    app = web.Application()
    app.router.add_get("/status", broken)
    status_runner, status_url = await start(app)
    config = write_gateway_config(tmp_path, backend.url)
    cluster = {
        "cluster_name": "metis",
        "cluster_adapter": "adaptors.status_url.MetisCluster",
        "frameworks": ["api"],
        "openai_endpoints": ["chat/completions"],
        "config": {"status_url": f"{status_url}/status"},
    }
    write_yaml(tmp_path / "clusters.yaml", [cluster])
    write_yaml(tmp_path / "endpoints.yaml", [])
    runner, gateway = await start_gateway(config)
    try:
        for _ in range(3):
            async with http.get(f"{gateway.url}/metis/jobs", headers=auth()) as response:
                assert response.status == 502
                assert (await response.json())["error"]["message"] == "scheduler down"
    finally:
        await runner.cleanup()
        await status_runner.cleanup()
    assert len(calls) == 1


async def test_metis_sends_the_stream_field_it_sets_not_the_clients_bytes(
    metis: Server, backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """MetisEndpoint changes the client's fields (`stream`): it must not forward the client's bytes."""
    config = write_gateway_config(tmp_path, backend.url)
    cluster = {
        "cluster_name": "metis",
        "cluster_adapter": "resource_server_async.clusters.metis.MetisCluster",
        "frameworks": ["api"],
        "openai_endpoints": ["chat/completions"],
        "config": {"status_url": f"{metis.url}/status"},
    }
    endpoint = {
        "cluster": "metis",
        "framework": "api",
        "model": "Llama-4-Maverick",
        "endpoint_adapter": "adaptors.metis.MetisEndpoint",
        "config": {"api_url": f"{backend.url}/v1"},
    }
    write_yaml(tmp_path / "clusters.yaml", [cluster])
    write_yaml(tmp_path / "endpoints.yaml", [endpoint])
    runner, gateway = await start_gateway(config)
    body = {"model": "Llama-4-Maverick", "messages": [{"role": "user", "content": "Hi"}]}
    try:
        url = f"{gateway.url}/metis/api/v1/chat/completions"
        async with http.post(url, json=body, headers=auth()) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()
    assert backend.app[REQUESTS][-1]["body"] == {**body, "stream": False}
