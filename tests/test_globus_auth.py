"""The `globus` provider with the real globus-sdk against a local fake of Globus Auth and Groups."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.identities import FakeUser, idp_id
from tests.conftest import CHAT_MODEL, PRIVATE_MODEL, USERS, Server, chat, start_gateway, write_gateway_config
from tests.test_routes import assert_openai_error, call

ALICE_GROUP = USERS["alice"]["groups"][0]
REQUIRED_GROUP = "22222222-2222-4222-8222-222222222222"
POLICY = "33333333-3333-4333-8333-333333333333"
SERVICE_CLIENT = "5e1f8a4d-9c2b-4d3e-8f7a-6b5c4d3e2f1a"
TRANSFER_SCOPE = "urn:globus:auth:scope:transfer.api.globus.org:all"
ALICE = FakeUser.single("alice@uni.edu", name="Alice", groups=[ALICE_GROUP, REQUIRED_GROUP])
BOB = FakeUser.single("bob@other.org", name="Bob", groups=[REQUIRED_GROUP])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def globus_settings(fake: FakeGlobus, **overrides: Any) -> dict[str, Any]:
    return {
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "scope": fake.scope,
        "authorized_idp_domains": ["uni.edu", "other.org"],
        "auth_url": fake.auth_url,
        "groups_url": fake.groups_url,
        "timeout_seconds": 2,
        "retries": 0,
        **overrides,
    }


def globus_config(directory: Path, backend: Server, fake: FakeGlobus, **overrides: Any) -> Path:
    path = write_gateway_config(directory, backend.url)
    document = yaml.safe_load(path.read_text())
    redis_url = overrides.pop("redis_url", None)
    document["auth"] = {"provider": "globus", "globus": globus_settings(fake, **overrides)}
    if redis_url:
        document["redis_url"] = redis_url
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
async def fake() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        running.add_token("alice-globus-token", ALICE)
        running.add_token("bob-globus-token", BOB)
        yield running


@pytest.fixture
async def gateway_factory(backend: Server, fake: FakeGlobus, tmp_path: Path) -> AsyncIterator[Any]:
    runners = []

    async def make(**overrides: Any) -> Server:
        directory = tmp_path / f"gateway{len(runners)}"
        directory.mkdir()
        runner, server = await start_gateway(globus_config(directory, backend, fake, **overrides))
        runners.append(runner)
        return server

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gateway(gateway_factory: Any) -> Server:
    return await gateway_factory()


async def whoami(http: aiohttp.ClientSession, gateway: Server, token: str) -> tuple[int, Any]:
    status, document, _ = await call(http, "GET", f"{gateway.url}/whoami", headers=bearer(token))
    return status, document


async def test_valid_user_and_the_wire_format(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    status, document = await whoami(http, gateway, "alice-globus-token")
    assert status == 200
    assert document == {
        "id": ALICE.sub,
        "name": "Alice",
        "username": "alice@uni.edu",
        "user_group_uuids": sorted([ALICE_GROUP, REQUIRED_GROUP]),
        "idp_id": idp_id("uni.edu"),
        "idp_name": "uni.edu",
        "auth_service": "globus",
    }
    introspect = next(r for r in fake.requests if r.path.endswith("/token/introspect"))
    assert introspect.basic_credentials == (fake.client_id, fake.client_secret)
    assert introspect.form == {"token": "alice-globus-token", "include": "identity_set_detail,session_info"}
    dependent = next(r for r in fake.requests if r.path.endswith("/v2/oauth2/token"))
    assert dependent.basic_credentials == (fake.client_id, fake.client_secret)
    assert dependent.form["grant_type"] == "urn:globus:auth:grant_type:dependent_token"
    assert dependent.form["token"] == "alice-globus-token"
    groups = next(r for r in fake.requests if r.path.endswith("/my_groups"))
    assert groups.query == {"statuses": "active"}
    assert groups.authorization is not None and groups.authorization.startswith("Bearer groups-")


@pytest.mark.parametrize(
    "register, fragment",
    [
        (lambda fake: fake.add_token("t", ALICE, active=False), "not active"),
        (lambda fake: None, "not active"),
        (lambda fake: fake.add_token("t", ALICE, exp=int(time.time()) - 5), "expired"),
        (lambda fake: fake.add_token("t", ALICE, scope=TRANSFER_SCOPE), "not issued for this gateway"),
        (lambda fake: fake.add_token("t", FakeUser.single("eve@gmail.com")), "authenticated as Eve"),
        (lambda fake: fake.add_token("t", FakeUser.single("carol@uni.edu", session=False)), "no active"),
        (lambda fake: fake.add_token("t", client_id=SERVICE_CLIENT), "no active session"),
    ],
)  # fmt: skip
async def test_refused_tokens_are_401(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession, register: Any, fragment: str
) -> None:
    register(fake)
    status, document, response = await call(http, "GET", f"{gateway.url}/whoami", headers=bearer("t"))
    assert status == 401
    error = assert_openai_error(document)
    assert fragment in error["message"] and error["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert fake.count("/my_groups") == 0, "groups are fetched only for tokens that passed"


async def test_session_with_another_identity_lists_it(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    linked = FakeUser.single("dave@uni.edu", name="Dave")
    personal = FakeUser.single("dave@gmail.com", name="Dave Personal")
    linked.identities.append(personal.identities[0])
    linked.session_idps = personal.session_idps
    fake.add_token("t", linked)
    status, document = await whoami(http, gateway, "t")
    assert status == 401
    assert "Dave Personal (dave@gmail.com)" in document["error"]["message"]
    assert "app.globus.org/logout" in document["error"]["message"]


async def test_first_authorized_session_identity_is_the_user(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    user = FakeUser.single("erin@gmail.com", name="Erin")
    work = FakeUser.single("erin@uni.edu", name="Erin Work")
    user.identities.append(work.identities[0])
    user.session_idps += work.session_idps
    fake.add_token("t", user)
    status, document = await whoami(http, gateway, "t")
    assert (status, document["username"], document["id"]) == (200, "erin@uni.edu", work.sub)


async def test_service_account_on_the_allow_list(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    fake.add_token("service-token", client_id=SERVICE_CLIENT)
    gateway = await gateway_factory(service_usernames=f"{SERVICE_CLIENT}@clients.auth.globus.org")
    status, document = await whoami(http, gateway, "service-token")
    assert status == 200
    assert document["username"] == f"{SERVICE_CLIENT}@clients.auth.globus.org"


async def test_policies_are_sent_and_enforced(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    fake.add_policy(POLICY, high_assurance=True, domains=["uni.edu", "other.org"])
    fake.add_token("stale", FakeUser.single("frank@uni.edu"), policies={POLICY: False})
    fake.add_token("fresh", FakeUser.single("grace@uni.edu"), policies={POLICY: True})
    gateway = await gateway_factory(policies=POLICY)
    status, document = await whoami(http, gateway, "stale")
    assert status == 401 and "high-assurance" in document["error"]["message"]
    assert (await whoami(http, gateway, "fresh"))[0] == 200
    forms = [r.form for r in fake.requests if r.path.endswith("/token/introspect")]
    assert all(form["authentication_policies"] == POLICY for form in forms)


async def test_gateway_wide_group_gates_are_403(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    fake.add_token("outsider", FakeUser.single("heidi@uni.edu", groups=[]))
    gateway = await gateway_factory(
        groups=[REQUIRED_GROUP], groups_per_idp='{"uni.edu": "' + ALICE_GROUP + '"}'
    )
    assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200
    assert (await whoami(http, gateway, "bob-globus-token"))[0] == 200, "no per-IdP gate for other.org"
    status, document = await whoami(http, gateway, "outsider")
    assert status == 403
    assert assert_openai_error(document)["type"] == "permission_error"
    assert "uni.edu" in document["error"]["message"]
    fake.add_token("no-required", FakeUser.single("ivan@other.org", groups=[]))
    status, document = await whoami(http, gateway, "no-required")
    assert status == 403 and "allowed on this gateway" in document["error"]["message"]


async def test_endpoint_and_cluster_access_lists_use_globus_groups_and_domains(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    cases = [
        ("alice-globus-token", "/local", PRIVATE_MODEL, 200),
        ("bob-globus-token", "/local", PRIVATE_MODEL, 404),
        ("alice-globus-token", "/uni", CHAT_MODEL, 200),
        ("bob-globus-token", "/uni", CHAT_MODEL, 404),
    ]
    for token, cluster, model, expected in cases:
        url = f"{gateway.url}{cluster}/vllm/v1/chat/completions"
        status, _, _ = await call(http, "POST", url, json=chat(model=model), headers=bearer(token))
        assert status == expected, (token, cluster, model)


async def test_cache_hit_one_introspection_for_many_requests(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    for _ in range(10):
        assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200
    assert fake.count("/token/introspect") == 1
    assert fake.count("/my_groups") == 1


async def test_single_flight_for_concurrent_first_requests(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    fake.delay = 0.2
    results = await asyncio.gather(*(whoami(http, gateway, "alice-globus-token") for _ in range(50)))
    assert [status for status, _ in results] == [200] * 50
    assert fake.count("/token/introspect") == 1


async def test_refusals_are_cached_briefly(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        assert (await whoami(http, gateway, "unknown-token"))[0] == 401
    assert fake.count("/token/introspect") == 1


async def test_success_is_cached_no_longer_than_the_token_lives(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    fake.add_token("short", FakeUser.single("judy@uni.edu"), exp=int(time.time()) + 2)
    assert (await whoami(http, gateway, "short"))[0] == 200
    await asyncio.sleep(2.2)
    status, document = await whoami(http, gateway, "short")
    assert status == 401 and "expired" in document["error"]["message"]
    assert fake.count("/token/introspect") == 2


@pytest.mark.parametrize("outage", ["stopped", "503", "slow"])
async def test_globus_down_is_503_and_not_cached(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession, outage: str
) -> None:
    gateway = await gateway_factory(timeout_seconds=0.5)
    if outage == "stopped":
        await fake.stop()
    elif outage == "503":
        fake.fail_status = 503
    else:
        fake.delay = 3
    status, document = await whoami(http, gateway, "alice-globus-token")
    assert status == 503
    error = assert_openai_error(document)
    assert error["type"] == "service_unavailable" and "Globus" in error["message"]
    fake.delay, fake.fail_status = 0, None
    await fake.start()
    assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200


async def test_wrong_gateway_secret_is_503_and_logged_as_configuration(
    gateway_factory: Any, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await gateway_factory(client_secret="not-the-secret")
    with caplog.at_level(logging.INFO):
        status, document = await whoami(http, gateway, "alice-globus-token")
    assert status == 503 and "Globus Auth could not check your token" in document["error"]["message"]
    assert "configuration error" in caplog.text and "client credentials" in caplog.text
    assert "alice-globus-token" not in caplog.text and "not-the-secret" not in caplog.text


async def test_missing_groups_dependent_scope_is_a_configuration_error(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    fake.groups_dependent_scope = False
    with caplog.at_level(logging.INFO):
        status, document = await whoami(http, gateway, "alice-globus-token")
    assert status == 503 and "group memberships" in document["error"]["message"]
    assert "Groups dependent scope" in caplog.text


@pytest.mark.alone("a health check answered within 0.5 s")
async def test_event_loop_stays_responsive_while_globus_is_slow(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(threads=8)
    for index in range(20):
        fake.add_token(f"slow-{index}", FakeUser.single(f"user{index}@uni.edu"))
    fake.delay = 0.3
    waiting = [asyncio.ensure_future(whoami(http, gateway, f"slow-{index}")) for index in range(20)]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    status, _, _ = await call(http, "GET", f"{gateway.url}/health")
    assert status == 200
    assert time.monotonic() - started < 0.5, "a health check waited behind the Globus calls"
    assert all(status == 200 for status, _ in await asyncio.gather(*waiting))


async def test_tokens_never_reach_logs_or_errors(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await gateway_factory(timeout_seconds=0.5)
    with caplog.at_level(logging.DEBUG):
        for token in ["alice-globus-token", "unknown-token-xyz"]:
            _, document = await whoami(http, gateway, token)
            assert token not in str(document)
        fake.fail_status = 500
        _, document = await whoami(http, gateway, "another-token-abc")
        assert "another-token-abc" not in str(document)
    for token in ["alice-globus-token", "unknown-token-xyz", "another-token-abc"]:
        assert token not in caplog.text


async def test_shared_cache_in_redis_serves_another_gateway(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession, redis_url: str
) -> None:
    first = await gateway_factory(redis_url=redis_url)
    second = await gateway_factory(redis_url=redis_url)
    assert (await whoami(http, first, "alice-globus-token"))[0] == 200
    status, document = await whoami(http, second, "alice-globus-token")
    assert (status, document["username"]) == (200, "alice@uni.edu")
    assert (await whoami(http, first, "unknown-token"))[0] == 401
    assert (await whoami(http, second, "unknown-token"))[0] == 401
    assert fake.count("/token/introspect") == 2


async def test_redis_going_away_does_not_fail_requests(
    gateway_factory: Any, fake: FakeGlobus, http: aiohttp.ClientSession, redis_server: Any
) -> None:
    gateway = await gateway_factory(redis_url=redis_server.url)
    other = await gateway_factory(redis_url=redis_server.url)
    fake.add_token("carol-globus-token", FakeUser.single("carol@uni.edu"))
    assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200
    await redis_server.stop()
    assert (await whoami(http, gateway, "bob-globus-token"))[0] == 200
    await redis_server.start()
    assert (await whoami(http, gateway, "carol-globus-token"))[0] == 200
    assert (await whoami(http, other, "carol-globus-token"))[0] == 200
    assert fake.count("/token/introspect") == 3, "the cache is not shared again once Redis is back"


async def test_cached_users_are_served_while_globus_is_down(
    gateway: Server, fake: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200
    await fake.stop()
    assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200
    assert (await whoami(http, gateway, "bob-globus-token"))[0] == 503
    await fake.start()
    assert (await whoami(http, gateway, "bob-globus-token"))[0] == 200


async def run_check_config(config: Path, *extra: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config), "--check-config", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, output.decode()


@pytest.mark.parametrize(
    "high_assurance, domains, fragment",
    [
        (True, ["uni.edu", "other.org"], None),
        (False, ["uni.edu", "other.org"], "is not high assurance"),
        (True, ["uni.edu"], "allows domains ['uni.edu'] but authorized_idp_domains is"),
    ],
)
async def test_policies_are_verified_at_start_up(
    backend: Server,
    fake: FakeGlobus,
    tmp_path: Path,
    high_assurance: bool,
    domains: list[str],
    fragment: str | None,
) -> None:
    fake.add_policy(POLICY, high_assurance=high_assurance, domains=domains)
    config = globus_config(tmp_path, backend, fake, policies=[POLICY])
    assert (await run_check_config(config))[0] == 0 and fake.requests == [], "offline unless --online"
    returncode, output = await run_check_config(config, "--online")
    if fragment is None:
        assert returncode == 0, output
    else:
        assert returncode == 2 and fragment in output, output
        assert fake.count(f"/policies/{POLICY}") == 1


@pytest.mark.skipif(
    not os.environ.get("GATEWAY_LIVE_GLOBUS_TOKEN"),
    reason="live check: set GATEWAY_LIVE_GLOBUS_TOKEN and GATEWAY_LIVE_GLOBUS_CONFIG (see docs/globus.md)",
)
async def test_live_globus_setup(http: aiohttp.ClientSession, backend: Server) -> None:
    """For a site checking its own Globus application against the real Globus Auth."""
    config = Path(os.environ["GATEWAY_LIVE_GLOBUS_CONFIG"])
    runner, gateway = await start_gateway(config)
    try:
        status, document = await whoami(http, gateway, os.environ["GATEWAY_LIVE_GLOBUS_TOKEN"])
        assert status == 200, document
    finally:
        await runner.cleanup()


async def test_auth_cache_metrics(gateway: Server, http: aiohttp.ClientSession) -> None:
    for _ in range(4):
        assert (await whoami(http, gateway, "alice-globus-token"))[0] == 200
    async with http.get(gateway.url.removesuffix("/resource_server") + "/metrics") as response:
        text = await response.text()
    assert 'gateway_auth_cache_lookups_total{result="miss"} 1.0' in text
    assert 'gateway_auth_cache_lookups_total{result="hit"} 3.0' in text
    assert "gateway_auth_introspection_duration_seconds_count 1.0" in text
