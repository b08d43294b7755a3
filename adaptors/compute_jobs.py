"""Refining a cluster's job report with what Globus Compute knows about each model's endpoint.

The cluster's qstat function knows the jobs; the endpoint adaptors know their Compute endpoints'
status (and cache it). `EndpointStatuses`, shared in the gateway (`AdaptorContext.shared`), lets the
cluster ask the endpoint adaptor serving a job's model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from adaptors.cluster import JobInfo, Jobs

MODEL_STATUS = "Model Status"
StatusReader = Callable[[], Awaitable[dict[str, Any] | None]]
Served = tuple[str, str, str]
"""(cluster, framework, model)"""


class EndpointStatuses:
    """The status reader of each started endpoint adaptor, by what it serves. A reload's new
    adaptor takes the place of the old one, which then leaves without removing it."""

    def __init__(self) -> None:
        self._readers: dict[Served, StatusReader] = {}

    def serve(self, served: Served, reader: StatusReader) -> None:
        self._readers[served] = reader

    def leave(self, served: Served, reader: StatusReader) -> None:
        if self._readers.get(served) == reader:
            del self._readers[served]

    def reader(self, job: JobInfo, cluster_name: str) -> StatusReader | None:
        """The existing gateway looks up a job's first model."""
        model = job.Models.split(",")[0].strip()
        return self._readers.get((cluster_name, job.Framework, model))


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
