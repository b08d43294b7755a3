"""The fake Globus must answer what the real globus-sdk sends, in shapes the SDK parses.

Every call goes through the real, blocking SDK in a thread (the fake runs on the test's event loop), so a
drift between the fake and the SDK's wire format shows up here rather than as a mysterious gateway failure.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import globus_sdk
import pytest
from globus_sdk.transport import RetryConfig

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.identities import GROUPS_SCOPE, FakeUser, idp_id

T = TypeVar("T")
GROUP = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(autouse=True)
def _no_production_globus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client built without base_url would reach the real cloud; point those at a closed port instead."""
    for service in ("AUTH", "GROUPS"):
        monkeypatch.setenv(f"GLOBUS_SDK_SERVICE_URL_{service}", "http://127.0.0.1:9/")


@pytest.fixture
async def fake() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        yield running


def confidential(fake: FakeGlobus, secret: str | None = None) -> globus_sdk.ConfidentialAppAuthClient:
    return globus_sdk.ConfidentialAppAuthClient(
        fake.client_id,
        secret if secret is not None else fake.client_secret,
        base_url=fake.auth_url,
        retry_config=RetryConfig(max_retries=0),
    )


async def blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """The SDK is synchronous: keep the loop (and so the fake) running while it waits."""
    return await asyncio.to_thread(call, *args, **kwargs)


def expected_basic(fake: FakeGlobus) -> str:
    return "Basic " + base64.b64encode(f"{fake.client_id}:{fake.client_secret}".encode()).decode()


async def test_introspect_with_identity_set_and_session(fake: FakeGlobus) -> None:
    alice = FakeUser.single("alice@uni.edu", groups=[GROUP])
    fake.add_token("tok-alice", alice)
    client = confidential(fake)

    answer = await blocking(
        client.oauth2_token_introspect, "tok-alice", include="identity_set_detail,session_info"
    )

    assert answer["active"] is True
    assert answer["sub"] == alice.sub and answer["username"] == "alice@uni.edu"
    assert fake.scope in answer["scope"].split()
    assert fake.client_id in answer["aud"] and answer["iss"] == "https://auth.globus.org"
    assert answer["exp"] > time.time() + 3000
    assert answer["identity_set_detail"][0]["identity_provider"] == idp_id("uni.edu")
    assert answer["session_info"]["authentications"][alice.sub]["idp"] == idp_id("uni.edu")
    assert "policy_evaluations" not in answer
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/auth/v2/oauth2/token/introspect")
    assert sent.authorization == expected_basic(fake)
    assert sent.form == {"token": "tok-alice", "include": "identity_set_detail,session_info"}


async def test_include_is_honoured_and_unknown_tokens_are_inactive(fake: FakeGlobus) -> None:
    fake.add_token("tok-plain", FakeUser.single("bob@other.org", session=False))
    fake.add_token("tok-expired", FakeUser.single("carol@uni.edu"), exp=int(time.time()) - 1)
    fake.add_token("tok-revoked", FakeUser.single("dan@uni.edu"), active=False)
    client = confidential(fake)

    plain = await blocking(client.oauth2_token_introspect, "tok-plain")
    no_session = await blocking(client.oauth2_token_introspect, "tok-plain", include="session_info")
    unknown = [
        await blocking(client.oauth2_token_introspect, t) for t in ("nope", "tok-expired", "tok-revoked")
    ]

    assert "identity_set_detail" not in plain.data and "session_info" not in plain.data
    assert "include" not in fake.requests[0].form  # the SDK omits an unset include
    assert no_session["session_info"]["authentications"] == {}
    assert [u.data for u in unknown] == [{"active": False}] * 3


async def test_service_token_has_no_session(fake: FakeGlobus) -> None:
    service = "5e5e5e5e-0000-4000-8000-000000000005"
    fake.add_token("tok-service", client_id=service)

    answer = await blocking(
        confidential(fake).oauth2_token_introspect, "tok-service", include="identity_set_detail,session_info"
    )

    assert answer["username"] == f"{service}@clients.auth.globus.org"
    assert answer["client_id"] == service and answer["sub"] == service
    assert [i["sub"] for i in answer["identity_set_detail"]] == [service]
    assert answer["session_info"]["authentications"] == {}


async def test_policy_evaluations_through_generic_post(fake: FakeGlobus) -> None:
    fake.add_token("tok-ha", FakeUser.single("alice@uni.edu"), policies={"p1": False})
    form = {"token": "tok-ha", "include": "session_info", "authentication_policies": "p1,p2"}

    answer = await blocking(
        confidential(fake).post, "/v2/oauth2/token/introspect", data=form, encoding="form"
    )

    assert answer["policy_evaluations"] == {"p1": {"evaluation": False}, "p2": {"evaluation": True}}
    assert fake.requests[-1].form == form


async def test_dependent_token_then_my_groups(fake: FakeGlobus) -> None:
    alice = FakeUser.single("alice@uni.edu", groups=[GROUP])
    fake.add_token("tok-alice", alice)
    fake.group_names[GROUP] = "HPC users"

    tokens = await blocking(confidential(fake).oauth2_get_dependent_tokens, "tok-alice", scope=GROUPS_SCOPE)
    groups_token = tokens.by_resource_server["groups.api.globus.org"]["access_token"]
    groups = globus_sdk.GroupsClient(
        base_url=fake.groups_url,
        authorizer=globus_sdk.AccessTokenAuthorizer(groups_token),
        retry_config=RetryConfig(max_retries=0),
    )
    mine = await blocking(groups.get_my_groups, statuses="active")

    assert [(g["id"], g["name"]) for g in mine] == [(GROUP, "HPC users")]
    assert mine[0]["my_memberships"][0] == {
        "group_id": GROUP,
        "identity_id": alice.sub,
        "username": "alice@uni.edu",
        "role": "member",
        "status": "active",
    }
    grant, listing = fake.requests[-2:]
    assert grant.path == "/auth/v2/oauth2/token" and grant.authorization == expected_basic(fake)
    assert grant.form == {
        "grant_type": "urn:globus:auth:grant_type:dependent_token",
        "token": "tok-alice",
        "scope": GROUPS_SCOPE,
    }
    assert (listing.method, listing.path, listing.query) == (
        "GET",
        "/groups/v2/groups/my_groups",
        {"statuses": "active"},
    )
    assert listing.authorization == f"Bearer {groups_token}"


async def test_missing_groups_dependency_and_unknown_groups_token(fake: FakeGlobus) -> None:
    fake.add_token("tok-alice", FakeUser.single("alice@uni.edu"))
    fake.groups_dependent_scope = False

    tokens = await blocking(confidential(fake).oauth2_get_dependent_tokens, "tok-alice", scope=GROUPS_SCOPE)
    groups = globus_sdk.GroupsClient(
        base_url=fake.groups_url.rstrip("/"),  # the SDK joins with or without the trailing slash
        authorizer=globus_sdk.AccessTokenAuthorizer("groups-forged"),
        retry_config=RetryConfig(max_retries=0),
    )
    with pytest.raises(globus_sdk.GroupsAPIError) as refused:
        await blocking(groups.get_my_groups, statuses="active")

    assert "groups.api.globus.org" not in tokens.by_resource_server
    assert refused.value.http_status == 401
    assert fake.requests[-1].path == "/groups/v2/groups/my_groups"


async def test_get_policy(fake: FakeGlobus) -> None:
    fake.add_policy("pol-1", high_assurance=True, domains=["uni.edu"], timeout=900)
    client = confidential(fake)

    policy = (await blocking(client.get, "/v2/api/policies/pol-1"))["policy"]
    with pytest.raises(globus_sdk.AuthAPIError) as missing:
        await blocking(client.get, "/v2/api/policies/unknown")

    assert policy["high_assurance"] is True and policy["domain_constraints_include"] == ["uni.edu"]
    assert policy["authentication_assurance_timeout"] == 900 and policy["id"] == "pol-1"
    assert missing.value.http_status == 404
    assert fake.count("/v2/api/policies/pol-1") == 1 and fake.count("/policies/unknown") == 1


async def test_wrong_secret_is_an_auth_error_401(fake: FakeGlobus) -> None:
    fake.add_token("tok-alice", FakeUser.single("alice@uni.edu"))

    with pytest.raises(globus_sdk.AuthAPIError) as refused:
        await blocking(confidential(fake, secret="wrong").oauth2_token_introspect, "tok-alice")

    assert refused.value.http_status == 401
    assert refused.value.code == "UNAUTHORIZED"
    assert refused.value.raw_json is not None and refused.value.raw_json["error"] == "invalid_client"
    assert fake.requests[-1].basic_credentials == (fake.client_id, "wrong")


async def test_fail_status_and_delay_apply_to_every_route(fake: FakeGlobus) -> None:
    fake.add_token("tok-alice", FakeUser.single("alice@uni.edu"))
    fake.fail_status = 503
    fake.delay = 0.2
    client = confidential(fake)

    started = time.monotonic()
    with pytest.raises(globus_sdk.GlobusAPIError) as failed:
        await blocking(client.oauth2_token_introspect, "tok-alice")
    elapsed = time.monotonic() - started
    with pytest.raises(globus_sdk.GlobusAPIError) as groups_failed:
        await blocking(client.oauth2_get_dependent_tokens, "tok-alice", scope=GROUPS_SCOPE)

    assert failed.value.http_status == 503 and groups_failed.value.http_status == 503
    assert elapsed >= 0.2
    assert fake.count("/introspect") == 1  # max_retries=0: exactly one attempt


async def test_stopped_fake_is_unreachable_and_can_come_back(fake: FakeGlobus) -> None:
    fake.add_token("tok-alice", FakeUser.single("alice@uni.edu"))
    client = confidential(fake)
    await blocking(client.oauth2_token_introspect, "tok-alice")  # leaves a pooled keep-alive connection
    url = fake.url

    await fake.stop()
    with pytest.raises(globus_sdk.GlobusConnectionError):
        await blocking(client.oauth2_token_introspect, "tok-alice")
    await fake.start()
    again = await blocking(client.oauth2_token_introspect, "tok-alice")

    assert fake.url == url and again["active"] is True
