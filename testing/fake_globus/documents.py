"""The documents the fake Globus Auth and Groups answer with, shaped as the real services shape them
and built from what the fake knows: errors, introspections, policies, clients, scopes and groups."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from aiohttp import web

from testing.fake_globus.identities import GROUPS_SCOPE_ID, ISSUER, FakeUser, Token


def auth_error(status: int, code: str, detail: str, error: str | None = None) -> web.Response:
    """Globus Auth's error shape: a JSON:API-like ``errors`` list plus OAuth2 ``error`` fields."""
    body = {
        "errors": [
            {
                "status": str(status),
                "id": str(uuid.uuid4()),
                "code": code,
                "title": code.title(),
                "detail": detail,
            }
        ],
        "error": error or code.lower(),
        "error_description": detail,
    }
    return web.json_response(body, status=status)


def groups_error(status: int, code: str, message: str) -> web.Response:
    """A Globus "type zero" error (code, message, request_id); Groups' exact 4xx body is unverified."""
    body = {"code": code, "message": message, "request_id": secrets.token_hex(8)}
    return web.json_response(body, status=status)


def introspection(record: Token, include: set[str], gateway_client_id: str) -> dict[str, Any]:
    """What ``token/introspect`` says of a live token, asked by the gateway's client."""
    user = record.user
    body: dict[str, Any] = {
        "active": True,
        "token_type": "Bearer",
        "scope": record.scope,
        "client_id": record.client_id,
        "sub": user.sub,
        "username": user.username,
        "name": user.name,
        "email": user.primary().get("email"),
        "aud": list(dict.fromkeys([gateway_client_id, record.client_id])),
        "iss": ISSUER,
        "exp": record.exp,
        "iat": record.iat,
        "nbf": record.iat,
    }
    if "identity_set" in include:
        body["identity_set"] = [i["sub"] for i in user.identities]
    if "identity_set_detail" in include:
        body["identity_set_detail"] = [dict(i) for i in user.identities]
    if "session_info" in include:
        body["session_info"] = _session_info(record)
    return body


def _session_info(record: Token) -> dict[str, Any]:
    if record.is_service:
        return {"session_id": None, "authentications": {}}
    auth_time = record.iat - 60
    authentications = {
        i["sub"]: {"idp": i["identity_provider"], "auth_time": auth_time, "acr": None, "amr": None}
        for i in record.user.identities
        if i["identity_provider"] in record.user.session_idps
    }
    return {"session_id": record.session_id, "authentications": authentications}


def policy_document(
    policy_id: str, *, high_assurance: bool, domains: list[str], timeout: int, gateway_client_id: str
) -> dict[str, Any]:
    """An authentication policy of the gateway's project, as ``GET /v2/api/policies/{id}`` has it."""
    return {
        "id": policy_id,
        "display_name": f"Policy {policy_id[:8]}",
        "description": "fake policy",
        "high_assurance": high_assurance,
        "authentication_assurance_timeout": timeout,
        "domain_constraints_include": list(domains),
        "domain_constraints_exclude": None,
        "project_id": str(uuid.uuid5(uuid.NAMESPACE_URL, gateway_client_id)),
        "required_mfa": False,
    }


def client_document(client_id: str, gateway_client_id: str, scopes: list[str]) -> dict[str, Any]:
    """``GET /v2/api/clients/{id}``: the gateway's client (a resource server) or a service account."""
    gateway = client_id == gateway_client_id
    return {
        "id": client_id,
        "name": "Inference gateway" if gateway else f"client {client_id[:8]}",
        "scopes": scopes,
        "grant_types": ["authorization_code", "client_credentials", "refresh_token"],
        "project": str(uuid.uuid5(uuid.NAMESPACE_URL, gateway_client_id)),
        "client_type": "resource_server" if gateway else "client_identity",
        "public_client": False,
        "visibility": "private",
        "redirect_uris": [],
        "fqdns": [],
        "parent_client": None,
        "required_idp": None,
        "preselect_idp": None,
    }


def scope_document(scope: str, gateway_client_id: str, groups_dependent_scope: bool) -> dict[str, Any]:
    """The gateway's scope, with the Groups scope as its dependency unless the fake is told otherwise."""
    dependent = [{"scope": GROUPS_SCOPE_ID, "optional": False, "requires_refresh_token": True}]
    return {
        "scope_string": scope,
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, scope)),
        "name": "Inference gateway",
        "description": "Access to the inference gateway",
        "client": gateway_client_id,
        "dependent_scopes": dependent if groups_dependent_scope else [],
        "advertised": False,
        "allows_refresh_token": True,
        "required_domains": [],
    }


def group_document(group_id: str, name: str, user: FakeUser) -> dict[str, Any]:
    """One group of ``my_groups``, with the user's active membership."""
    return {
        "id": group_id,
        "name": name,
        "parent_id": None,
        "group_type": "regular",
        "enforce_session": False,
        "session_limit": 28800,
        "session_timeouts": {},
        "my_memberships": [
            {
                "group_id": group_id,
                "identity_id": user.sub,
                "username": user.username,
                "role": "member",
                "status": "active",
            }
        ],
        "policies": {"group_visibility": "private", "group_members_visibility": "managers"},
    }
