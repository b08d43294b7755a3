"""The token grants a confidential client asks Globus Auth for, for the fake in ``auth.py``: dependent
tokens (the gateway's Groups token on a user's behalf) and client credentials (a service identity's
own tokens, such as the one the gateway submits Compute tasks as). ``FakeGlobus`` routes
``POST /v2/oauth2/token`` here once the client's Basic credentials are checked."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from testing.fake_globus.documents import auth_error
from testing.fake_globus.identities import (
    COMPUTE_RESOURCE_SERVER,
    COMPUTE_SCOPE,
    GROUPS_RESOURCE_SERVER,
    GROUPS_SCOPE,
    TRANSFER_RESOURCE_SERVER,
    TRANSFER_SCOPE,
)

if TYPE_CHECKING:
    from testing.fake_globus.auth import FakeGlobus

CLIENT_CREDENTIALS_LIFETIME = 172800
"""Seconds, as Globus Auth answers for a client-credentials token."""


class ServiceGrants:
    def __init__(self, fake: FakeGlobus) -> None:
        self._fake = fake

    def dependent_tokens(self, form: Mapping[str, str]) -> web.Response:
        """A Groups token for the user of the token in ``form``, when the gateway's client has the
        Groups dependent scope (``FakeGlobus.groups_dependent_scope``); with ``access_type=offline``
        also a refresh token."""
        fake = self._fake
        record = fake.live(form.get("token", ""))
        if record is None:
            return auth_error(400, "INVALID_GRANT", "token is not active", "invalid_grant")
        requested = set(form.get("scope", "").split())
        answer: list[dict[str, Any]] = []
        if fake.groups_dependent_scope and (not requested or GROUPS_SCOPE in requested):
            groups_token = f"groups-{secrets.token_urlsafe(16)}"
            fake.groups_tokens[groups_token] = record
            answer.append(
                {
                    "resource_server": GROUPS_RESOURCE_SERVER,
                    "access_token": groups_token,
                    "scope": GROUPS_SCOPE,
                    "expires_in": 172800,
                    "token_type": "Bearer",
                    "state": "_default",
                }
            )
            if form.get("access_type") == "offline":
                answer[-1]["refresh_token"] = f"groups-refresh-{secrets.token_urlsafe(16)}"
        return web.json_response(answer)

    def client_credentials(self, client_id: str, scope: str) -> web.Response:
        """One token per resource server, the first at the top level and the rest in ``other_tokens``, as
        ``OAuthTokenResponse.by_resource_server`` reads them. Tokens are also introspectable, as the client's
        own service identity."""
        by_server: dict[str, list[str]] = {}
        for requested in scope.split():
            server = self._resource_server(requested)
            if server is None:
                return auth_error(400, "INVALID_SCOPE", f"unknown scope {requested}", "invalid_scope")
            by_server.setdefault(server, []).append(requested)
        if not by_server:
            return auth_error(400, "INVALID_SCOPE", "scope is required", "invalid_scope")
        tokens: list[dict[str, Any]] = []
        for server, scopes in by_server.items():
            token = f"cc-{secrets.token_urlsafe(24)}"
            self._fake.issued_tokens[token] = client_id
            self._fake.add_token(
                token,
                client_id=client_id,
                scope=" ".join(scopes),
                exp=int(time.time()) + CLIENT_CREDENTIALS_LIFETIME,
            )
            tokens.append(
                {
                    "access_token": token,
                    "scope": " ".join(scopes),
                    "resource_server": server,
                    "expires_in": CLIENT_CREDENTIALS_LIFETIME,
                    "token_type": "Bearer",
                }
            )
        return web.json_response({**tokens[0], "other_tokens": tokens[1:]})

    def _resource_server(self, scope: str) -> str | None:
        """Which resource server a scope string belongs to; None for scopes this fake does not know."""
        known = {
            COMPUTE_SCOPE: COMPUTE_RESOURCE_SERVER,
            TRANSFER_SCOPE: TRANSFER_RESOURCE_SERVER,
            GROUPS_SCOPE: GROUPS_RESOURCE_SERVER,
            self._fake.scope: self._fake.client_id,
        }
        return known.get(scope)
