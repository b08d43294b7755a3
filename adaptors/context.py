"""What the server hands to adaptors, so that adaptors never import the server."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from adaptors.relay import StreamRelay
from adaptors.telemetry import NoTelemetry, Telemetry

if TYPE_CHECKING:
    from adaptors.cluster import GetJobsResponse


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


@dataclass(frozen=True)
class AdaptorContext:
    """Shared resources, given to every adaptor's `startup`.

    `executor` is a bounded thread pool for blocking libraries (SDKs built on `requests`):
    running them on the event loop would freeze every other request. `relay` carries streams of
    backends that call back (see adaptors/relay.py). `telemetry` takes what adaptors report about
    their backends (adaptors/telemetry.py). `jobs` reads a cluster's job report through the
    gateway's cache, so that an endpoint can gate on its model being up without asking the
    cluster on every request (adaptors/metis.py). `limits` bound what an adaptor
    buffers of an answer.
    """

    executor: Executor
    relay: StreamRelay
    telemetry: Telemetry = field(default_factory=NoTelemetry)
    jobs: ClusterJobs = no_jobs
    limits: AnswerLimits = field(default_factory=AnswerLimits)
