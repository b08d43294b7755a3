"""Who is calling: the user a token stands for, and what authenticates tokens. Every layer above
the records needs to know the user; none of them needs the middleware that finds it (proxy/edge/
authentication.py), so they import this leaf instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from proxy.errors import ApiError
from proxy.metrics.prometheus import Metrics


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
