"""A site's `.env`, written for the existing gateway, read unchanged through conf/gateway.globus.yaml."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from adaptors.globus_compute import GlobusComputeEndpoint
from proxy.core.registry import load_registry
from proxy.settings import GatewaySettings, load_settings
from proxy.settings.files import ConfigError
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from tests.compute_setup import ENDPOINT, SERVICE_ID, SERVICE_SECRET, compute_config
from tests.conftest import Server, auth, chat, free_port, start_gateway, write_yaml

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "tests" / "site"

SITE_ENV = """\
# --- Globus Credentials ---
GLOBUS_APPLICATION_ID="0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d"
GLOBUS_APPLICATION_SECRET="app-secret"
SERVICE_ACCOUNT_ID="5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b"
SERVICE_ACCOUNT_SECRET="service-secret"

# Required: comma-separated list of policy IDs
GLOBUS_POLICIES="policy-id-1,policy-id-2"

# Optional: one per line
GLOBUS_GROUPS="
         11111111-1111-4111-8111-111111111111
         22222222-2222-4222-8222-222222222222
         "

# Required: one per line
AUTHORIZED_IDP_DOMAINS="
         anl.gov
         uchicago.edu
         "

AUTHORIZED_GROUPS_PER_IDP='
         {
             "uchicago.edu": "33333333-3333-4333-8333-333333333333, 44444444-4444-4444-8444-444444444444"
         }
         '
AUTHORIZED_GLOBUS_SERVICE_USERNAMES='["5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b@clients.auth.globus.org"]'

REDIS_URL="redis://localhost:6379/0"
MAX_BATCHES_PER_USER=2
RATE_LIMIT_PER_SEC_PER_USER=10
STREAMING_SERVER_HOST="gateway.example.org"
INTERNAL_STREAMING_SECRET="your-internal-streaming-secret-key"
"""


def sourced(env_file: Path) -> dict[str, str]:
    """The variables a shell gets from the file, as docs/deploy.md and systemd's start-up do."""
    output = subprocess.run(
        ["sh", "-c", 'set -a; . "$0"; env -0', str(env_file)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
        timeout=10,
    ).stdout.decode()
    return dict(item.split("=", 1) for item in output.split("\0") if "=" in item)


def site_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> GatewaySettings:
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    for name, value in sourced(env_file).items():
        if name not in ("PATH", "PWD", "SHLVL", "_"):
            monkeypatch.setenv(name, value)
    return load_settings(ROOT / "conf" / "gateway.globus.yaml")


def test_a_sites_env_file_reads_as_the_existing_gateway_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = site_settings(tmp_path, monkeypatch, SITE_ENV)
    globus = settings.auth.globus
    assert globus is not None
    assert globus.authorized_idp_domains == ["anl.gov", "uchicago.edu"]
    assert globus.policies == ["policy-id-1", "policy-id-2"]
    assert globus.groups == ["11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"]
    assert globus.groups_per_idp == {
        "uchicago.edu": ["33333333-3333-4333-8333-333333333333", "44444444-4444-4444-8444-444444444444"]
    }
    assert globus.service_usernames == ["5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b@clients.auth.globus.org"]
    assert settings.redis_url == "redis://localhost:6379/0"


@pytest.mark.parametrize(
    "value",
    ["anl.gov uchicago.edu", "anl.gov;uchicago.edu", "anl.gov, uchicago.edu", '["anl.gov", "uchicago.edu"]'],
)
def test_every_list_form_of_the_existing_gateway_and_commas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    settings = site_settings(tmp_path, monkeypatch, f"{SITE_ENV}AUTHORIZED_IDP_DOMAINS='{value}'\n")
    assert settings.auth.globus is not None
    assert settings.auth.globus.authorized_idp_domains == ["anl.gov", "uchicago.edu"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("AUTHORIZED_GLOBUS_SERVICE_USERNAMES='[\"a@x.org\",'", "field 'auth.globus.service_usernames'"),
        ("AUTHORIZED_GLOBUS_SERVICE_USERNAMES='[1, 2]'", "a JSON list here must hold strings only"),
        ("AUTHORIZED_GROUPS_PER_IDP='{\"anl.gov\": }'", "field 'auth.globus.groups_per_idp'"),
    ],
)
def test_a_malformed_list_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        site_settings(tmp_path, monkeypatch, f"{SITE_ENV}{line}\n")
    assert str(error.value).startswith(str(ROOT / "conf" / "gateway.globus.yaml"))
    assert expected in str(error.value)


def test_the_existing_gateways_other_variables_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lines = (
        'MAINTENANCE_ERROR_NOTICES=\'{"sophia": "Sophia is down for maintenance until Monday."}\'\n'
        "RATE_LIMIT_PER_SEC_PER_USER=3\n"
        "MAX_BATCHES_PER_USER=4\n"
        'STREAMING_SERVER_HOST="localhost:8080"\n'
        'INTERNAL_STREAMING_SECRET="short-secret"\n'
    )
    with caplog.at_level("WARNING", logger="proxy.settings"):
        settings = site_settings(tmp_path, monkeypatch, SITE_ENV + lines)
    assert settings.maintenance == {"sophia": "Sophia is down for maintenance until Monday."}
    assert settings.limits.requests_per_second == 3
    assert settings.batches.max_active_per_user == 4
    assert settings.streaming.callback_url == "https://localhost:8080"
    assert settings.streaming.internal_secret == "short-secret"
    assert "INTERNAL_STREAMING_SECRET) has 12 characters" in caplog.text
    assert "short-secret" not in caplog.text


@pytest.mark.parametrize(
    "host, port, expected",
    [
        ("gateway.example.org", "8443", "https://gateway.example.org:8443"),
        ("gateway.example.org:8080", "443", "https://gateway.example.org:8080"),
        ("gateway.example.org:80a", "443", "field 'streaming.callback_url': Value error, 'gateway.example"),
        ("gateway.example.org", "eighty", "field 'streaming.callback_url': Value error,"),
    ],
)
def test_the_streaming_host_is_checked_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, port: str, expected: str
) -> None:
    text = f'{SITE_ENV}STREAMING_SERVER_HOST="{host}"\nSTREAMING_SERVER_PORT={port}\n'
    if expected.startswith("https://"):
        assert site_settings(tmp_path, monkeypatch, text).streaming.callback_url == expected
        return
    with pytest.raises(ConfigError) as error:
        site_settings(tmp_path, monkeypatch, text)
    assert expected in str(error.value)


def test_endpoint_credentials_overrides_choose_the_compute_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = {"client_id": "other-project", "client_secret": "other-secret"}
    overrides = {"3f0c5a1e-8d2b-4c6f-9a7e-1b2c3d4e5f60": other}
    monkeypatch.setenv("GLOBUS_ENDPOINT_CREDENTIALS_OVERRIDES", json.dumps(overrides))
    monkeypatch.setenv("SERVICE_ACCOUNT_ID", "service-account")
    monkeypatch.setenv("SERVICE_ACCOUNT_SECRET", "service-secret")
    monkeypatch.setenv("METIS_STATUS_URL", "http://127.0.0.1:9/status")
    monkeypatch.setenv("METIS_GPT_OSS_120B_API_KEY", "k")
    monkeypatch.setenv("METIS_MAVERICK_API_KEY", "k")
    registry = load_registry(SITE / "endpoints.json", SITE / "clusters.json")
    endpoints = registry.endpoints
    on_overridden = endpoints["sophia-vllm-meta-llamameta-llama-31-70b-instruct"]
    elsewhere = endpoints["sophia-vllm-mgoinnemotron-4-340b-instruct-hf"]
    assert isinstance(on_overridden, GlobusComputeEndpoint) and isinstance(elsewhere, GlobusComputeEndpoint)
    assert on_overridden.config.credentials() == ("other-project", "other-secret")
    assert elsewhere.config.credentials() == ("service-account", "service-secret")

    monkeypatch.setenv("GLOBUS_ENDPOINT_CREDENTIALS_OVERRIDES", '{"3f0c5a1e": "not an object"}')
    with pytest.raises(ConfigError) as error:
        load_registry(SITE / "endpoints.json", SITE / "clusters.json")
    assert f"{SITE / 'clusters.json'}, entry 1 (sophia): field 'config': GLOBUS_ENDPOINT" in str(error.value)
    assert "other-secret" not in str(error.value)


async def test_compute_tasks_of_an_overridden_endpoint_use_its_credentials(
    tmp_path: Path,
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    """The service account is unknown to Globus; only the override for ENDPOINT can submit."""
    monkeypatch.setenv("SERVICE_ACCOUNT_ID", "0d1e2f3a-4b5c-4d6e-8f7a-8b9c0d1e2f3a")
    monkeypatch.setenv("SERVICE_ACCOUNT_SECRET", "not-registered")
    overrides = {ENDPOINT: {"client_id": SERVICE_ID, "client_secret": SERVICE_SECRET}}
    monkeypatch.setenv("GLOBUS_ENDPOINT_CREDENTIALS_OVERRIDES", json.dumps(overrides))
    config = compute_config(tmp_path, backend, compute, globus, free_port())
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    for entry in endpoints:
        if entry["cluster"] == "hpc":
            entry["config"].pop("client_id")
            entry["config"].pop("client_secret")
    write_yaml(tmp_path / "endpoints.yaml", endpoints)
    runner, gateway = await start_gateway(config)
    try:
        url = f"{gateway.url}/hpc/vllm/v1/chat/completions"
        async with http.post(url, json=chat(), headers=auth()) as response:
            assert response.status == 200, await response.text()
    finally:
        await runner.cleanup()
    assert set(globus.issued_tokens.values()) == {SERVICE_ID}
