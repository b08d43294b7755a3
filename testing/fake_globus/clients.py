"""Globus Auth's records of the gateway's project, for the fake in ``auth.py``: its authentication
policies, read by the gateway's client, and each client with its scopes, which a client may read
with its own credentials only. The gateway's ``--check-config --online`` reads all three."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from testing.fake_globus.documents import auth_error, client_document, scope_document

if TYPE_CHECKING:
    from testing.fake_globus.auth import FakeGlobus


class ClientRecords:
    def __init__(self, fake: FakeGlobus) -> None:
        self._fake = fake
        self.policies: dict[str, dict[str, Any]] = {}
        """Policy id -> its document, registered with ``FakeGlobus.add_policy``."""

    async def policy(self, request: web.Request) -> web.Response:
        """``GET /v2/api/policies/{id}``, for the gateway's client."""
        if not self._fake.is_gateway(request):
            return auth_error(401, "UNAUTHORIZED", "Call must be authenticated", "invalid_client")
        policy = self.policies.get(request.match_info["policy_id"])
        if policy is None:
            return auth_error(404, "NOT_FOUND", "policy not found")
        return web.json_response({"policy": dict(policy)})

    def _own_client(self, request: web.Request) -> web.Response | None:
        """A client reads its own record and scopes with its own credentials (Basic auth)."""
        client_id = self._fake.known_client(request)
        if client_id is None:
            return auth_error(401, "UNAUTHORIZED", "Call must be authenticated", "invalid_client")
        if request.match_info["client_id"] != client_id:
            return auth_error(403, "FORBIDDEN", "A client may only view itself")
        return None

    async def client(self, request: web.Request) -> web.Response:
        """``GET /v2/api/clients/{id}``: the client, with the ids of its scopes."""
        refused = self._own_client(request)
        if refused is not None:
            return refused
        client_id = request.match_info["client_id"]
        gateway = self._fake.client_id
        scopes = [self._scope_document()["id"]] if client_id == gateway else []
        client = client_document(client_id, gateway, scopes)
        return web.json_response({"client": client})

    async def client_scope(self, request: web.Request) -> web.Response:
        """``GET /v2/api/clients/{id}/scopes/{scope_id}``: one of the client's scopes."""
        refused = self._own_client(request)
        if refused is not None:
            return refused
        document = self._scope_document()
        owned = request.match_info["client_id"] == self._fake.client_id
        if not owned or request.match_info["scope_id"] != document["id"]:
            return auth_error(404, "NOT_FOUND", "scope not found")
        return web.json_response({"scope": document})

    def _scope_document(self) -> dict[str, Any]:
        fake = self._fake
        return scope_document(fake.scope, fake.client_id, fake.groups_dependent_scope)
