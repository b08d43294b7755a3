"""What the clusters report (their `/jobs` documents, through the gateway's shared cache, so the
dashboard asks a cluster no more often than `/jobs` does): models running and queued per cluster on
the live page, and the clusters' private batch jobs, the second kind of batch, on the batches page."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Final

from adaptors.cluster import GetJobsResponse, JobInfo
from proxy.core.jobs import JobsCache, job_models
from proxy.core.registry import Registry
from proxy.dashboard.queries import Table, table

WAIT_SECONDS: Final = 3.0
"""A cluster slower than this is shown as not answering; its report still lands in the cache."""


async def reports(registry: Registry, cache: JobsCache) -> dict[str, GetJobsResponse | None]:
    names = sorted(registry.clusters)

    async def one(name: str) -> GetJobsResponse | None:
        try:
            return await asyncio.wait_for(cache.get(registry.clusters[name]), WAIT_SECONDS)
        except (TimeoutError, KeyError):
            return None

    return dict(zip(names, await asyncio.gather(*(one(name) for name in names)), strict=True))


def _problem(report: GetJobsResponse | None) -> str:
    if report is None:
        return "no answer"
    if report.jobs is None or report.error_code is not None:
        return report.error_message or "failed"
    return ""


def model_jobs(found: dict[str, GetJobsResponse | None]) -> Table:
    """Per cluster and model: jobs running and queued on the cluster; a cluster that did not report
    has one row saying why."""
    rows: list[list[Any]] = []
    for cluster, report in found.items():
        problem = _problem(report)
        if problem or report is None or report.jobs is None:
            rows.append([cluster, "", "", None, None, problem])
            continue
        running: Counter[tuple[str, str]] = Counter()
        queued: Counter[tuple[str, str]] = Counter()
        for counter, jobs in ((running, report.jobs.running), (queued, report.jobs.queued)):
            for job in jobs:
                for model in job_models(job):
                    counter[(job.Framework, model)] += 1
        for framework, model in sorted(set(running) | set(queued)):
            rows.append(
                [cluster, framework, model, running[(framework, model)], queued[(framework, model)], ""]
            )
    return table(("cluster", "framework", "model", "jobs_running", "jobs_queued", "problem"), rows)


def private_batches(found: dict[str, GetJobsResponse | None]) -> Table:
    """The clusters' private batch jobs (`private_batch_running`, `private_batch_queued`)."""
    rows: list[list[Any]] = []
    for cluster, report in found.items():
        if report is None or report.jobs is None:
            continue
        for state, jobs in (
            ("running", report.jobs.private_batch_running),
            ("queued", report.jobs.private_batch_queued),
        ):
            rows.extend(_batch_job(cluster, state, job) for job in jobs)
    return table(("cluster", "state", "job_id", "framework", "models", "model_status"), rows)


def _batch_job(cluster: str, state: str, job: JobInfo) -> list[Any]:
    extra = job.model_extra or {}
    return [
        cluster,
        state,
        str(extra.get("Job ID", "")),
        job.Framework,
        job.Models,
        str(extra.get("Model Status", "")),
    ]
