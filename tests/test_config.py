"""Configuration: what loads, and how every mistake is reported (file, entry, field)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adaptors.direct_api import DirectAPIEndpoint
from proxy.core.registry import load_registry
from proxy.settings import load_settings
from proxy.settings.files import ConfigError
from tests.conftest import Server, auth, chat, start_gateway, write_gateway_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent

CLUSTER = {
    "cluster_name": "sophia",
    "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
    "frameworks": ["vllm"],
    "openai_endpoints": ["chat/completions", "completions", "embeddings"],
    "config": {"status_url": "http://127.0.0.1:9/jobs"},
}
ENDPOINT = {
    "endpoint_slug": "sophia-vllm-meta-llamameta-llama-31-8b-instruct",
    "cluster": "sophia",
    "framework": "vllm",
    "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
    "config": {"api_url": "http://127.0.0.1:9/v1"},
}


def fixture(model: str, pk: int, fields: dict[str, Any]) -> dict[str, Any]:
    return {"model": f"resource_server_async.{model}", "pk": pk, "fields": fields}


def registry_error(tmp_path: Path, endpoints: list[Any], clusters: list[Any] | None = None) -> str:
    write_yaml(tmp_path / "clusters.yaml", [CLUSTER] if clusters is None else clusters)
    write_yaml(tmp_path / "endpoints.yaml", endpoints)
    with pytest.raises(ConfigError) as error:
        load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml")
    return str(error.value)


def test_existing_gateway_fixtures_load_unchanged(tmp_path: Path) -> None:
    endpoint = {
        **ENDPOINT,
        "allowed_globus_groups": "",
        "allowed_domains": "anl.gov, uchicago.edu",
        "tpm_model": 100000,
        "tpm_user": 0,
        "endpoint_adapter": "resource_server_async.endpoints.direct_api.DirectAPIEndpoint",
        "config": {
            "api_url": "http://127.0.0.1:9/v1",
            "api_key_env_name": "SOPHIA_KEY",
            "api_request_timeout": 60,
        },
    }
    cluster = {**CLUSTER, "cluster_adapter": "resource_server_async.clusters.direct_api.DirectAPICluster"}
    (tmp_path / "endpoints.json").write_text(json.dumps([fixture("endpoint", 7, endpoint)], indent=4))
    (tmp_path / "clusters.json").write_text(json.dumps([fixture("cluster", 1, cluster)], indent=4))
    os.environ["SOPHIA_KEY"] = "secret-key"
    try:
        registry = load_registry(tmp_path / "endpoints.json", tmp_path / "clusters.json")
    finally:
        del os.environ["SOPHIA_KEY"]
    loaded = registry.endpoints[ENDPOINT["endpoint_slug"]]
    assert isinstance(loaded, DirectAPIEndpoint)
    assert (loaded.id, loaded.allowed_globus_groups, loaded.allowed_domains) == (
        "7",
        [],
        ["anl.gov", "uchicago.edu"],
    )
    assert registry.clusters["sophia"].openai_endpoints == CLUSTER["openai_endpoints"]


def test_slug_is_computed_when_left_out(tmp_path: Path) -> None:
    write_yaml(tmp_path / "clusters.yaml", [CLUSTER])
    write_yaml(tmp_path / "endpoints.yaml", [{k: v for k, v in ENDPOINT.items() if k != "endpoint_slug"}])
    registry = load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml")
    assert list(registry.endpoints) == [ENDPOINT["endpoint_slug"]]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"endpoint_slug": "sophia-vllm-llama"}, "field 'endpoint_slug': is 'sophia-vllm-llama' but"),
        ({"endpoint_adapter": "nowhere.Adaptor"}, "field 'endpoint_adapter': cannot import module 'nowhere'"),
        (
            {"endpoint_adapter": "adaptors.direct_api.Missing"},
            "field 'endpoint_adapter': 'Missing' in module",
        ),
        ({"endpoint_adapter": "adaptors.direct_api.DirectAPICluster"}, "is not a subclass of BaseEndpoint"),
        (
            {"endpoint_adapter": "DirectAPIEndpoint"},
            "field 'endpoint_adapter': 'DirectAPIEndpoint' is not a dotted",
        ),
        ({"model": None}, "field 'model': Input should be a valid string"),
        ({"allowed_domain": ["anl.gov"]}, "field 'allowed_domain': Extra inputs are not permitted"),
        ({"cluster": "polaris", "endpoint_slug": None}, "field 'cluster': no cluster named 'polaris'"),
        ({"framework": "sglang", "endpoint_slug": None}, "field 'framework': 'sglang' is not among"),
        ({"config": {}}, "field 'config.api_url': Field required"),
        ({"config": {"api_url": "ftp://x"}}, "field 'config.api_url': String should match pattern"),
        (
            {"config": {"api_url": "http://x", "api_key_env_name": "NO_SUCH_VAR_X"}},
            "NO_SUCH_VAR_X is not set",
        ),
        ({"config": {"api_url": "http://x", "timeout": 3}}, "field 'config.timeout': Extra inputs"),
        ({"tpm_user": -1}, "field 'tpm_user': Input should be greater than or equal to 0"),
    ],
)
def test_endpoint_mistakes_name_file_entry_and_field(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    entry = {k: v for k, v in {**ENDPOINT, **change}.items() if v is not None or k == "model"}
    message = registry_error(tmp_path, [entry])
    assert f"{tmp_path / 'endpoints.yaml'}, entry 1" in message
    assert expected in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    duplicate = {**ENDPOINT, "model": "META-LLAMA/Meta-Llama-3.1-8B-Instruct"}
    unconfigured = {**ENDPOINT, "endpoint_slug": "sophia-vllm-otherm", "model": "other/m", "config": {}}
    message = registry_error(tmp_path, [ENDPOINT, duplicate, unconfigured])
    lines = message.splitlines()
    assert len(lines) == 2
    assert "entry 2" in lines[0] and "also defined at" in lines[0] and "entry 1" in lines[0]
    assert "entry 3" in lines[1] and "config.api_url" in lines[1]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"cluster_adapter": "adaptors.direct_api.DirectAPIEndpoint"}, "is not a subclass of BaseCluster"),
        ({"frameworks": []}, "field 'frameworks': List should have at least 1 item"),
        ({"cluster_name": "a/b"}, "field 'cluster_name': String should match pattern"),
        ({"config": {"status_url": 3}}, "field 'config.status_url'"),
    ],
)
def test_cluster_mistakes(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    message = registry_error(tmp_path, [], [{**CLUSTER, **change}])
    assert f"{tmp_path / 'clusters.yaml'}, entry 1" in message and expected in message


def test_duplicate_cluster(tmp_path: Path) -> None:
    message = registry_error(tmp_path, [], [CLUSTER, CLUSTER])
    assert "entry 2 (sophia): field 'cluster_name': 'sophia' is defined twice" in message


def write_main(tmp_path: Path, document: dict[str, Any]) -> Path:
    write_yaml(
        tmp_path / "tokens.yaml",
        {"tokens": [{"token": "t" * 12, "user": {"id": "u", "username": "u@x.org"}}]},
    )
    base = {
        "auth": {"provider": "static", "static": {"tokens_file": "tokens.yaml"}},
        "endpoints_file": "endpoints.yaml",
        "clusters_file": "clusters.yaml",
    }
    return write_yaml(tmp_path / "gateway.yaml", {**base, **document})


@pytest.mark.parametrize(
    "document, expected",
    [
        ({"server": {"port": "eighty"}}, "field 'server.port': Input should be a valid integer"),
        ({"server": {"prot": 1}}, "field 'server.prot': Extra inputs are not permitted"),
        ({"server": {"base_path": "resource_server/"}}, "field 'server.base_path'"),
        ({"auth": {"provider": "ldap"}}, "field 'auth.provider'"),
        ({"auth": {"provider": "static"}}, "field 'auth.static': required"),
        (
            {"endpoints_file": "${NO_SUCH_GATEWAY_VAR}"},
            "field 'endpoints_file': environment variable NO_SUCH",
        ),
    ],
)
def test_main_file_mistakes(tmp_path: Path, document: dict[str, Any], expected: str) -> None:
    path = write_main(tmp_path, document)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


def test_env_references_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_PORT", "8123")
    path = write_main(tmp_path, {"server": {"port": "${GW_PORT}", "host": "${GW_HOST:-0.0.0.0}"}})
    settings = load_settings(path)
    assert (settings.server.port, settings.server.host) == (8123, "0.0.0.0")
    assert settings.endpoints_file == tmp_path / "endpoints.yaml"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_check_config_accepts_the_shipped_configuration() -> None:
    result = run_cli("--config", "conf/gateway.yaml", "--check-config")
    assert result.returncode == 0, result.stderr
    assert "OK (1 clusters, 2 endpoints)" in result.stdout


def test_check_config_reports_mistakes_and_fails(tmp_path: Path) -> None:
    write_yaml(tmp_path / "clusters.yaml", [CLUSTER])
    write_yaml(tmp_path / "endpoints.yaml", [{**ENDPOINT, "endpoint_slug": "wrong"}])
    result = run_cli("--config", str(write_main(tmp_path, {})), "--check-config")
    assert result.returncode == 2
    assert (
        "endpoints.yaml, entry 1 (meta-llama/Meta-Llama-3.1-8B-Instruct): field 'endpoint_slug'"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_sites_adaptor_package_on_pythonpath(tmp_path: Path) -> None:
    cluster = {**CLUSTER, "cluster_adapter": "site_adaptors.echo.EchoCluster", "config": {}}
    endpoint = {**ENDPOINT, "endpoint_adapter": "site_adaptors.echo.EchoEndpoint", "config": {"prefix": "> "}}
    write_yaml(tmp_path / "clusters.yaml", [cluster])
    write_yaml(tmp_path / "endpoints.yaml", [endpoint])
    result = run_cli(
        "--config", str(write_main(tmp_path, {})), "--check-config", env={"PYTHONPATH": "examples"}
    )
    assert result.returncode == 0, result.stderr


async def test_example_adaptor_serves_by_dotted_path(
    tmp_path: Path, backend: Server, http: aiohttp.ClientSession
) -> None:
    config = write_gateway_config(tmp_path, backend.url)
    clusters = [
        {
            "cluster_name": "echo",
            "cluster_adapter": "examples.site_adaptors.echo.EchoCluster",
            "frameworks": ["demo"],
            "openai_endpoints": ["chat/completions"],
            "config": {"models": ["echo-1"]},
        }
    ]
    endpoints = [
        {
            "cluster": "echo",
            "framework": "demo",
            "model": "echo-1",
            "endpoint_adapter": "examples.site_adaptors.echo.EchoEndpoint",
            "config": {"prefix": "you said: "},
        }
    ]
    write_yaml(tmp_path / "clusters.yaml", clusters)
    write_yaml(tmp_path / "endpoints.yaml", endpoints)
    runner, gateway = await start_gateway(config)
    try:
        url = f"{gateway.url}/echo/demo/v1/chat/completions"
        async with http.post(url, json=chat("hello there", model="echo-1"), headers=auth()) as response:
            answer = await response.json()
        assert answer["choices"][0]["message"]["content"] == "you said: hello there"
        async with http.post(url, json=chat("a b", model="echo-1", stream=True), headers=auth()) as response:
            events = (await response.read()).decode().split("\n\n")
        assert events[-2] == "data: [DONE]" and len(events) == 6
        async with http.get(f"{gateway.url}/echo/jobs", headers=auth()) as response:
            jobs = await response.json()
        assert [job["Models"] for job in jobs["running"]] == ["echo-1"]
    finally:
        await runner.cleanup()


def test_globus_example_takes_the_existing_gateways_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = {
        "GLOBUS_APPLICATION_ID": "0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d",
        "GLOBUS_APPLICATION_SECRET": "secret",
        "AUTHORIZED_IDP_DOMAINS": "anl.gov, uchicago.edu",
        "GLOBUS_POLICIES": "p1,p2",
        "AUTHORIZED_GROUPS_PER_IDP": '{"anl.gov": "g1,g2"}',
        "STREAMING_SERVER_HOST": "gateway.example.org",
        "INTERNAL_STREAMING_SECRET": "a-long-internal-secret",
        "MAX_BATCHES_PER_USER": "3",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = load_settings(ROOT / "conf" / "gateway.globus.yaml")
    globus = settings.auth.globus
    assert settings.auth.provider == "globus" and globus is not None
    assert globus.scope == "https://auth.globus.org/scopes/0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d/action_all"
    assert globus.authorized_idp_domains == ["anl.gov", "uchicago.edu"]
    assert globus.policies == ["p1", "p2"] and globus.groups == []
    assert globus.groups_per_idp == {"anl.gov": ["g1", "g2"]}
    assert settings.redis_url is None
    assert settings.streaming.callback_url == "https://gateway.example.org:443"
    assert settings.batches.max_active_per_user == 3
    assert settings.database_url == f"sqlite:///{ROOT / 'conf' / 'gateway.db'}"
    assert settings.endpoints_file == ROOT / "conf" / "endpoints.globus.yaml"
