"""Refining a cluster's job report with what Globus Compute knows about each model's endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from adaptors.cluster import JobInfo, Jobs

MODEL_STATUS = "Model Status"
StatusReader = Callable[[], Awaitable[dict[str, Any] | None]]


async def mark_disconnected(jobs: Jobs, status_reader: Callable[[JobInfo], StatusReader | None]) -> None:
    """A model the qstat function reports as running, whose Compute endpoint has no managers (its
    workers or node were lost) or cannot be asked, is shown as `disconnected`, as the existing
    gateway shows it: its requests would wait for workers that are gone. `status_reader` gives the
    endpoint status call of a job's model, or None when no Compute endpoint serves it here."""
    checked: list[tuple[JobInfo, Awaitable[dict[str, Any] | None]]] = []
    for job in jobs.running:
        reader = status_reader(job) if (job.model_extra or {}).get(MODEL_STATUS) == "running" else None
        if reader is not None:
            checked.append((job, reader()))
    statuses = await asyncio.gather(*(status for _, status in checked))
    for (job, _), status in zip(checked, statuses, strict=True):
        if _managers(status) == 0:
            setattr(job, MODEL_STATUS, "disconnected")


def _managers(status: dict[str, Any] | None) -> int:
    details = (status or {}).get("details")
    managers = details.get("managers", 0) if isinstance(details, dict) else 0
    try:
        return int(managers)
    except (TypeError, ValueError):
        return 0
