"""Cluster job reports: fetched once per TTL per cluster, then filtered for each caller."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from adaptors import BaseCluster, GetJobsResponse, JobInfo, Jobs
from adaptors.context import ClusterJobs
from proxy.core import contract
from proxy.core.authz import may_use
from proxy.core.identity import User
from proxy.core.lookup import endpoint_named
from proxy.core.registry import Registry

_JOB_LISTS = ("running", "queued", "stopped", "others", "private_batch_running", "private_batch_queued")


MAX_REPORTS = 10_000
"""Reports kept at once: adaptors whose `get_jobs` takes the user have one per user."""
FAILURE_TTL_SECONDS = 10.0
"""A failing cluster is asked again soon, but not by every request (a qstat is a remote task)."""


class JobsCache:
    """Caches reports (failures briefly); concurrent callers share one in-flight `get_jobs`."""

    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = ttl_seconds
        self._reports: dict[str, tuple[float, GetJobsResponse]] = {}
        """cluster name → (expires at, report)"""
        self._pending: dict[str, asyncio.Task[GetJobsResponse]] = {}

    def cached(self, cluster: BaseCluster, user: User | None = None) -> GetJobsResponse | None:
        """The unexpired report, without a coroutine: federated routing reads several per request."""
        cached = self._reports.get(_key(cluster, user))
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        return None

    def clear(self) -> None:
        """After a reload: a cluster of the same name may now be a different one."""
        self._reports.clear()

    async def get(self, cluster: BaseCluster, user: User | None = None) -> GetJobsResponse:
        """`user` reaches adaptors whose `get_jobs` takes one; their reports are cached per user."""
        name = _key(cluster, user)
        cached = self.cached(cluster, user)
        if cached is not None:
            return cached
        task = self._pending.get(name)
        if task is None:
            task = asyncio.ensure_future(contract.get_jobs(cluster, user))
            self._pending[name] = task
            task.add_done_callback(lambda _: self._pending.pop(name, None))
        report = await asyncio.shield(task)
        failed = report.jobs is None or report.error_code is not None
        ttl = min(self._ttl, FAILURE_TTL_SECONDS) if failed else self._ttl
        if len(self._reports) >= MAX_REPORTS:
            now = time.monotonic()
            self._reports = {k: v for k, v in self._reports.items() if v[0] > now}
            if len(self._reports) >= MAX_REPORTS:
                self._reports.clear()
        self._reports[name] = (time.monotonic() + ttl, report)
        return report


def _key(cluster: BaseCluster, user: User | None) -> str:
    if user is None or not contract.wants_user(cluster):
        return cluster.cluster_name
    return f"{cluster.cluster_name}\0{user.id}"


def jobs_reader(registry: Registry, cache: JobsCache) -> ClusterJobs:
    """What adaptors get as `AdaptorContext.jobs`: the current generation's cluster, through the cache."""

    async def read(cluster_name: str) -> GetJobsResponse | None:
        cluster = registry.clusters.get(cluster_name)
        return None if cluster is None else await cache.get(cluster)

    return read


def visible_jobs(jobs: Jobs, user: User, registry: Registry, cluster: BaseCluster) -> Jobs:
    """Keep only the models the caller may use; a job listing several models keeps the visible ones."""
    visible: dict[str, list[JobInfo]] = {}
    for list_name in _JOB_LISTS:
        kept = []
        for job in getattr(jobs, list_name):
            shown = [m for m in job_models(job) if _may_see(user, registry, cluster, job.Framework, m)]
            if shown:
                kept.append(JobInfo.model_validate({**job.model_dump(), "Models": ",".join(shown)}))
        visible[list_name] = kept
    return Jobs(**visible, cluster_status=_visible_status(jobs.cluster_status, visible))


def _visible_status(status: dict[str, Any], visible: dict[str, list[JobInfo]]) -> dict[str, Any]:
    """Counts of models (`total_models`, `live_models`, ...) would count the hidden ones too: those
    the gateway knows are counted again from what the caller sees, other `*_models` fields are
    dropped. The rest (free nodes, the cluster's name) is the cluster's and stays."""

    def count(*lists: str) -> int:
        return len(
            {(job.Framework, model) for name in lists for job in visible[name] for model in job_models(job)}
        )

    recounted = {
        "total_models": lambda: count(*_JOB_LISTS),
        "live_models": lambda: count("running"),
        "stopped_models": lambda: count("stopped"),
    }
    shown: dict[str, Any] = {}
    for key, value in status.items():
        if key in recounted:
            shown[key] = recounted[key]()
        elif not key.endswith("_models"):
            shown[key] = value
    return shown


def job_models(job: JobInfo) -> list[str]:
    """A job may serve several models, listed with commas."""
    return [model.strip() for model in job.Models.split(",") if model.strip()]


def _may_see(user: User, registry: Registry, cluster: BaseCluster, framework: str, model: str) -> bool:
    """A job's model whose name only shares its slug with an endpoint's is not that endpoint's."""
    endpoint = endpoint_named(registry, cluster.cluster_name, framework, model)
    return endpoint is not None and may_use(user, endpoint, cluster)
