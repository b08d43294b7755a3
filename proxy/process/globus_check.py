"""`--check-config --online`: the Globus side of a configuration, checked against Globus Auth before
the first user finds out. Every problem is reported, not only the first:

- the credentials: an introspection (of a token that cannot exist) is answered, not refused, so
  the gateway's own calls will be too;
- the scope: it exists, belongs to `client_id`, and has the Groups scope as a dependent scope
  (without it no user's groups can be read);
- the policies: each is high assurance and covers exactly `authorized_idp_domains`.
"""

from __future__ import annotations

import secrets

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryConfig

from proxy.core.globus_auth import check_policy
from proxy.settings.auth import GlobusAuthSettings
from proxy.settings.files import ConfigError

GROUPS_SCOPE_ID = "73320ffe-4cb4-4b25-a0a3-83d53d59ce4f"
"""The Globus Groups scope (view_my_groups_and_memberships) as a dependent scope names it."""


class GlobusUnreachable(Exception):
    """Globus Auth did not answer: nothing could be checked."""


def check_online(settings: GlobusAuthSettings) -> list[str]:
    """The problems found, each naming the setting to fix; empty when Globus agrees."""
    client = globus_sdk.ConfidentialAppAuthClient(
        settings.client_id,
        settings.client_secret,
        base_url=settings.auth_url,
        transport=RequestsTransport(http_timeout=settings.timeout_seconds),
        retry_config=RetryConfig(max_retries=settings.retries, max_sleep=1),
    )
    try:
        refused = _credentials(client)
        if refused:
            return [refused]  # nothing else can be read with credentials Globus refuses
        return [*_scope(client, settings), *_policies(client, settings)]
    except globus_sdk.NetworkError as exc:
        raise GlobusUnreachable(f"Globus Auth cannot be reached: {type(exc).__name__}") from None


def _credentials(client: globus_sdk.ConfidentialAppAuthClient) -> str | None:
    form = {"token": f"check-config-{secrets.token_urlsafe(16)}"}
    try:
        client.post("/v2/oauth2/token/introspect", data=form, encoding="form")
    except globus_sdk.GlobusAPIError as exc:
        if exc.http_status == 401:
            return (
                "auth.globus.client_id / client_secret: Globus Auth refused the gateway's client "
                "credentials (HTTP 401)"
            )
        return f"auth.globus: Globus Auth answered an introspection with HTTP {exc.http_status}"
    return None


def _scope(client: globus_sdk.ConfidentialAppAuthClient, settings: GlobusAuthSettings) -> list[str]:
    """Read as the existing gateway's setup guide does, with the client's own credentials: the
    client's record lists its scope ids, and each scope its dependent scopes."""
    base = f"/v2/api/clients/{settings.client_id}"
    try:
        record = client.get(base).data.get("client") or {}
        found = None
        for scope_id in record.get("scopes") or []:
            scope = client.get(f"{base}/scopes/{scope_id}").data.get("scope") or {}
            if scope.get("scope_string") == settings.scope:
                found = scope
                break
    except globus_sdk.GlobusAPIError as exc:
        return [
            f"auth.globus.scope: cannot read client {settings.client_id}'s scopes (HTTP {exc.http_status})"
        ]
    if found is None:
        return [f"auth.globus.scope: {settings.scope} is not a scope of client {settings.client_id}"]
    dependent = {
        str(item.get("scope")) for item in found.get("dependent_scopes") or [] if isinstance(item, dict)
    }
    if GROUPS_SCOPE_ID in dependent:
        return []
    return [
        f"auth.globus.scope: {settings.scope} lacks the Groups dependent scope ({GROUPS_SCOPE_ID}): "
        "no user's groups could be read; see docs/globus.md"
    ]


def _policies(client: globus_sdk.ConfidentialAppAuthClient, settings: GlobusAuthSettings) -> list[str]:
    problems = []
    for policy_id in settings.policies:
        try:
            policy = client.get(f"/v2/api/policies/{policy_id}").data["policy"]
            check_policy(policy_id, policy, settings)
        except globus_sdk.GlobusAPIError as exc:
            problems.append(f"auth.globus.policies: cannot read policy {policy_id} (HTTP {exc.http_status})")
        except (KeyError, TypeError):
            problems.append(
                f"auth.globus.policies: Globus Auth's answer for policy {policy_id} has no policy"
            )
        except ConfigError as exc:
            problems.append(str(exc))
    return problems
