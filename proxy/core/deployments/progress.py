"""What users are told about a deployment without a ready replica: its phase and an ETA.

The ETA is the deployment's measured start duration (median of its latest starts, submission to
ready), else the spec's `expected_start_seconds`, minus the time the most advanced replica has
already spent; a scheduler that says when a queued job will start can only push it later.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from adaptors.deployments import DeploymentSpec, Phase, Progress
from proxy.records.deployment_store import Backoff, ReplicaRecord

_ORDER = {"loading": 2, "starting": 1, "queued": 0}
_DETAIL = {
    "queued": "queued in the scheduler",
    "starting": "the pilot job is starting",
    "loading": "loading the model",
}
MIN_ETA_SECONDS = 1.0


def expected_start(spec: DeploymentSpec, durations: Sequence[float]) -> float:
    return statistics.median(durations) if durations else spec.expected_start_seconds


def progress_of(
    spec: DeploymentSpec,
    replicas: Sequence[ReplicaRecord],
    backoff: Backoff | None,
    durations: Sequence[float],
    now: float,
) -> Progress:
    """`replicas` are the deployment's live ones."""
    ready = [replica for replica in replicas if replica.phase == "ready"]
    if ready:
        return Progress(Phase.ready, 0.0, f"{len(ready)} ready", len(ready))
    expected = expected_start(spec, durations)
    pending = [r for r in replicas if r.phase in _ORDER and not r.stop_requested]
    if pending:
        best = max(pending, key=lambda r: (_ORDER[r.phase], -r.created))
        eta = expected - (now - best.created)
        if best.phase == "queued" and best.estimated_start is not None:
            eta = max(eta, best.estimated_start - now)
        return Progress(Phase(best.phase), max(eta, MIN_ETA_SECONDS), _DETAIL[best.phase])
    if backoff is not None and backoff.retry_at > now:
        wait = backoff.retry_at - now
        detail = f"{backoff.failures} failed starts ({backoff.detail}); next attempt in {wait:.0f} s"
        return Progress(Phase.backing_off, wait + expected, detail)
    return Progress(Phase.idle, expected, "no replica; a request starts one")
