"""A local fake of the Globus Transfer API's directory and access-rule operations on guest
collections, faithful at the HTTP boundary, so that globus-sdk's real `TransferClient` can be
pointed at it (``TransferClient(base_url=fake.url, authorizer=...)``).

Served, with the paths and bodies globus-sdk 4.9 sends:

- ``POST /v0.10/operation/endpoint/{id}/mkdir`` ``{"DATA_TYPE": "mkdir", "path"}`` → 202
  ``{"DATA_TYPE": "mkdir_result", "code": "DirectoryCreated", ...}`` (globus_sdk.testing's example);
  an existing path → 502 ``ExternalError.MkdirFailed.Exists``, a missing parent → 502
  ``ExternalError.MkdirFailed.NotFound`` (the codes clients of the real service test for; the
  status 502 is how Transfer reports a failure of the collection's server).
- ``GET /v0.10/endpoint/{id}/access_list`` → ``{"DATA_TYPE": "access_list", "endpoint", "DATA": [rule]}``
  with rules ``{DATA_TYPE: "access", id, principal_type, principal, path, permissions, role_id,
  role_type, create_time, notify_email, expiration_date}``.
- ``POST /v0.10/endpoint/{id}/access`` → 201 ``{"DATA_TYPE": "access_create_result", "code": "Created",
  "access_id", "message": "Access rule created successfully.", ...}``; a rule for the same principal
  and path → 409 ``Exists``.
- ``PUT /v0.10/endpoint/{id}/access/{rule_id}`` → 200 ``{"DATA_TYPE": "result", "code": "Updated"}``.

Errors are ``{"code", "message", "request_id", "resource"}``, which globus-sdk reads into
``TransferAPIError.code`` / ``.message``. Access rules need a directory path (ending in ``/``);
only the collection's access manager (``manager``, a client id) may change them; rule ids are UUIDs
as on Globus Connect Server v5 guest collections. Assumed (the service is closed source): the exact
messages, and the codes for a missing parent directory and for a caller who is not the manager.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeCollection:
    collection_id: str
    manager: str
    """the client id whose tokens may create directories and rules"""
    directories: set[str] = field(default_factory=lambda: {"/"})
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)


COLLECTION = web.RequestKey("collection", FakeCollection)
"""The collection a request names, found by the middleware for the route."""


class FakeTransfer:
    def __init__(self, *, token_owner: Callable[[str], str | None]) -> None:
        """``token_owner`` maps a bearer token to the client id it was issued to (None: invalid)."""
        self.token_owner = token_owner
        self.collections: dict[str, FakeCollection] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_status: int | None = None
        self.delay = 0.0
        self._runner: web.AppRunner | None = None
        self._port = 0

    def add_collection(self, collection_id: str, manager: str, *directories: str) -> FakeCollection:
        collection = FakeCollection(collection_id, manager, {"/", *directories})
        self.collections[collection_id] = collection
        return collection

    def count(self, method: str, path_suffix: str) -> int:
        return sum(1 for m, path in self.requests if m == method and path.endswith(path_suffix))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/"

    async def __aenter__(self) -> FakeTransfer:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v0.10/operation/endpoint/{collection}/mkdir", self._mkdir)
        app.router.add_get("/v0.10/endpoint/{collection}/access_list", self._access_list)
        app.router.add_post("/v0.10/endpoint/{collection}/access", self._add_rule)
        app.router.add_put("/v0.10/endpoint/{collection}/access/{rule_id}", self._update_rule)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status is not None:
            return _error(request, self.fail_status, "ServiceUnavailable", "fake Transfer set to fail")
        header = request.headers.get("Authorization", "")
        client = self.token_owner(header[7:]) if header.startswith("Bearer ") else None
        if client is None:
            return _error(request, 401, "AuthenticationFailed", "Token is not active")
        collection = self.collections.get(request.match_info.get("collection", ""))
        if collection is None:
            return _error(request, 404, "EndpointNotFound", "No such endpoint")
        if client != collection.manager:
            return _error(request, 403, "PermissionDenied", "You do not have permission on this endpoint")
        request[COLLECTION] = collection
        return await handler(request)

    async def _mkdir(self, request: web.Request) -> web.Response:
        collection: FakeCollection = request[COLLECTION]
        body = await request.json()
        if body.get("DATA_TYPE") != "mkdir" or not isinstance(body.get("path"), str):
            return _error(request, 400, "ClientError.BadRequest", "mkdir needs DATA_TYPE and path")
        path = body["path"].rstrip("/") + "/"
        parent = path.rstrip("/").rsplit("/", 1)[0] + "/"
        if path in collection.directories:
            return _error(request, 502, "ExternalError.MkdirFailed.Exists", f"Path already exists, {path}")
        if parent not in collection.directories:
            return _error(request, 502, "ExternalError.MkdirFailed.NotFound", f"No such directory, {parent}")
        collection.directories.add(path)
        return web.json_response(
            {
                "DATA_TYPE": "mkdir_result",
                "code": "DirectoryCreated",
                "message": "The directory was created successfully",
                "request_id": secrets.token_urlsafe(6),
                "resource": request.path,
            },
            status=202,
        )

    async def _access_list(self, request: web.Request) -> web.Response:
        collection: FakeCollection = request[COLLECTION]
        rules = list(collection.rules.values())
        return web.json_response(
            {
                "DATA_TYPE": "access_list",
                "endpoint": collection.collection_id,
                "DATA": rules,
                "length": len(rules),
            }
        )

    async def _add_rule(self, request: web.Request) -> web.Response:
        collection: FakeCollection = request[COLLECTION]
        body = await request.json()
        problem = _rule_problem(body)
        if problem is not None:
            return _error(request, 400, "InvalidRequest", problem)
        for rule in collection.rules.values():
            if (rule["principal"], rule["path"]) == (body["principal"], body["path"]):
                return _error(request, 409, "Exists", "A rule with this principal and path already exists")
        rule_id = str(uuid.uuid4())
        collection.rules[rule_id] = {
            "DATA_TYPE": "access",
            "id": rule_id,
            "principal_type": body["principal_type"],
            "principal": body["principal"],
            "path": body["path"],
            "permissions": body["permissions"],
            "role_id": None,
            "role_type": None,
            "notify_email": None,
            "expiration_date": None,
            "create_time": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        return web.json_response(
            {
                "DATA_TYPE": "access_create_result",
                "code": "Created",
                "resource": request.path,
                "request_id": secrets.token_urlsafe(6),
                "access_id": rule_id,
                "message": "Access rule created successfully.",
            },
            status=201,
        )

    async def _update_rule(self, request: web.Request) -> web.Response:
        collection: FakeCollection = request[COLLECTION]
        rule = collection.rules.get(request.match_info["rule_id"])
        if rule is None:
            return _error(request, 404, "AccessRuleNotFound", "No such access rule")
        body = await request.json()
        if body.get("permissions") not in ("r", "rw"):
            return _error(request, 400, "InvalidRequest", "permissions must be r or rw")
        rule["permissions"] = body["permissions"]
        return web.json_response(
            {
                "DATA_TYPE": "result",
                "code": "Updated",
                "message": "Access rule updated successfully",
                "resource": request.path,
            }
        )


def _rule_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or body.get("DATA_TYPE") != "access":
        return "DATA_TYPE must be access"
    if body.get("principal_type") not in ("identity", "group", "all_authenticated_users", "anonymous"):
        return "invalid principal_type"
    if not isinstance(body.get("principal"), str) or not isinstance(body.get("path"), str):
        return "principal and path are required"
    if not body["path"].startswith("/") or not body["path"].endswith("/"):
        return "path must be an absolute directory path ending in '/'"
    if body.get("permissions") not in ("r", "rw"):
        return "permissions must be r or rw"
    return None


def _error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "request_id": secrets.token_urlsafe(6),
        "resource": request.path,
    }
    return web.json_response(body, status=status)
