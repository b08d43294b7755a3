"""The controller as the gateway holds it: the Deployments protocol for adaptors (memory only),
and the loops every process runs once the database is open: refresh the routing map, report this
process's load and demand, listen for other hosts' changes, and reconcile when it holds the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager

from adaptors.context import AdaptorContext
from adaptors.deployments import DeploymentSpec, Progress, Replica, is_deployment_name
from adaptors.schedulers.contract import SchedulerError
from mtls.certificates import subject_of
from mtls.contexts import client_context
from proxy.core.deployments.broadcast import Broadcast
from proxy.core.deployments.pilots import PilotDesk
from proxy.core.deployments.reconcile import Reconciler
from proxy.core.deployments.replicas import ConfiguredScheduler, Parts, job_spec
from proxy.core.deployments.routing import RoutingMap, Snapshot
from proxy.metrics.prometheus import Metrics
from proxy.records.database import DatabaseUnavailable
from proxy.records.deployment_store import DeploymentStore, Usage
from proxy.settings.on_demand import OnDemandSettings, import_scheduler
from proxy.settings.server import ServerSettings

log = logging.getLogger(__name__)


class Controller:
    def __init__(
        self, settings: OnDemandSettings, server: ServerSettings, redis_url: str | None, metrics: Metrics
    ) -> None:
        """`settings` were checked by load_settings (files exist, schedulers build)."""
        assert settings.ca_file and settings.gateway_certificate and settings.gateway_key
        self.settings = settings
        self._client_ssl = client_context(
            settings.gateway_certificate, settings.gateway_key, settings.ca_file
        )
        subjects = settings.gateway_subjects or (subject_of(settings.gateway_certificate.read_bytes()),)
        gateway_url = settings.gateway_url or f"http://{server.host}:{server.port}{server.base_path}/pilots"
        self._schedulers = {
            name: ConfiguredScheduler(entry, import_scheduler(entry.adapter)(name, entry.config))
            for name, entry in settings.schedulers.items()
        }
        self._metrics, self._gateway_url, self._subjects = metrics, gateway_url, subjects
        self.map = RoutingMap()
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._redis_url = redis_url
        self.broadcast: Broadcast | None = None
        self.desk: PilotDesk | None = None
        self.reconciler: Reconciler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._refresh = asyncio.Event()
        self._reconcile = asyncio.Event()
        self._report = asyncio.Event()
        self._reported_wants: dict[str, float] = {}

    # The Deployments protocol (adaptors/deployments.py): memory only.

    @property
    def client_ssl(self) -> ssl.SSLContext:
        return self._client_ssl

    def declare(self, spec: DeploymentSpec) -> None:
        if spec.scheduler not in self.settings.schedulers:
            known = ", ".join(sorted(self.settings.schedulers)) or "none"
            raise ValueError(
                f"config.scheduler: no scheduler {spec.scheduler!r} in on_demand.schedulers (known: {known})"
            )
        if not is_deployment_name(spec.name):
            raise ValueError(f"deployment name {spec.name!r}: letters, digits, '.', '_' and '-' only")
        configured = self._schedulers[spec.scheduler]
        try:
            configured.scheduler.check(job_spec(configured.settings, spec, "check.json"))
        except SchedulerError as exc:
            raise ValueError(f"config.{exc.message}") from None
        self.map.declare(spec)
        self._refresh.set()
        self._reconcile.set()

    def withdraw(self, spec: DeploymentSpec) -> None:
        self.map.withdraw(spec)

    def route(self, name: str) -> Replica | None:
        return self.map.route(name)

    def progress(self, name: str) -> Progress:
        return self.map.progress(name)

    def want(self, name: str) -> None:
        """The leader in this process reconciles at once; otherwise the demand reaches the
        database (and Redis) from the background reporter, not from the request path."""
        if name not in self.map.specs:
            return
        self.map.want(name)
        self._reconcile.set()
        self._report.set()

    def unreachable(self, name: str, replica: Replica) -> None:
        """Out of this process's routing at once; the leader looks at its job now rather than at
        the next pass (a replica that died is replaced on the request that found it dead)."""
        self.map.unreachable(name, replica)
        self.want(name)

    async def changed(self, name: str, timeout: float) -> None:
        await self.map.changed(name, timeout)

    def in_flight(self, name: str, replica: Replica) -> AbstractContextManager[None]:
        return self.map.using(name, replica)

    # The gateway's lifecycle.

    async def attach(self, context: AdaptorContext) -> None:
        """Schedulers start with the adaptors (they may need the executor)."""
        await asyncio.gather(*(entry.scheduler.startup(context) for entry in self._schedulers.values()))

    async def start(self, store: DeploymentStore) -> None:
        parts = Parts(
            self.settings, self._schedulers, store, self._metrics, self._gateway_url, self._subjects
        )
        self.desk = PilotDesk(parts, self._client_ssl, self.note_change)
        self.reconciler = Reconciler(parts, lambda: dict(self.map.specs), self._local_usage, self.process)
        if self._redis_url:
            self.broadcast = Broadcast(self._redis_url, self._heard)
            self._tasks.append(asyncio.create_task(self.broadcast.listen_forever()))
        settings = self.settings
        self._tasks += [
            asyncio.create_task(self._every(settings.refresh_seconds, self._refresh, self.refresh)),
            asyncio.create_task(self._every(settings.usage_report_seconds, self._report, self._report_usage)),
            asyncio.create_task(
                self._every(settings.reconcile_seconds, self._reconcile, self._reconcile_once)
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.desk is not None:
            await self.desk.close()
        if self.reconciler is not None:
            with contextlib.suppress(DatabaseUnavailable):
                await self.reconciler.resign()
        if self.broadcast is not None:
            await self.broadcast.close()
        for entry in self._schedulers.values():
            await entry.scheduler.shutdown()

    async def note_change(self, name: str) -> None:
        """A registration or heartbeat here changed `name`: this process refreshes now, the others
        at once through Redis, or at their next refresh."""
        await self.refresh()
        self._reconcile.set()
        if self.broadcast is not None:
            await self.broadcast.publish("changed", name)

    async def refresh(self) -> None:
        assert self.reconciler is not None
        store = self.reconciler.parts.store
        replicas = await store.live()
        snapshot = Snapshot(replicas, await store.backoffs(), await store.start_durations())
        self.map.apply(snapshot)

    def _heard(self, kind: str, name: str) -> None:
        self._refresh.set()
        if kind == "want":
            self._reconcile.set()

    def _local_usage(self) -> dict[str, Usage]:
        names = {*self.map.in_flight, *self.map.last_used, *self.map.wanted}
        return {
            name: Usage(
                self.map.in_flight.get(name, 0), self.map.last_used.get(name), self.map.wanted.get(name)
            )
            for name in names
        }

    async def _report_usage(self) -> None:
        assert self.reconciler is not None
        store = self.reconciler.parts.store
        wanting = []
        for name, usage in self._local_usage().items():
            await store.report_usage(self.process, name, usage.in_flight, usage.last_used, usage.wanted)
            if usage.wanted is not None and usage.wanted > self._reported_wants.get(name, 0):
                wanting.append(name)
                self._reported_wants[name] = usage.wanted
        if self.broadcast is not None:
            for name in wanting:
                await self.broadcast.publish("want", name)

    async def _reconcile_once(self) -> None:
        assert self.reconciler is not None
        if await self.reconciler.run_once():
            await self.refresh()
            if self.broadcast is not None:
                await self.broadcast.publish("changed", "*")

    @staticmethod
    async def _every(seconds: float, wake: asyncio.Event, run: Callable[[], Awaitable[None]]) -> None:
        """`run` every `seconds`, or at once when `wake` is set; a failure is logged, not fatal."""
        while True:
            wake.clear()
            try:
                await run()
            except DatabaseUnavailable as exc:
                log.debug("deployments: database unavailable: %s", exc)
            except Exception:
                log.exception("deployments: %s failed", getattr(run, "__name__", run))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), seconds)
