"""Who the fake Globus knows: users with their identities, the tokens it issued, and the scopes and
resource servers of the Globus services the gateway uses."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
# The Groups scope's id, as a dependent scope of the gateway's scope lists it (the existing gateway's
# setup guide creates the scope with this dependency).
GROUPS_SCOPE_ID = "73320ffe-4cb4-4b25-a0a3-83d53d59ce4f"
# globus_sdk.ComputeClientV2.scopes.all and .resource_server (globus-sdk 4.9): Compute breaks the usual
# convention, its resource server is a service name rather than a hostname or client id.
COMPUTE_RESOURCE_SERVER = "funcx_service"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
TRANSFER_RESOURCE_SERVER = "transfer.api.globus.org"
TRANSFER_SCOPE = "urn:globus:auth:scope:transfer.api.globus.org:all"
DEPENDENT_TOKEN_GRANT = "urn:globus:auth:grant_type:dependent_token"
CLIENT_CREDENTIALS_GRANT = "client_credentials"
ISSUER = "https://auth.globus.org"
CLIENT_USERNAME_DOMAIN = "clients.auth.globus.org"
# Identity provider of client (service) identities. Made up: the real id is not needed by the gateway.
CLIENTS_IDP = "6b2ed5ee-0d1e-4bd1-9d4e-1e1e4a4fd2c1"
# The public app (e.g. a CLI) that obtained users' tokens, unless a test says otherwise.
DEFAULT_APP_CLIENT_ID = "58fdd3bc-e1c3-4ce5-80ea-8d6b87cfb944"


def idp_id(domain: str) -> str:
    """A stable identity-provider id per username domain, so tests can name IdPs by domain."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"idp.{domain}"))


@dataclass
class FakeUser:
    """One Globus identity set behind a token."""

    sub: str
    username: str
    name: str
    identities: list[dict[str, Any]]
    session_idps: list[str]
    groups: list[str] = field(default_factory=list)

    @classmethod
    def single(
        cls, username: str, *, name: str | None = None, groups: list[str] | None = None, session: bool = True
    ) -> FakeUser:
        """The common case: one identity whose IdP is derived from the username domain, with a live session
        unless ``session=False``."""
        sub = str(uuid.uuid4())
        domain = username.rpartition("@")[2]
        display = name or username.partition("@")[0].title()
        identity = {
            "sub": sub,
            "username": username,
            "name": display,
            "email": username,
            "identity_provider": idp_id(domain),
            "identity_provider_display_name": domain,
            "organization": domain,
            "status": "used",
        }
        return cls(
            sub=sub,
            username=username,
            name=display,
            identities=[identity],
            session_idps=[idp_id(domain)] if session else [],
            groups=list(groups or []),
        )

    def primary(self) -> dict[str, Any]:
        """The identity matching ``sub`` (Globus's primary identity), else the first one."""
        return next((i for i in self.identities if i["sub"] == self.sub), self.identities[0])


@dataclass
class Token:
    """What the fake knows about one access token."""

    user: FakeUser
    active: bool
    scope: str
    exp: int
    iat: int
    policies: dict[str, bool]
    client_id: str
    is_service: bool
    extra: dict[str, Any]
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def service_user(client_id: str) -> FakeUser:
    """The identity behind a client-credentials token: the client itself, never a session."""
    username = f"{client_id}@{CLIENT_USERNAME_DOMAIN}"
    name = f"client {client_id[:8]}"
    identity = {
        "sub": client_id,
        "username": username,
        "name": name,
        "email": None,
        "identity_provider": CLIENTS_IDP,
        "identity_provider_display_name": "Globus Auth Clients",
        "organization": None,
        "status": "used",
    }
    return FakeUser(sub=client_id, username=username, name=name, identities=[identity], session_idps=[])
