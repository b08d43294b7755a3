"""Each process's routing map: the declared deployments, their ready replicas and progress, and
this process's own load on them. The request path reads only this (no database, no scheduler);
`apply` replaces it from a database snapshot off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from adaptors.deployments import DeploymentSpec, Phase, Progress, Replica
from proxy.core.deployments.progress import expected_start, progress_of
from proxy.records.deployment_store import Backoff, ReplicaRecord

WANT_SHOWN_SECONDS = 30.0
"""After a want, an idle deployment reads as `queued` this long: the leader is starting a replica."""


@dataclass(frozen=True)
class Snapshot:
    """What the database says, read in one go."""

    replicas: Sequence[ReplicaRecord]
    backoffs: dict[str, Backoff]
    durations: dict[str, list[float]]
    taken: float = field(default_factory=time.time)


@dataclass
class _View:
    ready: list[tuple[Replica, int]] = field(default_factory=list)
    """Ready replicas with the requests in flight their pilot last reported."""
    progress: Progress = field(default_factory=lambda: Progress(Phase.idle))


def origin(address: str | None, port: int | None) -> str:
    """`https://host:port`, an IPv6 address in brackets."""
    host = f"[{address}]" if address and ":" in address else address
    return f"https://{host}:{port}"


def base_url(replica: ReplicaRecord) -> str:
    return f"{origin(replica.address, replica.port)}/deployments/{replica.deployment}"


class RoutingMap:
    def __init__(self) -> None:
        self.specs: dict[str, DeploymentSpec] = {}
        self._views: dict[str, _View] = {}
        self._durations: dict[str, list[float]] = {}
        self._changed: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.loads: dict[str, int] = defaultdict(int)
        """Requests this process has in flight, per replica id."""
        self.in_flight: dict[str, int] = defaultdict(int)
        """... and per deployment."""
        self.last_used: dict[str, float] = {}
        self.wanted: dict[str, float] = {}
        self._want_shown: dict[str, float] = {}
        """Wants not yet answered by a replica in the database, shown as `queued`."""
        self._unreachable: dict[str, float] = {}
        """Replicas that refused a request's connection, by id, with when: out of this process's
        routing until their pilot heartbeats again (a pilot that died never does)."""

    def declare(self, spec: DeploymentSpec) -> None:
        self.specs[spec.name] = spec
        self._views.setdefault(spec.name, _View())
        self._notify(spec.name)

    def withdraw(self, spec: DeploymentSpec) -> None:
        if self.specs.get(spec.name) is spec:
            del self.specs[spec.name]
            self._notify(spec.name)

    def route(self, name: str) -> Replica | None:
        view = self._views.get(name)
        if view is None or name not in self.specs:
            return None
        ready = [entry for entry in view.ready if entry[0].replica_id not in self._unreachable]
        if not ready:
            return None
        replica, _ = min(ready, key=lambda entry: (self.loads[entry[0].replica_id], entry[1]))
        return replica

    def unreachable(self, name: str, replica: Replica) -> None:
        self._unreachable[replica.replica_id] = time.time()
        self._notify(name)

    def progress(self, name: str) -> Progress:
        spec = self.specs.get(name)
        if spec is None:
            return Progress(Phase.unavailable, detail=f"deployment {name!r} is not declared here")
        view = self._views[name]
        progress = view.progress
        if (
            progress.phase is Phase.ready
            and view.ready
            and all(replica.replica_id in self._unreachable for replica, _ in view.ready)
        ):
            expected = expected_start(spec, self._durations.get(name, []))
            return Progress(Phase.starting, expected, "the ready replica stopped answering; replacing it")
        wanted = self._want_shown.get(name)
        if progress.phase is Phase.idle and wanted is not None and time.time() - wanted < WANT_SHOWN_SECONDS:
            expected = expected_start(spec, self._durations.get(name, []))
            return Progress(Phase.queued, expected, "a replica is being started")
        return progress

    def want(self, name: str) -> None:
        self.wanted[name] = self._want_shown[name] = time.time()
        self._notify(name)

    async def changed(self, name: str, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed[name].wait(), timeout)

    @contextlib.contextmanager
    def using(self, name: str, replica: Replica) -> Iterator[None]:
        self.loads[replica.replica_id] += 1
        self.in_flight[name] += 1
        self.last_used[name] = time.time()
        try:
            yield
        finally:
            self.loads[replica.replica_id] -= 1
            if not self.loads[replica.replica_id]:
                del self.loads[replica.replica_id]
            self.in_flight[name] -= 1
            self.last_used[name] = time.time()

    def apply(self, snapshot: Snapshot) -> None:
        """Replace every view from `snapshot`; waiters of a deployment whose routing or phase
        changed are woken."""
        by_name: dict[str, list[ReplicaRecord]] = defaultdict(list)
        for record in snapshot.replicas:
            by_name[record.deployment].append(record)
        self._durations = snapshot.durations
        heard = {r.replica_id: r.last_heartbeat or 0.0 for r in snapshot.replicas if r.ended is None}
        for replica_id, since in list(self._unreachable.items()):
            if heard.get(replica_id, since + 1) > since:  # heartbeating again, or ended
                del self._unreachable[replica_id]
        for name, spec in self.specs.items():
            records = by_name.get(name, [])
            if records and self._want_shown.get(name, snapshot.taken) < snapshot.taken:
                del self._want_shown[name]
            ready = [
                (Replica(r.replica_id, base_url(r)), r.in_flight)
                for r in records
                if r.phase == "ready" and not r.stop_requested
            ]
            progress = progress_of(
                spec, records, snapshot.backoffs.get(name), snapshot.durations.get(name, []), snapshot.taken
            )
            view = self._views.setdefault(name, _View())
            before = ({replica for replica, _ in view.ready}, view.progress.phase)
            view.ready, view.progress = ready, progress
            if before != ({replica for replica, _ in ready}, progress.phase):
                self._notify(name)

    def _notify(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()
