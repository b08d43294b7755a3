"""The `dashboard` section of the main file: the usage dashboard (proxy/dashboard, docs/dashboard.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from proxy.env_values import TextList, empty_is_none
from proxy.settings.files import Strict

MIN_SECRET = 32


class DashboardSettings(Strict):
    """The usage dashboard behind a login (docs/dashboard.md). Off unless `enabled`."""

    enabled: bool = Field(default=False, description="serve the dashboard")
    path: str = Field(
        default="/dashboard",
        pattern=r"^(/[A-Za-z0-9_.-]+)+$",
        description="where it is served on the gateway's port (outside server.base_path)",
    )
    admin_groups: TextList = Field(
        default_factory=list,
        description="groups whose members may log in (Globus group ids, or the static tokens' groups)",
    )
    session_secret: Annotated[str | None, BeforeValidator(empty_is_none)] = Field(
        default=None,
        description=f"signs the session cookie; at least {MIN_SECRET} characters, the same in every process",
    )
    session_hours: float = Field(default=8, gt=0, le=24 * 30, description="how long a login lasts")
    cookie_secure: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="the cookie's Secure flag; auto: when the request came over TLS"
        " (behind nginx: its X-Forwarded-Proto)",
    )
    cookie_samesite: Literal["Lax", "Strict"] = Field(
        default="Lax", description="the session cookie's SameSite (Lax lets a link from e-mail open it)"
    )
    public_url: Annotated[str | None, BeforeValidator(empty_is_none)] = Field(
        default=None,
        pattern=r"^https?://[^/\s]+$",
        description="scheme://host[:port] browsers reach the gateway at, for the Globus redirect URI"
        " (default: from the request)",
    )
    rollup_delay_seconds: float = Field(
        default=7200,
        ge=0,
        description="hours older than this are summed into the rollup tables; newer records are read raw",
    )

    @model_validator(mode="after")
    def _usable(self) -> DashboardSettings:
        if not self.enabled:
            return self
        if not self.admin_groups:
            raise ValueError("admin_groups: required when the dashboard is enabled")
        if self.session_secret is None or len(self.session_secret) < MIN_SECRET:
            raise ValueError(
                f"session_secret: at least {MIN_SECRET} characters when the dashboard is enabled"
            )
        return self
