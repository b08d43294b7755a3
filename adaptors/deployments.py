"""What an on-demand deployment's endpoint needs from the gateway's controller (docs/on-demand.md).

The controller (in the server) starts and stops pilot jobs and keeps the routing map; the
endpoint adaptor (adaptors/deployment.py) only reads that map, asks for a replica when none is
ready, and waits. The server hands its controller to adaptors in `AdaptorContext.deployments`;
outside a gateway, `NoDeployments` answers that nothing is deployed.
"""

from __future__ import annotations

import enum
import re
import ssl
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

DEPLOYMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A deployment's name: the path segment under a pilot's `/deployments/` (the pilot, which imports
nothing of the gateway, checks the same pattern in `ModelConfig.name`, pilot/protocol.py)."""


def is_deployment_name(name: str) -> bool:
    return re.match(DEPLOYMENT_NAME, name) is not None


class Phase(str, enum.Enum):
    """A deployment's state as users see it (SSE comments, `/jobs`, `/v1/models`)."""

    idle = "idle"
    """No replica and none asked for: the next request starts one."""
    queued = "queued"
    """A pilot job waits in the scheduler's queue."""
    starting = "starting"
    """The job runs; the pilot has not registered yet."""
    loading = "loading"
    """The pilot registered; its model server loads the model."""
    ready = "ready"
    backing_off = "backing_off"
    """Recent starts failed; the next attempt waits (`Progress.eta_seconds` says how long)."""
    unavailable = "unavailable"
    """Not deployed here (no controller, or not declared)."""


@dataclass(frozen=True)
class Progress:
    phase: Phase
    eta_seconds: float | None = None
    """Seconds until a replica is expected to be ready, when the controller can estimate it."""
    detail: str = ""
    ready_replicas: int = 0


@dataclass(frozen=True)
class Replica:
    """A ready replica: requests for deployment `name` go to `base_url` + `/v1/...` over mTLS."""

    replica_id: str
    base_url: str


@dataclass(frozen=True)
class DeploymentSpec:
    """A deployment as its endpoint declares it (the endpoint's `config`); the controller owns
    the rest (replicas, jobs, back-off)."""

    name: str
    cluster: str
    model: str
    scheduler: str
    """The name of a scheduler in the gateway's `on_demand.schedulers` settings."""
    model_command: tuple[str, ...]
    """The model server's argv on the compute node; `{port}` is replaced by its port."""
    resources: Mapping[str, str | int] = field(default_factory=dict)
    walltime_seconds: int = 3600
    min_replicas: int = 0
    max_replicas: int = 1
    idle_timeout_seconds: float = 900
    target_in_flight: int = 64
    """Requests in flight per ready replica above which another replica is started."""
    health_path: str = "/health"
    expected_start_seconds: float = 900
    """The ETA given before the controller has measured a start of this deployment."""


class Deployments(Protocol):
    """The controller as endpoint adaptors see it. Every call reads memory: none waits on the
    database or the scheduler, so requests to running replicas go on if either is down."""

    @property
    def client_ssl(self) -> ssl.SSLContext | None:
        """The gateway's mTLS client context for pilots (None: on-demand is not configured)."""

    def declare(self, spec: DeploymentSpec) -> None:
        """An endpoint with this spec is (re)loaded; the latest declaration of a name wins."""

    def withdraw(self, spec: DeploymentSpec) -> None:
        """The endpoint that declared `spec` is unloaded (ignored if a newer one replaced it)."""

    def route(self, name: str) -> Replica | None:
        """The ready replica that should take the next request, least loaded first."""

    def progress(self, name: str) -> Progress: ...

    def want(self, name: str) -> None:
        """A request for `name` found no ready replica: start one now (scale from zero)."""

    def unreachable(self, name: str, replica: Replica) -> None:
        """A request could not connect to `replica` (its job may have died): route no more
        requests to it until its pilot is heard from again, and have it looked at now."""

    async def changed(self, name: str, timeout: float) -> None:
        """Returns when `name`'s routing or progress changes, or after `timeout` seconds."""

    def in_flight(self, name: str, replica: Replica) -> AbstractContextManager[None]:
        """Held around each request to a replica: load (for scaling up) and last use (for the
        idle timeout)."""


class NoDeployments:
    """Outside a gateway, or with on-demand off: nothing is deployed."""

    client_ssl: ssl.SSLContext | None = None

    def declare(self, spec: DeploymentSpec) -> None:
        return None

    def withdraw(self, spec: DeploymentSpec) -> None:
        return None

    def route(self, name: str) -> Replica | None:
        return None

    def progress(self, name: str) -> Progress:
        return Progress(Phase.unavailable, detail="on-demand deployments are not configured")

    def want(self, name: str) -> None:
        return None

    def unreachable(self, name: str, replica: Replica) -> None:
        return None

    async def changed(self, name: str, timeout: float) -> None:
        return None

    def in_flight(self, name: str, replica: Replica) -> AbstractContextManager[None]:
        return nullcontext()
