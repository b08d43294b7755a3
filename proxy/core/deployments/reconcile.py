"""The leader's reconcile loop: one pass compares what is declared and asked for with the
replicas the database holds, and starts or ends pilot jobs to match.

Only the holder of the controller lease runs a pass, so with several processes or hosts one
decides. A new leader (after a restart) adopts the live replicas it finds: they keep heartbeating
and stay routable; those of a deployment no longer declared are ended once it has stayed
undeclared for a while (a reload withdraws and re-declares).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from adaptors.deployments import DeploymentSpec
from adaptors.schedulers.contract import JobState, SchedulerError
from proxy.core.deployments.replicas import Parts, end_replica, start_replica
from proxy.records.deployment_store import LIVE_PHASES, Backoff, ReplicaRecord, Usage

log = logging.getLogger(__name__)

KEPT_SECONDS = 7 * 86400.0
"""Ended replicas (their start durations) and silent processes' usage are kept this long."""
UNSUBMITTED_GRACE_SECONDS = 120.0
"""A replica row without a job this long after it was written: its controller died submitting."""
ENDING_WAIT_SECONDS = 30.0
"""How long a stopping gateway waits for the jobs it is ending, all of them together."""
WALLTIME_MARGIN_SECONDS = 60.0
"""A retiring replica is ended this long before the scheduler would kill it, replaced or not (or a
quarter of `replace_before_walltime_seconds`, if that is less)."""


class Reconciler:
    def __init__(
        self,
        parts: Parts,
        specs: Callable[[], dict[str, DeploymentSpec]],
        local_usage: Callable[[], dict[str, Usage]],
        owner: str,
    ) -> None:
        self.parts = parts
        self._specs = specs
        self._local_usage = local_usage
        self.owner = owner
        self.leader = False
        self._running_since: dict[str, float] = {}
        self._undeclared_since: dict[str, float] = {}
        self._ending: dict[str, asyncio.Task[None]] = {}

    async def run_once(self) -> bool:
        """One pass; whether anything changed (the caller then refreshes the routing maps)."""
        settings, store, now = self.parts.settings, self.parts.store, time.time()
        self.leader = await store.lease(self.owner, now + settings.lease_seconds, now)
        if not self.leader:
            return False
        replicas = await store.live()
        changed = await self._follow_jobs(replicas, now)
        await store.prune(now - KEPT_SECONDS)
        replicas = [r for r in await store.live() if r.replica_id not in self._ending]
        usage = self._usage(await store.usage(now - 3 * settings.usage_report_seconds))
        backoffs = await store.backoffs()
        by_name: dict[str, list[ReplicaRecord]] = defaultdict(list)
        for replica in replicas:
            by_name[replica.deployment].append(replica)
        specs = self._specs()
        for name, records in by_name.items():
            if name not in specs:
                changed |= self._orphaned(name, records, now)
        for name, spec in specs.items():
            self._undeclared_since.pop(name, None)
            changed |= await self._reconcile(
                spec, by_name.get(name, []), usage.get(name), backoffs.get(name), now
            )
        self._measure(by_name)
        return changed

    async def resign(self) -> None:
        """On the gateway's stop: the jobs being ended get `ENDING_WAIT_SECONDS` between them, not
        each, so that a supervisor's stop timeout is not spent on them. Their replicas are marked
        ended first: a job still running stops when its pilot next heartbeats, or at its walltime."""
        ending = set(self._ending.values())
        if ending:
            _, left = await asyncio.wait(ending, timeout=ENDING_WAIT_SECONDS)
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left, timeout=1)  # their cancellation runs, however long `end` was to take
                log.warning(
                    "deployments: %d jobs still ending after %.0f s, left to their pilots",
                    len(left),
                    ENDING_WAIT_SECONDS,
                )
        if self.leader:
            await self.parts.store.release(self.owner)
            self.leader = False

    def _usage(self, reported: dict[str, Usage]) -> dict[str, Usage]:
        """The database's sums with this process's own current values, which may be newer."""
        merged = dict(reported)
        for name, local in self._local_usage().items():
            other = merged.get(name, Usage())
            merged[name] = Usage(
                max(other.in_flight, local.in_flight),
                max(filter(None, (other.last_used, local.last_used)), default=None),
                max(filter(None, (other.wanted, local.wanted)), default=None),
            )
        return merged

    async def _follow_jobs(self, replicas: list[ReplicaRecord], now: float) -> bool:
        """Scheduler states and pilot silence move replicas on or end them."""
        changed = False
        by_scheduler: dict[str, list[ReplicaRecord]] = defaultdict(list)
        for replica in replicas:
            if replica.job_id is not None and replica.replica_id not in self._ending:
                by_scheduler[replica.scheduler].append(replica)
        for name, group in by_scheduler.items():
            configured = self.parts.schedulers.get(name)
            if configured is None:
                continue
            try:
                states = await configured.scheduler.states([r.job_id for r in group if r.job_id])
            except SchedulerError as exc:
                log.warning("scheduler %s: job states unavailable: %s", name, exc.message)
                continue
            for replica in group:
                status = states.get(replica.job_id or "")
                if status is None or status.state is JobState.unknown:
                    continue
                if status.state is JobState.ended:
                    await self._end(replica, f"the job ended: {status.detail}", failed=True)
                    changed = True
                elif status.state is JobState.queued:
                    await self.parts.store.update(
                        replica.replica_id, estimated_start=status.estimated_start, detail=status.detail[:500]
                    )
                elif replica.phase == "queued":
                    await self.parts.store.update(
                        replica.replica_id, phase="starting", detail=status.detail[:500]
                    )
                    self._running_since.setdefault(replica.replica_id, now)
                    changed = True
                else:
                    self._running_since.setdefault(replica.replica_id, now)
        for replica in replicas:
            if replica.replica_id in self._ending:
                continue
            reason = self._unhealthy(replica, now)
            if reason is not None:
                await self._end(replica, reason, failed=True)
                changed = True
        return changed

    def _unhealthy(self, replica: ReplicaRecord, now: float) -> str | None:
        settings = self.parts.settings
        if replica.stop_requested:
            return replica.detail or "stop requested"
        if (
            replica.last_heartbeat is not None
            and now - replica.last_heartbeat > settings.heartbeat_timeout_seconds
        ):
            return f"no heartbeat for {now - replica.last_heartbeat:.0f} s"
        running = self._running_since.get(replica.replica_id)
        if (
            replica.phase == "starting"
            and running is not None
            and now - running > settings.register_timeout_seconds
        ):
            return f"the pilot did not register within {settings.register_timeout_seconds:g} s"
        if replica.job_id is None and now - replica.created > UNSUBMITTED_GRACE_SECONDS:
            return "never submitted"
        return None

    def _orphaned(self, name: str, records: list[ReplicaRecord], now: float) -> bool:
        since = self._undeclared_since.setdefault(name, now)
        if now - since < self.parts.settings.undeclared_grace_seconds:
            return False
        for replica in records:
            self._end_soon(replica, f"deployment {name!r} is no longer declared")
        return True

    async def _reconcile(
        self,
        spec: DeploymentSpec,
        replicas: list[ReplicaRecord],
        usage: Usage | None,
        backoff: Backoff | None,
        now: float,
    ) -> bool:
        usage = usage or Usage()
        margin = self.parts.settings.replace_before_walltime_seconds
        retiring = [r for r in replicas if r.walltime_end is not None and r.walltime_end - now < margin]
        active = [r for r in replicas if r not in retiring]
        ready = [r for r in active if r.phase == "ready"]
        pending = [r for r in active if r.phase != "ready"]
        if ready and backoff is not None:
            await self.parts.store.set_backoff(spec.name, None)
            backoff = None
        changed = False
        last_moment = min(WALLTIME_MARGIN_SECONDS, margin / 4)
        for replica in retiring:
            if ready or replica.walltime_end is None or replica.walltime_end - now < last_moment:
                self._end_soon(replica, "near its walltime")
                changed = True
        wanted = usage.wanted is not None and now - usage.wanted < spec.idle_timeout_seconds
        serving = [r for r in replicas if r.phase == "ready"]
        last_use = max([usage.last_used or 0.0, *(r.ready_at or 0.0 for r in serving)])
        idle = usage.in_flight == 0 and now - last_use > spec.idle_timeout_seconds and not wanted
        target = max(spec.min_replicas, 1 if wanted or usage.in_flight else 0)
        if not idle:  # a retiring replica still in use is replaced before it goes
            target = max(target, len([r for r in retiring if r.phase == "ready"]))
        if ready and not pending and usage.in_flight / len(ready) > spec.target_in_flight:
            target = max(target, len(active) + 1)
        target = min(target, spec.max_replicas)
        if len(active) < target:
            if backoff is not None and backoff.retry_at > now:
                return changed
            await self._start(spec, backoff)
            return True
        if idle and ready and len(active) > spec.min_replicas:
            self._end_soon(ready[-1], f"idle for {now - last_use:.0f} s")
            changed = True
        return changed

    async def _start(self, spec: DeploymentSpec, backoff: Backoff | None) -> None:
        try:
            await start_replica(self.parts, spec)
        except SchedulerError as exc:
            log.warning("deployment %s: starting a replica failed: %s", spec.name, exc.message)
            await self._failed(spec.name, exc.message, backoff)

    async def _failed(self, name: str, detail: str, backoff: Backoff | None) -> None:
        settings = self.parts.settings
        failures = (backoff.failures if backoff else 0) + 1
        delay = min(settings.start_backoff_seconds * 2 ** (failures - 1), settings.start_backoff_max_seconds)
        await self.parts.store.set_backoff(name, Backoff(failures, time.time() + delay, detail))
        self.parts.metrics.deployment_start_failures.labels(name).inc()
        log.warning("deployment %s: %d failed starts; next attempt in %.0f s", name, failures, delay)

    async def _end(self, replica: ReplicaRecord, reason: str, *, failed: bool) -> None:
        """A replica that never got ready counts as a failed start, unless the gateway ended it."""
        self._running_since.pop(replica.replica_id, None)
        self._end_soon(replica, reason)
        if failed and replica.ready_at is None:
            backoffs = await self.parts.store.backoffs()
            await self._failed(replica.deployment, reason, backoffs.get(replica.deployment))

    def _end_soon(self, replica: ReplicaRecord, reason: str) -> None:
        """Ending waits for the job's grace: in the background, so one slow job holds no pass."""
        if replica.replica_id in self._ending:
            return
        task = asyncio.create_task(end_replica(self.parts, replica, reason))
        self._ending[replica.replica_id] = task
        task.add_done_callback(lambda _: self._ending.pop(replica.replica_id, None))

    def _measure(self, by_name: dict[str, list[ReplicaRecord]]) -> None:
        gauge = self.parts.metrics.deployment_replicas
        for name in {*by_name, *self._specs()}:
            counts = dict.fromkeys(LIVE_PHASES, 0)
            for replica in by_name.get(name, []):
                counts[replica.phase] = counts.get(replica.phase, 0) + 1
            for phase, count in counts.items():
                gauge.labels(name, phase).value = float(count)
