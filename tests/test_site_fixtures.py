"""A site of the existing gateway moves with its fixtures unchanged: a production-style fixture
(Globus Compute on Sophia, nine Metis entries), dumpdata exports, clusters listing `health` and
`metrics`. The files are in tests/site/; only the hosts are pointed at local fakes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from adaptors.globus_compute import GlobusComputeEndpoint
from proxy.core.registry import Registry, TokenLimits, load_registry
from proxy.core.state import STATE
from proxy.settings.files import ConfigError
from testing.fake_vllm import REQUESTS
from tests.conftest import (
    Server,
    auth,
    chat,
    free_port,
    start,
    start_gateway,
    write_gateway_config,
    write_yaml,
)
from tests.test_config import CLUSTER, ENDPOINT, run_cli, write_main

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


def site_config(tmp_path: Path, backend_url: str, prefix: str = "") -> Path:
    """The gateway configuration of the test suite, with the site's fixture files as they are."""
    config = write_gateway_config(tmp_path, backend_url)
    for name in (f"{prefix}endpoints.json", f"{prefix}clusters.json"):
        text = (SITE / name).read_text().replace(METIS_HOST, backend_url)
        (tmp_path / name).write_text(text)
    document = yaml.safe_load(config.read_text())
    document.update(endpoints_file=f"{prefix}endpoints.json", clusters_file=f"{prefix}clusters.json")
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.fixture
async def site_gateway(tmp_path: Path, backend: Server, site_environment: None) -> AsyncIterator[Server]:
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


def load_site(tmp_path: Path, backend_url: str, prefix: str = "") -> Registry:
    site_config(tmp_path, backend_url, prefix)
    return load_registry(tmp_path / f"{prefix}endpoints.json", tmp_path / f"{prefix}clusters.json")


@pytest.mark.usefixtures("site_environment")
async def test_a_dumpdata_export_with_python_literal_configs_loads_and_serves(
    tmp_path: Path, backend: Server, http: aiohttp.ClientSession
) -> None:
    export = json.loads((SITE / "dumpdata-endpoints.json").read_text())
    assert export[0]["fields"]["config"].startswith("{'api_port': 8000")
    runner, gateway = await start_gateway(site_config(tmp_path, backend.url, "dumpdata-"))
    try:
        body = chat("Hi", model="gpt-oss-120b-128k", max_tokens=1)
        async with http.post(metis_url(gateway), json=body, headers=auth()) as response:
            assert response.status == 200, await response.text()
        registry = gateway.app[STATE].registry
        sophia = registry.endpoints["sophia-vllm-meta-llamameta-llama-31-70b-instruct"]
        assert isinstance(sophia, GlobusComputeEndpoint) and sophia.config.api_port == 8000
        assert registry.token_limits["sophia-vllm-meta-llamameta-llama-31-8b-instruct"] == TokenLimits(
            250_000, 0
        )
    finally:
        await runner.cleanup()


@pytest.mark.usefixtures("site_environment")
def test_fixture_records_without_tpm_get_the_existing_defaults(tmp_path: Path) -> None:
    registry = load_site(tmp_path, "http://127.0.0.1:9")
    assert len(registry.endpoints) == 12
    assert set(registry.token_limits.values()) == {TokenLimits(100_000, 60_000)}


def test_yaml_entries_without_tpm_have_no_token_limit(tmp_path: Path) -> None:
    write_yaml(tmp_path / "clusters.yaml", [CLUSTER])
    second = {k: v for k, v in ENDPOINT.items() if k != "endpoint_slug"} | {"model": "m2", "tpm_user": 500}
    write_yaml(tmp_path / "endpoints.yaml", [ENDPOINT, second])
    registry = load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml")
    assert list(registry.token_limits.values()) == [TokenLimits(None, None), TokenLimits(None, 500)]


@pytest.mark.parametrize(
    "config, expected",
    [
        ("{'api_url': 'http://127.0.0.1:9/v1'", "field 'config': Value error, is a string that is neither"),
        ("__import__('os').system('touch pwned')", "field 'config': Value error, is a string that is"),
        ("['http://127.0.0.1:9/v1']", "field 'config': Input should be a valid dictionary"),
        ("{'api_url': 'http://127.0.0.1:9/v1', 'timeout': 3}", "field 'config.timeout': Extra inputs"),
    ],
)
def test_a_config_string_that_is_not_a_mapping_literal_is_refused(
    tmp_path: Path, config: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    record = {"model": "resource_server_async.endpoint", "pk": 4, "fields": {**ENDPOINT, "config": config}}
    (tmp_path / "endpoints.json").write_text(json.dumps([record]))
    write_yaml(tmp_path / "clusters.yaml", [CLUSTER])
    with pytest.raises(ConfigError) as error:
        load_registry(tmp_path / "endpoints.json", tmp_path / "clusters.yaml")
    message = str(error.value)
    assert f"{tmp_path / 'endpoints.json'}, entry 1 (meta-llama/Meta-Llama-3.1-8B-Instruct): " in message
    assert expected in message
    assert not (tmp_path / "pwned").exists()


async def test_clusters_listing_health_and_metrics_load_and_list_only_served_paths(
    site_gateway: Server, http: aiohttp.ClientSession
) -> None:
    registry = site_gateway.app[STATE].registry
    assert "health" in registry.clusters["sophia"].openai_endpoints
    async with http.get(f"{site_gateway.url}/list-endpoints", headers=auth()) as response:
        listing = await response.json()
    assert listing["clusters"]["sophia"]["frameworks"]["vllm"]["endpoints"] == [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    ]


def test_a_typo_in_openai_endpoints_fails_check_config_naming_file_entry_and_field(tmp_path: Path) -> None:
    cluster = {**CLUSTER, "openai_endpoints": ["chat/completion", "completions", "health"]}
    (tmp_path / "clusters.json").write_text(
        json.dumps([{"model": "resource_server_async.cluster", "pk": 1, "fields": cluster}])
    )
    write_yaml(tmp_path / "endpoints.yaml", [ENDPOINT])
    config = yaml.safe_load(write_main(tmp_path, {}).read_text())
    config["clusters_file"] = "clusters.json"
    write_yaml(tmp_path / "gateway.yaml", config)
    result = run_cli("--config", str(tmp_path / "gateway.yaml"), "--check-config")
    assert result.returncode == 2
    assert (
        f"{tmp_path / 'clusters.json'}, entry 1 (sophia): field 'openai_endpoints': Value error, "
        "unknown 'chat/completion'; the gateway serves chat/completions," in result.stderr
    )


def test_openai_endpoints_written_with_the_v1_prefix_load(tmp_path: Path) -> None:
    cluster = {**CLUSTER, "openai_endpoints": ["/v1/chat/completions/", "/v1/embeddings"]}
    write_yaml(tmp_path / "clusters.yaml", [cluster])
    write_yaml(tmp_path / "endpoints.yaml", [ENDPOINT])
    registry = load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml")
    assert registry.clusters["sophia"].openai_endpoints == ["chat/completions", "embeddings"]


@pytest.mark.usefixtures("site_environment")
async def test_without_the_metis_status_a_metis_model_is_a_503(
    tmp_path: Path, backend: Server, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METIS_STATUS_URL", f"http://127.0.0.1:{free_port()}/status")
    runner, gateway = await start_gateway(site_config(tmp_path, backend.url))
    try:
        body = chat("Hi", model="gpt-oss-120b-128k")
        async with http.post(metis_url(gateway), json=body, headers=auth()) as response:
            assert response.status == 503
            message = (await response.json())["error"]["message"]
    finally:
        await runner.cleanup()
    assert message.startswith("Cannot tell whether 'gpt-oss-120b-128k' is live on metis: Cannot reach")
    assert not backend.app[REQUESTS]
