"""Who may open the dashboard: members of the configured admin groups, after a login.

- Globus (``auth.provider: globus``): the OAuth2 authorization code flow with the gateway's
  confidential client, through globus-sdk. The browser goes to Globus Auth's authorize URL; Globus
  sends it back with a code, which the gateway exchanges (with its client secret) for tokens for
  OpenID Connect (userinfo: who) and Groups (which groups). Those tokens are used once and revoked:
  the dashboard keeps only its own signed session cookie.
- Static (the embedded default): an administrator's static token typed into a form, checked by the
  gateway's own authenticator, its groups taken from the tokens file.

The SDK is blocking: its calls run on a small thread pool of their own, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryConfig

from proxy.core.identity import Authenticator
from proxy.errors import ApiError
from proxy.settings.auth import GlobusAuthSettings

log = logging.getLogger(__name__)

AUTH_RESOURCE_SERVER: Final = "auth.globus.org"
GROUPS_RESOURCE_SERVER: Final = "groups.api.globus.org"
GROUPS_SCOPE: Final = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
LOGIN_SCOPES: Final = ("openid", "profile", "email", GROUPS_SCOPE)


@dataclass(frozen=True)
class Person:
    """Who logged in, and whether they may see the dashboard."""

    username: str
    name: str
    admin: bool


class LoginFailed(Exception):
    """Globus refused the code, or could not be reached: the login must start again."""


class GlobusLogin:
    def __init__(self, settings: GlobusAuthSettings, admin_groups: Collection[str]) -> None:
        self._settings = settings
        self._admin_groups = frozenset(admin_groups)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dashboard-login")

    def _client(self, redirect_uri: str, state: str) -> globus_sdk.ConfidentialAppAuthClient:
        client = globus_sdk.ConfidentialAppAuthClient(
            self._settings.client_id,
            self._settings.client_secret,
            base_url=self._settings.auth_url,
            transport=RequestsTransport(http_timeout=self._settings.timeout_seconds),
            retry_config=self._retries(),
        )
        client.oauth2_start_flow(redirect_uri, requested_scopes=list(LOGIN_SCOPES), state=state)
        return client

    def _retries(self) -> RetryConfig:
        return RetryConfig(max_retries=self._settings.retries, max_sleep=1)

    def authorize_url(self, redirect_uri: str, state: str) -> str:
        """Builds a URL only: no call to Globus."""
        return str(self._client(redirect_uri, state).oauth2_get_authorize_url())

    def finish(self, redirect_uri: str, state: str, code: str) -> Person:
        """Blocking: exchange the code, ask who and which groups, revoke the tokens."""
        client = self._client(redirect_uri, state)
        try:
            tokens = client.oauth2_exchange_code_for_tokens(code).by_resource_server
            auth_token = tokens[AUTH_RESOURCE_SERVER]["access_token"]
            groups_token = tokens.get(GROUPS_RESOURCE_SERVER, {}).get("access_token")
            userinfo = globus_sdk.AuthClient(
                base_url=self._settings.auth_url,
                authorizer=globus_sdk.AccessTokenAuthorizer(auth_token),
                transport=RequestsTransport(http_timeout=self._settings.timeout_seconds),
                retry_config=self._retries(),
            ).userinfo()
            groups: list[str] = []
            if groups_token is not None:
                groups = [
                    str(group["id"])
                    for group in globus_sdk.GroupsClient(
                        base_url=self._settings.groups_url,
                        authorizer=globus_sdk.AccessTokenAuthorizer(groups_token),
                        transport=RequestsTransport(http_timeout=self._settings.timeout_seconds),
                        retry_config=self._retries(),
                    ).get_my_groups(statuses="active")
                ]
        except (globus_sdk.GlobusAPIError, KeyError) as exc:
            log.warning("dashboard login: Globus refused the code exchange or a lookup: %s", exc)
            raise LoginFailed("Globus did not accept this login; please log in again.") from None
        except globus_sdk.NetworkError:
            raise LoginFailed("Globus Auth cannot be reached; try again shortly.") from None
        for token in (auth_token, groups_token):
            if token is not None:
                try:
                    client.oauth2_revoke_token(token)
                except globus_sdk.GlobusError:
                    log.info("dashboard login: a token could not be revoked; it expires by itself")
        username = str(userinfo.get("preferred_username") or userinfo.get("sub") or "")
        name = str(userinfo.get("name") or username)
        return Person(username, name, bool(self._admin_groups.intersection(groups)))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def static_login(
    authenticator: Authenticator, token: str, admin_groups: Collection[str]
) -> Person | None:
    """The token's user, or None when the token is unknown."""
    try:
        user = await authenticator.authenticate(token, lambda: None)
    except ApiError:
        return None
    return Person(user.username, user.name or user.username, bool(user.groups.intersection(admin_groups)))
