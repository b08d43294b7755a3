"""The `database` section: how long the gateway waits on its database."""

from __future__ import annotations

from pydantic import Field

from proxy.settings.files import Strict

__all__ = ["DatabaseSettings"]


class DatabaseSettings(Strict):
    """How long the gateway waits on its database, and how it behaves while the database is away."""

    statement_timeout_seconds: float = Field(
        default=5, gt=0, description="any statement running longer is cancelled (PostgreSQL: lock waits too)"
    )
    connect_timeout_seconds: float = Field(
        default=5, gt=0, description="to open a connection (SQLite: how long a locked database is waited for)"
    )
    reconnect_seconds: float = Field(
        default=5, gt=0, description="while unreachable at start-up, how often the gateway tries again"
    )
