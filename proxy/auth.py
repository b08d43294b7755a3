"""Authentication: who is calling. Deny by default: every route needs a valid bearer token
unless it is explicitly listed as public."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.settings import ConfigError, describe_validation_error, load_document


@dataclass(frozen=True)
class User:
    id: str
    username: str
    name: str
    groups: frozenset[str] = field(default_factory=frozenset)
    idp_id: str = ""
    idp_name: str = ""
    auth_service: str = ""

    @property
    def domain(self) -> str:
        return self.username.rpartition("@")[2] if "@" in self.username else ""


USER = web.RequestKey("user", User)
AUTH_SECONDS = web.RequestKey("auth_seconds", float)

ClientAddress = Callable[[], str | None]
"""The client's address, asked only when a token must be checked remotely (not for cached ones)."""


class Authenticator(Protocol):
    async def authenticate(self, token: str, client: ClientAddress) -> User:
        """Return the token's user or raise ApiError (401; 429 when the client's address sent too
        many unknown tokens; 503 when the provider is down or busy)."""
        ...

    async def close(self) -> None: ...

    def instrument(self, metrics: Metrics) -> None:
        """Hands over the metrics the provider may report (cache hits, introspection time)."""
        ...


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_token", headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise unauthorized("Missing 'Authorization: Bearer <token>' header.")
    if scheme.lower() != "bearer":
        raise unauthorized("The Authorization header must use the Bearer scheme.")
    token = token.strip()
    if not token:
        raise unauthorized("The bearer token is empty.")
    if not token.isascii():  # aiohttp keeps bytes that are not UTF-8 as surrogates, which hashing refuses
        raise unauthorized("Invalid or expired access token.")
    return token


def auth_middleware(
    authenticator: Authenticator,
    public_routes: Collection[str],
    client_of: Callable[[web.Request], str | None],
) -> Middleware:
    """`client_of` names the client's address (the nearest untrusted hop, behind nginx)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        match_info = request.match_info
        if match_info.http_exception is None and match_info.route.name not in public_routes:
            started = time.monotonic()
            token = bearer_token(request)
            request[USER] = await authenticator.authenticate(token, lambda: client_of(request))
            request[AUTH_SECONDS] = time.monotonic() - started
        return await handler(request)

    return authenticate


class _StaticUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    username: str = Field(min_length=3, pattern=r"^[^@\s]+@[^@\s]+$")
    name: str = ""
    groups: list[str] = Field(default_factory=list)


class _StaticToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=8)
    user: _StaticUser


class _StaticTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[_StaticToken] = Field(min_length=1)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticAuthenticator:
    """Fixed tokens from a file, for local use and tests.

    Only digests are kept, and every digest is compared with `hmac.compare_digest` without an early
    exit, so neither memory nor timing gives a token away.
    """

    def __init__(self, users_by_digest: dict[bytes, User]) -> None:
        self._entries = list(users_by_digest.items())

    @classmethod
    def from_file(cls, path: Path) -> StaticAuthenticator:
        try:
            document = _StaticTokens.model_validate(load_document(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc
        users: dict[bytes, User] = {}
        for index, entry in enumerate(document.tokens, start=1):
            digest = _digest(entry.token)
            if digest in users:
                raise ConfigError(f"{path}, entry {index}: field 'token': the same token is listed twice")
            users[digest] = User(
                id=entry.user.id,
                username=entry.user.username,
                name=entry.user.name,
                groups=frozenset(entry.user.groups),
                idp_name=entry.user.username.rpartition("@")[2],
                auth_service="static",
            )
        return cls(users)

    async def authenticate(self, token: str, client: ClientAddress) -> User:
        """Comparing digests costs nothing remotely, so the client's address is not needed."""
        digest = _digest(token)
        found = None
        for candidate, user in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = user
        if found is None:
            raise unauthorized("Invalid or expired access token.")
        return found

    async def close(self) -> None:
        """Nothing to release: the tokens live in memory."""

    def instrument(self, metrics: Metrics) -> None:
        """Static tokens need no cache, so there is nothing to report."""
