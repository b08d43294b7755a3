"""Globus Auth's native-app login, for the fake in `auth.py`: what a researcher's command-line
login (`inference-gateway token`) speaks to.

What the real service does, and so this fake (globus-sdk 4's NativeAppAuthClient sends these):
- The browser step is `GET /v2/oauth2/authorize?client_id&redirect_uri&scope&response_type=code
  &code_challenge&code_challenge_method=S256&access_type=offline`. A test stands in for the researcher's
  browser with :meth:`NativeLogins.approve`, which reads that URL and hands back the code Globus shows.
- `POST /v2/oauth2/token` without client credentials, `client_id` in the form:
  `grant_type=authorization_code` with `code`, `redirect_uri` and `code_verifier` (checked against the
  challenge; a code works once), or `grant_type=refresh_token` with `refresh_token`. The answer is a
  token response: `access_token, expires_in, resource_server, scope, token_type, refresh_token, state,
  other_tokens`. A refresh token stays valid until revoked. Bad grants are 400 `invalid_grant`.
- `POST /v2/oauth2/token/revoke` with `token` and `client_id`: always 200 `{"active": false}`.
Access tokens issued here are registered with the fake, so the gateway introspects them as the user.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from testing.fake_globus.documents import auth_error
from testing.fake_globus.identities import FakeUser

if TYPE_CHECKING:
    from testing.fake_globus.auth import FakeGlobus

ACCESS_TOKEN_LIFETIME = 172800


@dataclass
class _Code:
    client_id: str
    user: FakeUser
    scope: str
    challenge: str
    redirect_uri: str


@dataclass
class _Refresh:
    client_id: str
    user: FakeUser
    scope: str


class NativeLogins:
    def __init__(self, fake: FakeGlobus) -> None:
        self._fake = fake
        self.native_clients: set[str] = set()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self.access_lifetime = ACCESS_TOKEN_LIFETIME

    def approve(self, authorize_url: str, user: FakeUser) -> str:
        """The researcher signs in at `authorize_url`: the authorization code Globus then shows them."""
        query = {key: values[0] for key, values in parse_qs(urlsplit(authorize_url).query).items()}
        if query.get("client_id") not in self.native_clients:
            raise ValueError(f"unknown native client {query.get('client_id')}")
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            raise ValueError(f"not a native-app authorization request: {query}")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            query["client_id"], user, query["scope"], query["code_challenge"], query["redirect_uri"]
        )
        return code

    def token(self, form: dict[str, str]) -> web.Response:
        client_id = form.get("client_id", "")
        if client_id not in self.native_clients:
            return auth_error(401, "UNAUTHORIZED", "unknown client", "invalid_client")
        if form.get("grant_type") == "authorization_code":
            code = self._codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            if (
                code is None
                or code.client_id != client_id
                or code.redirect_uri != form.get("redirect_uri")
                or _challenge(verifier) != code.challenge
            ):
                return auth_error(400, "INVALID_GRANT", "invalid authorization code", "invalid_grant")
            return self._issue(client_id, code.user, code.scope, refresh=secrets.token_urlsafe(32))
        refresh_token = form.get("refresh_token", "")
        grant = self._refresh.get(refresh_token)
        if grant is None or grant.client_id != client_id:
            return auth_error(400, "INVALID_GRANT", "invalid refresh token", "invalid_grant")
        return self._issue(client_id, grant.user, grant.scope, refresh=refresh_token)

    def revoke(self, form: dict[str, str]) -> web.Response:
        token = form.get("token", "")
        self._refresh.pop(token, None)
        self._fake.revoke(token)
        return web.json_response({"active": False})

    def _issue(self, client_id: str, user: FakeUser, scope: str, *, refresh: str) -> web.Response:
        self._refresh[refresh] = _Refresh(client_id, user, scope)
        access_token = f"user-{secrets.token_urlsafe(24)}"
        self._fake.add_token(
            access_token, user, scope=scope, client_id=client_id, exp=int(time.time()) + self.access_lifetime
        )
        answer: dict[str, Any] = {
            "access_token": access_token,
            "expires_in": self.access_lifetime,
            "resource_server": self._fake.client_id,
            "scope": scope,
            "token_type": "Bearer",
            "refresh_token": refresh,
            "state": "_default",
            "other_tokens": [],
        }
        return web.json_response(answer)


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
