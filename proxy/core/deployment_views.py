"""How on-demand deployments (adaptors/deployment.py) show in the gateway's lists: each one's phase,
ready replicas and ETA, read from the controller's memory through its endpoint.

`/{cluster}/jobs` lists a deployment as a job of its cluster, whatever the cluster's own adaptor
reports (a qstat function does not know pilot jobs; `DeploymentCluster` reports nothing of its
own); where the report already lists the model, the report stands. Where a job goes follows the
existing gateway's qstat function: a job that runs is `running` (its `Model Status` `starting`
until the model serves), a queued one `queued`. An idle deployment, which the next request
starts, is `stopped`; one backing off or not deployed here is in `others`. `/v1/models` and
`list-endpoints` list a deployment's model whatever its state, with the state in an extra field;
every other field keeps the existing gateway's shape.
"""

from __future__ import annotations

import math
from typing import Any

from adaptors import BaseCluster, BaseEndpoint, JobInfo, Jobs
from adaptors.deployment import DeploymentEndpoint
from adaptors.deployments import Phase
from proxy.core.jobs import job_models
from proxy.core.registry import Registry

_PLACES = {
    Phase.idle: ("stopped", "idle"),
    Phase.queued: ("queued", "queued"),
    Phase.starting: ("running", "starting"),
    Phase.loading: ("running", "starting"),
    Phase.ready: ("running", "running"),
    Phase.backing_off: ("others", "backing_off"),
    Phase.unavailable: ("others", "unavailable"),
}
"""phase → (the jobs list, `Model Status`)"""


def deployment_state(endpoint: BaseEndpoint) -> dict[str, Any] | None:
    """The deployment an endpoint serves and its state; None for any other endpoint."""
    if not isinstance(endpoint, DeploymentEndpoint):
        return None
    progress = endpoint.progress()
    eta = progress.eta_seconds
    return {
        "name": endpoint.spec.name,
        "phase": progress.phase.value,
        "ready_replicas": progress.ready_replicas,
        "eta_seconds": None if eta is None else max(0, math.ceil(eta)),
        "detail": progress.detail,
    }


def with_deployments(jobs: Jobs, cluster: BaseCluster, registry: Registry) -> Jobs:
    """The report with the cluster's deployments it does not list itself."""
    listed = {
        (job.Framework, model)
        for name in ("running", "queued", "stopped", "others")
        for job in getattr(jobs, name)
        for model in job_models(job)
    }
    added: dict[str, list[JobInfo]] = {}
    for endpoint in registry.endpoints.values():
        if endpoint.cluster != cluster.cluster_name or (endpoint.framework, endpoint.model) in listed:
            continue
        state = deployment_state(endpoint)
        if state is None:
            continue
        place, status = _PLACES[Phase(state["phase"])]
        if state["ready_replicas"] > 0:
            place, status = "running", "running"
        job = {
            "Models": endpoint.model,
            "Framework": endpoint.framework,
            "Cluster": cluster.cluster_name,
            "Model Status": status,
            "Deployment": state["name"],
            "Deployment Phase": state["phase"],
            "Ready Replicas": state["ready_replicas"],
            "ETA Seconds": state["eta_seconds"],
        }
        added.setdefault(place, []).append(JobInfo.model_validate(job))
    if not added:
        return jobs
    return jobs.model_copy(update={name: [*getattr(jobs, name), *more] for name, more in added.items()})
