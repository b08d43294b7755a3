"""The `static` auth provider: fixed tokens from a file, for local use and tests (the embedded
default)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.core.identity import ClientAddress, User, unauthorized
from proxy.metrics.prometheus import Metrics
from proxy.settings.files import ConfigError, describe_validation_error, load_document


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
