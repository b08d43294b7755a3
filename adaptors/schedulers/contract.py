"""The scheduler adaptor contract: the little the on-demand controller needs from a batch system.

The controller only submits a pilot job, reads the states of the jobs it owns, ends one, and
stages the pilot's configuration where the job will read it. Everything site-specific (queues,
accounts, directives, how the commands are reached) stays inside the adaptor and its `config`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adaptors.context import AdaptorContext


class JobState(str, enum.Enum):
    """Where a job is, as far as the scheduler tells: `queued` (waiting for nodes, or held),
    `running`, `ended` (finished, failed, deleted: it will not run again), `unknown` (the scheduler
    could not be asked, or no longer remembers the job; the controller decides from heartbeats)."""

    queued = "queued"
    running = "running"
    ended = "ended"
    unknown = "unknown"


@dataclass(frozen=True)
class JobSpec:
    """One pilot job. `command` is the argv the job runs on its first node; `resources` are the
    deployment's scheduler-specific settings (queue, account, nodes, filesystems, partition...),
    which the adaptor validates and turns into directives."""

    name: str
    command: tuple[str, ...]
    walltime_seconds: int
    resources: Mapping[str, str | int] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    working_directory: str | None = None


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    detail: str = ""
    """The scheduler's own words (its state letter, a comment, an exit status), for operators."""
    estimated_start: float | None = None
    """Epoch seconds at which the scheduler expects a queued job to start, when it says."""


class SchedulerError(Exception):
    """The scheduler refused or could not be reached. `retryable` False: asking again will fail
    the same way (a bad queue name, an account without allocation)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class Scheduler(ABC):
    """One configured batch system. `config` is the `config` object of its entry in the gateway's
    settings; a constructor that finds a field wrong raises `ValueError` naming `config.<field>`,
    and the gateway refuses to start naming the file and entry."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name = name

    async def startup(self, context: AdaptorContext) -> None:
        """Open clients; called once the event loop runs (the executor runs blocking commands)."""

    async def shutdown(self) -> None:
        """Release what `startup` opened."""

    def check(self, spec: JobSpec) -> None:
        """Raise `SchedulerError` when `spec` could never be submitted (a resource this
        scheduler does not know, a value that cannot be a directive). Called when a deployment is
        declared, so that its mistake stops start-up instead of failing every start."""

    @abstractmethod
    def staging_path(self, file_name: str) -> str:
        """Where a staged file named `file_name` lands, as the job on the cluster sees it."""

    @abstractmethod
    async def stage(self, content: bytes, file_name: str) -> str:
        """Write `content` (readable by the job's owner only) to `staging_path(file_name)`;
        returns that path."""

    @abstractmethod
    async def submit(self, spec: JobSpec) -> str:
        """Submit the job; returns the scheduler's job id. Raises `SchedulerError`."""

    @abstractmethod
    async def states(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The states of `job_ids` in one call where the scheduler allows. A job the scheduler no
        longer lists is `ended` if it certainly finished, else `unknown`. Raises `SchedulerError`
        when the scheduler cannot be asked at all."""

    @abstractmethod
    async def end(self, job_id: str) -> None:
        """End the job, queued or running; ending a job that already ended is not an error."""
