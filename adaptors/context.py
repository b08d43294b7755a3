"""What the server hands to adaptors, so that adaptors never import the server."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from adaptors.deployments import Deployments, NoDeployments
from adaptors.relay import StreamRelay
from adaptors.telemetry import NoTelemetry, Telemetry

if TYPE_CHECKING:
    from adaptors.cluster import GetJobsResponse

Shared = TypeVar("Shared")


class ClusterJobs(Protocol):
    """A cluster's job report as the gateway has it cached (None: no such cluster, or no gateway)."""

    async def __call__(self, cluster_name: str) -> GetJobsResponse | None: ...


async def no_jobs(cluster_name: str) -> GetJobsResponse | None:
    """Outside a gateway (tests, scripts) there is no cluster to ask."""
    return None


@dataclass(frozen=True)
class AnswerLimits:
    """How much of a backend's answer an adaptor may hold, counted after decompression:
    `answer_bytes` for a whole (non-streamed) answer or a status document, `error_bytes` for an error
    answer, of which at most `error_message_chars` reach the client."""

    answer_bytes: int = 64 * 1024 * 1024
    error_bytes: int = 64 * 1024
    error_message_chars: int = 1000

    def for_status(self, status: int) -> int:
        """The limit of an answer of this status: an error (or a redirect) gets the smaller one."""
        return self.error_bytes if status >= 300 else self.answer_bytes


@dataclass
class _Held:
    value: object
    users: int = 0


class SharedResources:
    """Objects that the adaptors of one gateway share, counted by user, such as one Globus Compute
    client and result poller for each set of credentials however many endpoints use them.

    The server hands one to every generation of adaptors in `AdaptorContext.shared`, so a reload's
    new adaptors share with the ones they replace, and the last to leave closes what they shared.
    It is never process-wide: two gateways in one process (tests) must not share a poller bound to
    the other's executor and metrics. An object is kept under its type and a key, so `acquire`
    always returns the type it was asked for.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[type, Hashable], _Held] = {}

    def acquire(self, kind: type[Shared], key: Hashable, make: Callable[[], Shared]) -> Shared:
        """The `kind` object kept under `key`, made by `make` on first use; release it once done."""
        held = self._held.get((kind, key))
        if held is None:
            held = self._held[(kind, key)] = _Held(make())
        held.users += 1
        return cast(Shared, held.value)

    def release(self, kind: type[Shared], key: Hashable) -> Shared | None:
        """The object once its last user has released it, for that user to close; None until then."""
        held = self._held[(kind, key)]
        held.users -= 1
        if held.users > 0:
            return None
        del self._held[(kind, key)]
        return cast(Shared, held.value)


@dataclass(frozen=True)
class AdaptorContext:
    """Shared resources, given to every adaptor's `startup`.

    `executor` is a bounded thread pool for blocking libraries (SDKs built on `requests`):
    running them on the event loop would freeze every other request. `relay` carries streams of
    backends that call back (see adaptors/relay.py). `telemetry` takes what adaptors report about
    their backends (adaptors/telemetry.py). `jobs` reads a cluster's job report through the
    gateway's cache, so that an endpoint can gate on its model being up without asking the
    cluster on every request (adaptors/metis.py). `limits` bound what an adaptor
    buffers of an answer. `shared` holds what adaptors share within the gateway (see
    `SharedResources`); a context built without a gateway (tests, scripts) gets its own.
    """

    executor: Executor
    relay: StreamRelay
    telemetry: Telemetry = field(default_factory=NoTelemetry)
    jobs: ClusterJobs = no_jobs
    limits: AnswerLimits = field(default_factory=AnswerLimits)
    shared: SharedResources = field(default_factory=SharedResources)
    deployments: Deployments = field(default_factory=NoDeployments)
    """The on-demand controller (adaptors/deployments.py); `NoDeployments` when it is off."""
