"""`--check-config --online`: the Globus side of a configuration checked against Globus Auth (the fake
in testing/fake_globus/, driven by the real globus-sdk), every problem at once; plain `--check-config`
stays offline. And the shipped Globus configuration with its example endpoints and clusters."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testing.fake_globus.auth import FakeGlobus
from tests.support import write_gateway_config

ROOT = Path(__file__).resolve().parent.parent
GOOD_POLICY = "33333333-3333-4333-8333-333333333333"
WEAK_POLICY = "44444444-4444-4444-8444-444444444444"
UNKNOWN_POLICY = "55555555-5555-4555-8555-555555555555"
DOMAINS = ["uni.edu", "other.org"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        running.add_policy(GOOD_POLICY, high_assurance=True, domains=DOMAINS)
        running.add_policy(WEAK_POLICY, high_assurance=False, domains=DOMAINS)
        yield running


def configure(directory: Path, fake: FakeGlobus, **globus: Any) -> Path:
    path = write_gateway_config(directory, "http://127.0.0.1:9")
    document = yaml.safe_load(path.read_text())
    settings = {
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "scope": fake.scope,
        "authorized_idp_domains": DOMAINS,
        "policies": [GOOD_POLICY],
        "auth_url": fake.auth_url,
        "groups_url": fake.groups_url,
        "retries": 0,
        **globus,
    }
    document["auth"] = {"provider": "globus", "globus": settings}
    path.write_text(yaml.safe_dump(document))
    return path


async def check(config: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config), "--check-config", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_online_checks_credentials_scope_and_policies(fake: FakeGlobus, tmp_path: Path) -> None:
    config = configure(tmp_path, fake)
    code, out, err = await check(config)
    assert code == 0, err
    assert fake.requests == [], "plain --check-config makes no call to Globus"
    code, out, err = await check(config, "--online")
    assert code == 0, err
    assert "Globus Auth accepts the credentials, scope and policies" in out
    paths = [request.path for request in fake.requests]
    assert paths[0] == "/auth/v2/oauth2/token/introspect"
    assert paths[1] == f"/auth/v2/api/clients/{fake.client_id}"
    assert paths[2].startswith(f"/auth/v2/api/clients/{fake.client_id}/scopes/")
    assert paths[3:] == [f"/auth/v2/api/policies/{GOOD_POLICY}"]


async def test_every_problem_is_reported_at_once(fake: FakeGlobus, tmp_path: Path) -> None:
    fake.groups_dependent_scope = False
    config = configure(tmp_path, fake, policies=[GOOD_POLICY, WEAK_POLICY, UNKNOWN_POLICY])
    code, _, err = await check(config, "--online")
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == "configuration error:"
    assert "lacks the Groups dependent scope (73320ffe-4cb4-4b25-a0a3-83d53d59ce4f)" in lines[1]
    assert f"policy {WEAK_POLICY} is not high assurance" in lines[2]
    assert f"cannot read policy {UNKNOWN_POLICY} (HTTP 404)" in lines[3]
    assert len(lines) == 4


async def test_refused_credentials(fake: FakeGlobus, tmp_path: Path) -> None:
    code, _, err = await check(configure(tmp_path, fake, client_secret="wrong-secret"), "--online")
    assert code == 2
    assert "Globus Auth refused the gateway's client credentials (HTTP 401)" in err
    assert "wrong-secret" not in err
    assert [request.path for request in fake.requests] == ["/auth/v2/oauth2/token/introspect"]


async def test_a_scope_the_client_does_not_own(fake: FakeGlobus, tmp_path: Path) -> None:
    other = "https://auth.globus.org/scopes/9e9e9e9e-0000-4000-8000-000000000000/action_all"
    code, _, err = await check(configure(tmp_path, fake, scope=other), "--online")
    assert code == 2 and f"auth.globus.scope: {other} is not a scope of client {fake.client_id}" in err


async def test_globus_unreachable_is_exit_1(fake: FakeGlobus, tmp_path: Path) -> None:
    config = configure(tmp_path, fake)
    await fake.stop()
    code, _, err = await check(config, "--online")
    assert code == 1 and "not checked online: Globus Auth cannot be reached" in err


GLOBUS_ENV = {
    "GLOBUS_APPLICATION_SECRET": "fake-gateway-secret",
    "AUTHORIZED_IDP_DOMAINS": ",".join(DOMAINS),
    "GLOBUS_POLICIES": GOOD_POLICY,
    "STREAMING_SERVER_HOST": "gateway.example.org",
    "INTERNAL_STREAMING_SECRET": "an-internal-secret-of-32-characters",
    "SERVICE_ACCOUNT_ID": "5e1f8a4d-9c2b-4d3e-8f7a-6b5c4d3e2f1a",
    "SERVICE_ACCOUNT_SECRET": "service-secret",
    "SOPHIA_QSTAT_ENDPOINT_ID": "11111111-2222-4333-8444-555555555555",
    "SOPHIA_QSTAT_FUNCTION_ID": "22222222-3333-4444-8555-666666666666",
    "SOPHIA_COMPUTE_ENDPOINT_ID": "33333333-4444-4555-8666-777777777777",
    "SOPHIA_VLLM_FUNCTION_ID": "44444444-5555-4666-8777-888888888888",
}


async def test_the_shipped_globus_configuration_passes_given_its_environment(
    fake: FakeGlobus, tmp_path: Path
) -> None:
    env = {
        **GLOBUS_ENV,
        "GLOBUS_APPLICATION_ID": fake.client_id,
        "GLOBUS_SDK_SERVICE_URL_AUTH": fake.auth_url,
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
    }
    shipped = ROOT / "conf" / "gateway.globus.yaml"
    code, out, err = await check(shipped, env=env)
    assert code == 0, err
    assert "OK (1 clusters, 2 endpoints)" in out
    code, out, err = await check(shipped, "--online", env=env)
    assert code == 0, err
    assert "Globus Auth accepts" in out


async def test_every_unset_variable_is_named_in_one_run(tmp_path: Path) -> None:
    shipped = ROOT / "conf" / "gateway.globus.yaml"
    clean = {name: value for name, value in os.environ.items() if name not in GLOBUS_ENV}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(shipped), "--check-config",
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=clean,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    for name in ("GLOBUS_APPLICATION_ID", "GLOBUS_APPLICATION_SECRET", "AUTHORIZED_IDP_DOMAINS"):
        assert f"environment variable {name} is not set" in err.decode()

    settled = {**clean, "GLOBUS_APPLICATION_ID": "0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d"}
    settled |= {name: GLOBUS_ENV[name] for name in list(GLOBUS_ENV)[:5]}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(shipped), "--check-config",
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=settled,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    text = err.decode()
    assert process.returncode == 2
    for name in list(GLOBUS_ENV)[5:]:
        assert name in text, f"{name} is not named"
    assert "endpoints.globus.yaml: set the environment variables SOPHIA_COMPUTE_ENDPOINT_ID" in text
