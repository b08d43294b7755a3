"""The `batches` and `tasks` sections: work a client submits now and collects later."""

from __future__ import annotations

from pydantic import Field

from proxy.settings.files import Strict

__all__ = ["BatchSettings", "TaskSettings"]


class BatchSettings(Strict):
    """The batch API (`/v1/batches`)."""

    max_active_per_user: int = Field(default=2, ge=1, description="unfinished batches per user")
    poll_seconds: float = Field(default=30, gt=0, description="how often unfinished batches are advanced")


class TaskSettings(Strict):
    """Asynchronous tasks (`/{cluster}/{framework}/process`): whose each task is, kept in memory."""

    max_remembered: int = Field(default=100_000, ge=1, description="the oldest are forgotten beyond this")
    lifetime_seconds: float = Field(default=24 * 3600, gt=0, description="how long a result may be read")
