"""A site's `.env`, written for the existing gateway, read unchanged through conf/gateway.globus.yaml."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from proxy.settings import ConfigError, GatewaySettings, load_settings

ROOT = Path(__file__).resolve().parent.parent

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
