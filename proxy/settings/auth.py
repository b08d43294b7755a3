"""The `auth` section: who may call the gateway, with fixed tokens or through Globus Auth."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from proxy.env_values import GroupsPerDomain, TextList
from proxy.settings.files import OptionalUrl, Strict

__all__ = ["AuthSettings", "GlobusAuthSettings", "StaticAuthSettings"]


class StaticAuthSettings(Strict):
    """Fixed tokens from a file: for development and tests, never production."""

    tokens_file: Path = Field(description="YAML list of tokens and their users, relative to this file")


class GlobusAuthSettings(Strict):
    """Globus Auth introspects every token (docs/globus.md)."""

    client_id: str = Field(
        min_length=1, description="the gateway's confidential client (GLOBUS_APPLICATION_ID)"
    )
    client_secret: str = Field(min_length=1, description="its secret (GLOBUS_APPLICATION_SECRET)")
    scope: str = Field(min_length=1, description="the gateway's scope, required in every token")
    authorized_idp_domains: TextList = Field(
        min_length=1, description="identity domains users may log in with, e.g. anl.gov,uchicago.edu"
    )
    policies: TextList = Field(
        default_factory=list, description="Globus Auth policy ids every session must satisfy (high assurance)"
    )
    groups: TextList = Field(
        default_factory=list, description="Globus group ids; if set, a user must be in one of them"
    )
    groups_per_idp: GroupsPerDomain = Field(
        default_factory=dict, description="domain → group ids a user of that domain must be in one of"
    )
    service_usernames: TextList = Field(
        default_factory=list, description="client-credential service accounts accepted as they are"
    )
    auth_url: OptionalUrl = Field(
        default=None, pattern=r"^https?://\S+$", description="Globus Auth's base URL (default: the real one)"
    )
    groups_url: OptionalUrl = Field(
        default=None, pattern=r"^https?://\S+$", description="Globus Groups' base URL (default: the real one)"
    )
    cache_seconds: float = Field(default=600, ge=0, description="how long a token's user is remembered")
    refusal_cache_seconds: float = Field(
        default=60, ge=0, description="how long a refused token is remembered"
    )
    cache_size: int = Field(default=100_000, ge=1, description="tokens remembered per process")
    threads: int = Field(default=8, ge=1, le=256, description="concurrent calls to Globus")
    timeout_seconds: float = Field(default=5, gt=0, description="per HTTP call to Globus")
    retries: int = Field(default=1, ge=0, le=5, description="per HTTP call to Globus")
    queue_size: int = Field(default=64, ge=0, description="Globus calls waiting for a thread; beyond, 503")
    queue_wait_seconds: float = Field(default=5, gt=0, description="longest wait for a thread, then 503")
    unseen_tokens_per_minute: float = Field(
        default=30, ge=0, description="per client address without a recent login; 0: no limit"
    )
    unseen_tokens_burst: int = Field(default=20, ge=1, description="unseen tokens at once per client address")
    refused_tokens_per_minute: float = Field(default=6, ge=0, description="per client address; 0: no limit")
    refused_tokens_burst: int = Field(
        default=10, ge=1, description="refused tokens at once per client address"
    )
    verify_policies_at_startup: bool = Field(
        default=True, description="read `policies` from Globus at start-up and stop if they do not match"
    )


class AuthSettings(Strict):
    """Who may call the gateway."""

    provider: Literal["static", "globus"] = Field(default="static", description="which section below is used")
    static: StaticAuthSettings | None = Field(default=None, description="Used when auth.provider is static.")
    globus: GlobusAuthSettings | None = Field(default=None, description="Used when auth.provider is globus.")
