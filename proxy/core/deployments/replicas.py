"""Starting and ending one replica: a pilot job with its own id and token.

The replica's row is written before the job is submitted, so a pilot that registers at once is
known, and a controller that dies mid-submission leaves a row the next leader ends. The token
reaches the pilot only through the staged configuration (written readable by the job's owner
only); the database keeps its SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from adaptors.deployments import DeploymentSpec
from adaptors.schedulers.contract import JobSpec, Scheduler, SchedulerError
from pilot.protocol import ModelConfig, PilotConfig
from proxy.metrics.prometheus import Metrics
from proxy.records.deployment_store import DeploymentStore, ReplicaRecord
from proxy.settings.on_demand import OnDemandSettings, SchedulerSettings

log = logging.getLogger(__name__)


def job_spec(entry: SchedulerSettings, spec: DeploymentSpec, staged_config: str) -> JobSpec:
    """The pilot job of one replica of `spec`, whose configuration was staged at `staged_config`."""
    return JobSpec(
        name=f"pilot-{spec.name}",
        command=(*entry.pilot_command, "--config", staged_config),
        walltime_seconds=spec.walltime_seconds,
        resources=spec.resources,
        environment=entry.environment,
    )


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class ConfiguredScheduler:
    settings: SchedulerSettings
    scheduler: Scheduler


@dataclass
class Parts:
    """What the controller's loops and the pilots' routes share."""

    settings: OnDemandSettings
    schedulers: dict[str, ConfiguredScheduler]
    store: DeploymentStore
    metrics: Metrics
    gateway_url: str
    gateway_subjects: tuple[str, ...]


async def start_replica(parts: Parts, spec: DeploymentSpec) -> ReplicaRecord:
    """Raises SchedulerError when the job could not be submitted (the row is then ended)."""
    configured = parts.schedulers[spec.scheduler]
    token = secrets.token_urlsafe(32)
    now = time.time()
    record = ReplicaRecord(
        replica_id=secrets.token_urlsafe(12),
        deployment=spec.name,
        cluster=spec.cluster,
        scheduler=spec.scheduler,
        job_id=None,
        phase="queued",
        token_hash=token_hash(token),
        created=now,
        detail="submitting",
    )
    await parts.store.add(record)
    parts.metrics.deployment_starts.labels(spec.name).inc()
    entry = configured.settings
    config = PilotConfig(
        replica_id=record.replica_id,
        gateway_url=parts.gateway_url,
        token=token,
        listen_host=entry.listen_host,
        advertise_host=entry.advertise_host,
        certificate=entry.pilot_certificate,
        key=entry.pilot_key,
        ca=entry.pilot_ca,
        gateway_subjects=parts.gateway_subjects,
        metrics_subjects=parts.settings.metrics_subjects,
        walltime_seconds=spec.walltime_seconds,
        heartbeat_seconds=parts.settings.heartbeat_seconds,
        models=(
            ModelConfig(name=spec.name, command=spec.model_command, port=0, health_path=spec.health_path),
        ),
    )
    try:
        path = await configured.scheduler.stage(
            config.model_dump_json().encode(), f"pilot-{record.replica_id}.json"
        )
        job = job_spec(entry, spec, path)
        record.job_id = await configured.scheduler.submit(job)
    except SchedulerError as exc:
        await parts.store.end(record.replica_id, f"submission failed: {exc.message}", time.time())
        raise
    except OSError as exc:
        await parts.store.end(record.replica_id, f"staging failed: {exc}", time.time())
        raise SchedulerError(f"staging failed: {exc}") from exc
    await parts.store.update(record.replica_id, job_id=record.job_id, detail="submitted")
    log.info(
        "deployment %s: replica %s submitted to %s as job %s",
        spec.name,
        record.replica_id,
        spec.scheduler,
        record.job_id,
    )
    return record


async def end_replica(parts: Parts, record: ReplicaRecord, reason: str) -> None:
    """Marked ended first (its heartbeats are answered `stop`), then its job is ended."""
    await parts.store.end(record.replica_id, reason, time.time())
    log.info("deployment %s: replica %s ended: %s", record.deployment, record.replica_id, reason)
    configured = parts.schedulers.get(record.scheduler)
    if configured is None or record.job_id is None:
        return
    try:
        await asyncio.wait_for(configured.scheduler.end(record.job_id), 120)
    except (SchedulerError, TimeoutError) as exc:
        log.warning("deployment %s: ending job %s failed: %s", record.deployment, record.job_id, exc)
