"""A local fake of Globus Auth and Globus Groups, faithful at the HTTP boundary.

The gateway talks to Globus through the real, blocking globus-sdk. Mocking the SDK would hide exactly the
mistakes that matter (wrong form fields, wrong paths, answers the SDK cannot parse), so this fake serves the
wire format the real services speak and the real SDK is pointed at it:

    ConfidentialAppAuthClient(fake.client_id, fake.client_secret, base_url=fake.auth_url)
    GroupsClient(base_url=fake.groups_url, authorizer=AccessTokenAuthorizer(groups_token))
    ClientCredentialsAuthorizer(ConfidentialAppAuthClient(cid, secret, base_url=fake.auth_url), COMPUTE_SCOPE)

Client-credentials tokens (clients registered with :meth:`FakeGlobus.add_client`) are listed in
``issued_tokens`` so that a fake resource server (``compute.py``) can accept exactly those.

One aiohttp application on an ephemeral 127.0.0.1 port serves Auth under ``/auth`` and Groups under
``/groups``. The SDK joins ``base_url`` and the API path with exactly one slash, so the base URLs work with or
without a trailing slash; ``/v2`` belongs to the request path, not the base URL.

The fake's parts: ``identities.py`` (users, tokens, scopes), ``documents.py`` (the answers' shapes),
``login.py`` (researchers' native-app logins), ``grants.py`` (dependent tokens and client credentials),
``clients.py`` (the project's policies and clients).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from testing.fake_globus.clients import ClientRecords
from testing.fake_globus.documents import (
    auth_error,
    group_document,
    groups_error,
    introspection,
    policy_document,
)
from testing.fake_globus.grants import ServiceGrants
from testing.fake_globus.identities import (
    CLIENT_CREDENTIALS_GRANT,
    DEFAULT_APP_CLIENT_ID,
    DEPENDENT_TOKEN_GRANT,
    GROUPS_SCOPE,
    FakeUser,
    Token,
    service_user,
)
from testing.fake_globus.login import NativeLogins, WebLogins

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RecordedRequest:
    """One request as it arrived, for asserting the wire format."""

    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    authorization: str | None
    headers: dict[str, str]
    time: float  # time.monotonic() on arrival

    @property
    def basic_credentials(self) -> tuple[str, str] | None:
        """(client_id, secret) from an HTTP Basic header, None when absent or malformed."""
        return _parse_basic(self.authorization)


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class FakeGlobus:
    """Globus Auth (introspect, dependent tokens, policies) and Groups (my_groups) on one local port.

    Tokens, users and policies are registered with :meth:`add_token` and :meth:`add_policy`. The knobs
    ``groups_dependent_scope``, ``delay`` and ``fail_status`` may be changed at any time, also while the
    gateway under test is running.
    """

    def __init__(
        self,
        *,
        client_id: str = "0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d",
        client_secret: str = "fake-gateway-secret",
        scope: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.scope = scope or f"https://auth.globus.org/scopes/{client_id}/action_all"
        self.requests: list[RecordedRequest] = []
        self.groups_dependent_scope = True
        self.delay = 0.0
        self.fail_status: int | None = None
        self.group_names: dict[str, str] = {}
        # Access token -> client id, for every client-credentials token issued, so that fakes of resource
        # servers (Compute) can check the bearer tokens they receive.
        self.issued_tokens: dict[str, str] = {}
        self._clients: dict[str, str] = {client_id: client_secret}
        self._tokens: dict[str, Token] = {}
        self.groups_tokens: dict[str, Token] = {}
        """Groups access token -> the token record of the user it acts for."""
        self._runner: web.AppRunner | None = None
        self._port = 0
        self.logins = NativeLogins(self)
        """Researchers' native-app logins: register the login app in ``logins.native_clients``."""
        self.records = ClientRecords(self)
        """The project's policies and clients, as ``--check-config --online`` reads them."""
        self.web_logins = WebLogins(self)
        """Web applications' logins (authorization code flow of a confidential client)."""
        self.grants = ServiceGrants(self)
        """Dependent tokens and client credentials, for confidential clients."""

    # -- setup -------------------------------------------------------------------------------------------

    def add_token(
        self,
        token: str,
        user: FakeUser | None = None,
        *,
        active: bool = True,
        scope: str | None = None,
        exp: int | None = None,
        policies: dict[str, bool] | None = None,
        client_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Register a token. Without ``user`` it is a client-credentials token of the service ``client_id``
        (no live session). ``scope`` defaults to the gateway's scope, ``exp`` to one hour from now;
        ``policies`` maps policy ids to their evaluation; ``extra`` overrides introspection fields."""
        is_service = user is None
        if user is None:
            if client_id is None:
                raise ValueError("a token needs a user, or a client_id for a service token")
            user = service_user(client_id)
        for idp in user.session_idps:
            if not any(i["identity_provider"] == idp for i in user.identities):
                raise ValueError(f"session IdP {idp} matches none of {user.username}'s identities")
        now = int(time.time())
        self._tokens[token] = Token(
            user=user,
            active=active,
            scope=scope if scope is not None else self.scope,
            exp=exp if exp is not None else now + 3600,
            iat=now,
            policies=dict(policies or {}),
            client_id=client_id or DEFAULT_APP_CLIENT_ID,
            is_service=is_service,
            extra=dict(extra or {}),
        )

    def add_client(self, client_id: str, client_secret: str) -> None:
        """Register a confidential client (a service account) that may use the client-credentials grant,
        e.g. the identity the gateway submits Compute tasks as. The gateway's own client is always known."""
        self._clients[client_id] = client_secret

    def add_policy(
        self, policy_id: str, *, high_assurance: bool, domains: list[str], timeout: int = 3600
    ) -> None:
        """Register an authentication policy, served by ``GET /v2/api/policies/{id}``."""
        self.records.policies[policy_id] = policy_document(
            policy_id,
            high_assurance=high_assurance,
            domains=domains,
            timeout=timeout,
            gateway_client_id=self.client_id,
        )

    def revoke(self, token: str) -> None:
        """A revoked token introspects as inactive from now on."""
        record = self._tokens.get(token)
        if record is not None:
            record.active = False

    def is_client(self, client_id: str) -> bool:
        return client_id in self._clients

    def is_live(self, token: str) -> bool:
        return self.live(token) is not None

    def groups_token_for(self, user: FakeUser, client_id: str) -> str:
        """A Groups token for ``user``, obtained by ``client_id`` (a login's, not a dependent token)."""
        token = f"groups-{secrets.token_urlsafe(16)}"
        self.add_token(token, user, scope=GROUPS_SCOPE, client_id=client_id)
        self.groups_tokens[token] = self._tokens[token]
        return token

    def count(self, path_suffix: str) -> int:
        """How many requests hit a path ending with ``path_suffix``."""
        return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FakeGlobus is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def auth_url(self) -> str:
        """``base_url`` for AuthClient / ConfidentialAppAuthClient."""
        return f"{self.url}/auth/"

    @property
    def groups_url(self) -> str:
        """``base_url`` for GroupsClient."""
        return f"{self.url}/groups/"

    async def start(self) -> None:
        """Listen on an ephemeral port; after a stop(), on the same port again (Globus coming back)."""
        if self._runner is not None:
            return
        runner = web.AppRunner(
            self._build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Close the port and all connections: Globus becomes unreachable."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeGlobus:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/auth/v2/oauth2/token/introspect", self._introspect)
        app.router.add_post("/auth/v2/oauth2/token", self._token)
        app.router.add_post("/auth/v2/oauth2/token/revoke", self._revoke)
        app.router.add_get("/auth/v2/oauth2/authorize", self._authorize)
        app.router.add_get("/auth/v2/oauth2/userinfo", self._userinfo)
        app.router.add_get("/auth/v2/api/policies/{policy_id}", self.records.policy)
        app.router.add_get("/auth/v2/api/clients/{client_id}", self.records.client)
        app.router.add_get("/auth/v2/api/clients/{client_id}/scopes/{scope_id}", self.records.client_scope)
        app.router.add_get("/groups/v2/groups/my_groups", self._my_groups)
        return app

    # -- cross-cutting behaviour -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record every request, then apply ``delay`` and ``fail_status`` before any route runs."""
        form: dict[str, str] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                form=form,
                authorization=request.headers.get("Authorization"),
                headers=dict(request.headers),
                time=time.monotonic(),
            )
        )
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if self.fail_status is not None:
            return self._failure(request.path, self.fail_status)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return auth_error(404, "NOT_FOUND", f"no route {request.path}")

    @staticmethod
    def _failure(path: str, status: int) -> web.Response:
        detail = f"fake Globus configured to fail with {status}"
        if path.startswith("/groups/"):
            return groups_error(status, "ERROR", detail)
        return auth_error(status, "SERVICE_UNAVAILABLE" if status == 503 else "ERROR", detail)

    def is_gateway(self, request: web.Request) -> bool:
        """Whether the request authenticates as the gateway's own client (Basic auth)."""
        return _parse_basic(request.headers.get("Authorization")) == (self.client_id, self.client_secret)

    def known_client(self, request: web.Request) -> str | None:
        """The id of the registered client authenticating with Basic auth, None if unknown or wrong."""
        credentials = _parse_basic(request.headers.get("Authorization"))
        if credentials is None or self._clients.get(credentials[0]) != credentials[1]:
            return None
        return credentials[0]

    def live(self, token: str) -> Token | None:
        """The token's record while it is active and unexpired."""
        record = self._tokens.get(token)
        if record is None or not record.active or record.exp <= time.time():
            return None
        return record

    # -- Auth --------------------------------------------------------------------------------------------

    async def _introspect(self, request: web.Request) -> web.Response:
        if not self.is_gateway(request):
            return auth_error(401, "UNAUTHORIZED", "Call must be authenticated", "invalid_client")
        form = await request.post()
        token = str(form.get("token", ""))
        if not token:
            return auth_error(400, "INVALID_REQUEST", "token is required", "invalid_request")
        record = self.live(token)
        if record is None:
            return web.json_response({"active": False})
        include = {part.strip() for part in str(form.get("include", "")).split(",") if part.strip()}
        body = introspection(record, include, self.client_id)
        policy_ids = [p.strip() for p in str(form.get("authentication_policies", "")).split(",") if p.strip()]
        if policy_ids:
            body["policy_evaluations"] = {p: {"evaluation": record.policies.get(p, True)} for p in policy_ids}
        body.update(record.extra)
        return web.json_response(body)

    async def _authorize(self, request: web.Request) -> web.Response:
        return self.web_logins.authorize(dict(request.query))

    async def _userinfo(self, request: web.Request) -> web.Response:
        return self.web_logins.userinfo(request.headers.get("Authorization", ""))

    async def _revoke(self, request: web.Request) -> web.Response:
        return self.logins.revoke({k: str(v) for k, v in (await request.post()).items()})

    async def _token(self, request: web.Request) -> web.Response:
        if "Authorization" not in request.headers:
            return self.logins.token({k: str(v) for k, v in (await request.post()).items()})
        client_id = self.known_client(request)
        if client_id is None:
            return auth_error(401, "UNAUTHORIZED", "Call must be authenticated", "invalid_client")
        form = {k: str(v) for k, v in (await request.post()).items()}
        grant = form.get("grant_type")
        if grant == CLIENT_CREDENTIALS_GRANT:
            return self.grants.client_credentials(client_id, form.get("scope", ""))
        if grant == "authorization_code":
            return self.web_logins.token(client_id, form)
        if grant == DEPENDENT_TOKEN_GRANT:
            return self.grants.dependent_tokens(form)
        return auth_error(
            400,
            "UNSUPPORTED_GRANT_TYPE",
            "only dependent token, client credentials and authorization code grants are faked",
        )

    # -- Groups ------------------------------------------------------------------------------------------

    async def _my_groups(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        record = self.groups_tokens.get(header[7:]) if header.startswith("Bearer ") else None
        if record is None:
            return groups_error(401, "UNAUTHORIZED", "invalid or missing bearer token")
        statuses = {s for s in request.query.get("statuses", "active").split(",") if s}
        if "active" not in statuses:
            return web.json_response([])
        names = self.group_names
        groups = [
            group_document(group_id, names.get(group_id, f"Group {group_id[:8]}"), record.user)
            for group_id in record.user.groups
        ]
        return web.json_response(groups)
