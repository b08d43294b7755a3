"""A site of the existing gateway moves with its fixtures unchanged: a production-style fixture
(Globus Compute on Sophia, nine Metis entries), dumpdata exports, clusters listing `health` and
`metrics`. The files are in tests/site/; only the hosts are pointed at local fakes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from bench.backend import REQUESTS
from tests.conftest import Server, auth, chat, start, start_gateway, write_gateway_config

SITE = Path(__file__).resolve().parent / "site"
METIS_HOST = "https://metis.alcf.anl.gov"

METIS_STATUS = {
    "gpt-oss-120b": {
        "model": "gpt-oss-120b-128k",
        "description": "gpt oss, 128K context",
        "status": "Live",
        "model_version": 2,
        "model_key": "not-for-users",
        "url": "https://internal.example/gpt",
        "endpoint_id": "7d3c0f4e",
    },
    "maverick": {
        "model": "Llama-4-Maverick-17B-128E-Instruct",
        "description": "maverick",
        "status": "Live",
        "model_version": 4,
    },
    "gpt-oss-32k": {"model": "gpt-oss-120b-32k", "description": "32K", "status": "Stopped"},
}


@pytest.fixture
async def metis_status() -> AsyncIterator[Server]:
    """The Metis status service: one JSON document of every model and its state."""

    async def status(request: web.Request) -> web.Response:
        request.app[CALLS].append(request.path)
        return web.json_response(METIS_STATUS)

    app = web.Application()
    app[CALLS] = []
    app.router.add_get("/status", status)
    runner, url = await start(app)
    yield Server(url=url, app=app)
    await runner.cleanup()


CALLS = web.AppKey("calls", list[str])


@pytest.fixture
def site_environment(monkeypatch: pytest.MonkeyPatch, metis_status: Server) -> None:
    """What the site's .env holds for these fixtures."""
    monkeypatch.setenv("METIS_STATUS_URL", f"{metis_status.url}/status")
    monkeypatch.setenv("METIS_GPT_OSS_120B_API_KEY", "metis-gpt-key")
    monkeypatch.setenv("METIS_MAVERICK_API_KEY", "metis-maverick-key")
    monkeypatch.setenv("SERVICE_ACCOUNT_ID", "0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d")
    monkeypatch.setenv("SERVICE_ACCOUNT_SECRET", "service-secret")


def site_config(tmp_path: Path, backend_url: str, endpoints: str = "endpoints.json") -> Path:
    """The gateway configuration of the test suite, with the site's fixture files as they are."""
    config = write_gateway_config(tmp_path, backend_url)
    for name in (endpoints, "clusters.json"):
        text = (SITE / name).read_text().replace(METIS_HOST, backend_url)
        (tmp_path / name).write_text(text)
    document = yaml.safe_load(config.read_text())
    document.update(endpoints_file=endpoints, clusters_file="clusters.json")
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.fixture
async def site_gateway(
    tmp_path: Path, backend: Server, site_environment: None
) -> AsyncIterator[Server]:
    runner, gateway = await start_gateway(site_config(tmp_path, backend.url))
    yield gateway
    await runner.cleanup()


def metis_url(gateway: Server) -> str:
    return f"{gateway.url}/metis/api/v1/chat/completions"


async def test_production_fixture_with_metis_entries_serves_live_models(
    site_gateway: Server, backend: Server, http: aiohttp.ClientSession
) -> None:
    sent = chat("Hi", model="gpt-oss-120b-128k", max_tokens=3)
    async with http.post(metis_url(site_gateway), json=sent, headers=auth()) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["object"] == "chat.completion"
    forwarded = backend.app[REQUESTS][-1]
    assert forwarded["path"] == "/v1/chat/completions"
    assert forwarded["body"] == {**sent, "stream": False}
    assert forwarded["headers"]["Authorization"] == "Bearer metis-gpt-key"

    streamed = chat("Hi", model="Llama-4-Maverick-17B-128E-Instruct", max_tokens=3, stream=True)
    async with http.post(metis_url(site_gateway), json=streamed, headers=auth()) as response:
        assert response.status == 200
        events = (await response.read()).decode()
    assert events.rstrip().endswith("data: [DONE]")
    forwarded = backend.app[REQUESTS][-1]
    assert forwarded["body"]["stream"] is True
    assert forwarded["headers"]["Authorization"] == "Bearer metis-maverick-key"


@pytest.mark.parametrize("model", ["gpt-oss-120b-32k", "gpt-oss-120b-8k"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_metis_model_not_live_is_a_503_and_never_reaches_metis(
    site_gateway: Server, backend: Server, http: aiohttp.ClientSession, model: str, stream: bool
) -> None:
    body = chat("Hi", model=model, stream=stream)
    async with http.post(metis_url(site_gateway), json=body, headers=auth()) as response:
        assert response.status == 503
        error = (await response.json())["error"]
    assert error["message"] == f"'{model}' is not currently live on metis."
    assert not backend.app[REQUESTS]


async def test_metis_status_is_read_once_per_cache_period(
    site_gateway: Server, metis_status: Server, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        body = chat("Hi", model="gpt-oss-120b-128k", max_tokens=1)
        async with http.post(metis_url(site_gateway), json=body, headers=auth()) as response:
            assert response.status == 200
    async with http.get(f"{site_gateway.url}/metis/jobs", headers=auth()) as response:
        jobs = await response.json()
    assert [job["Models"] for job in jobs["running"]] == [
        "gpt-oss-120b-128k",
        "Llama-4-Maverick-17B-128E-Instruct",
    ]
    assert metis_status.app[CALLS] == ["/status"]


def load_site(tmp_path: Path, backend_url: str, endpoints: str = "endpoints.json") -> Any:
    from proxy.registry import load_registry

    site_config(tmp_path, backend_url, endpoints)
    return load_registry(tmp_path / endpoints, tmp_path / "clusters.json")


def fixture_entries(name: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((SITE / name).read_text())
    return entries
