"""Federated routing: `/v1/chat/completions` (and every other OpenAI path) without a cluster in the
path. Researchers name a model; the gateway finds where it runs.

Candidates are the endpoints, on any cluster and framework, that serve the model, that the caller
may use, and whose cluster offers the OpenAI path and is not under maintenance. They are ranked by
what their cluster's cached job report says of the model (running, then queued, then anything
else, a cluster whose report failed or is late included; an on-demand deployment by its phase),
then by the requests this process has in flight on each, fewest first; ties keep the
configuration's order.

Failover: the best candidate is tried first; when it fails in a way another endpoint may not (see
`worth_another_endpoint`) before anything reached the client, the next one is tried, up to
`federation.max_attempts`. A stream that has sent its first byte never switches: after that,
failures end it with an SSE error event and never come back here as an error.

The counts of requests in flight are per process: with several workers each balances its own share,
which the kernel already spreads evenly between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from adaptors import BaseCluster, BaseEndpoint, GetJobsResponse
from adaptors.deployment import DeploymentEndpoint
from adaptors.deployments import Phase
from proxy.core.authz import may_use
from proxy.core.identity import USER, User
from proxy.core.jobs import JobsCache, job_models
from proxy.core.maintenance import Maintenance
from proxy.core.registry import Registry
from proxy.errors import ApiError
from proxy.settings.traffic import FederationSettings

log = logging.getLogger(__name__)

RUNNING, QUEUED, OTHER = 0, 1, 2
"""Ranks of a model's state on a cluster, best first."""
RETRY_STATUSES = frozenset({502, 503, 504})
"""Unreachable or broken backend, offline or starting endpoint, timeout: the endpoint failed, not the
request. A 4xx is the client's own fault and would fail anywhere; a 429 is the caller's limit."""
ENDPOINT_HEADER = "X-Gateway-Endpoint"
MAX_REASON_CHARS = 300

SERVED_BY = web.RequestKey("served_by", str)
"""The slug of the endpoint the request was handed to, named in `ENDPOINT_HEADER`."""

Attempt = Callable[[BaseEndpoint], Awaitable[web.StreamResponse]]
"""Serves the request with one endpoint: rate limits, adaptor, response (proxy/edge/routes.py)."""


@dataclass(frozen=True)
class Candidate:
    endpoint: BaseEndpoint
    cluster: BaseCluster

    @property
    def name(self) -> str:
        """How errors name it: the caller knows clusters and frameworks, not slugs."""
        return f"{self.cluster.cluster_name}/{self.endpoint.framework}"


def worth_another_endpoint(error: ApiError) -> bool:
    """Whether a failed attempt may succeed elsewhere. Only asked of errors raised by an attempt,
    which nothing has reached the client yet: a non-streamed request is answered only at its end,
    and `write_stream` sends the headers with the first chunk and raises no error after it."""
    return error.status in RETRY_STATUSES


class Federation:
    def __init__(
        self, registry: Registry, jobs: JobsCache, maintenance: Maintenance, settings: FederationSettings
    ) -> None:
        self._registry = registry
        self._jobs = jobs
        self._maintenance = maintenance
        self._max_attempts = settings.max_attempts
        self._jobs_wait = settings.jobs_wait_seconds
        self._indexed: dict[str, BaseEndpoint] | None = None
        self._serving: dict[str, list[Candidate]] = {}
        """model → its endpoints, rebuilt when a reload replaces the registry's endpoints"""
        self._states: dict[str, tuple[GetJobsResponse, dict[tuple[str, str], int]]] = {}
        """cluster → (the report read, (framework, model) → rank), read once per report"""
        self._in_flight: dict[str, int] = {}
        """endpoint slug → requests of this process handed to it and not yet ended"""
        self._fetches: set[asyncio.Task[GetJobsResponse]] = set()

    async def serve(
        self, request: web.Request, openai_path: str, model: str, attempt: Attempt
    ) -> web.StreamResponse:
        """Rate limits apply per attempt, with the endpoint tried: its token limits are its own,
        and the tokens a request used count against the endpoint that served it. So a request that
        fails over counts once per attempt against the caller's request rate; each attempt did
        send work to a backend, and `max_attempts` bounds them. A 429 is never retried. When an
        attempt told the client not to retry (its task may still run), so does the final 503."""
        candidates, reasons = self._open(self._candidates(request[USER], openai_path, model))
        ranked = await self._ranked(candidates)
        retryable = True
        for candidate in ranked[: self._max_attempts]:
            slug = candidate.endpoint.endpoint_slug
            request[SERVED_BY] = slug
            self._in_flight[slug] = self._in_flight.get(slug, 0) + 1
            try:
                return await attempt(candidate.endpoint)
            except ApiError as exc:
                if not worth_another_endpoint(exc):
                    raise
                log.info("federated request: %s answered %d, trying the next endpoint", slug, exc.status)
                reasons.append(f"{candidate.name}: {exc.message[:MAX_REASON_CHARS]}")
                retryable = retryable and exc.retryable
            finally:
                self._in_flight[slug] -= 1
        request.pop(SERVED_BY, None)
        raise ApiError(
            503,
            f"No endpoint could serve model '{model[:200]}' now: {'; '.join(reasons)}",
            code="model_unavailable",
            retryable=None if retryable else False,
        )

    async def ranked_endpoints(self, user: User, openai_path: str, model: str) -> list[BaseEndpoint]:
        """The endpoints `serve` would try, in its order, for a caller without an HTTP request (a
        batch line, proxy/core/batch_runner.py); the same errors when there are none."""
        candidates, reasons = self._open(self._candidates(user, openai_path, model))
        if not candidates:
            message = f"No endpoint could serve model '{model[:200]}' now: {'; '.join(reasons)}"
            raise ApiError(503, message, code="model_unavailable")
        return [candidate.endpoint for candidate in (await self._ranked(candidates))[: self._max_attempts]]

    def _candidates(self, user: User, openai_path: str, model: str) -> list[Candidate]:
        """The same 404 whether the model exists nowhere or only where the caller may not go."""
        usable = [c for c in self._serving_of(model) if may_use(user, c.endpoint, c.cluster)]
        if not usable:
            raise ApiError(
                404,
                f"Model '{model[:200]}' is not served on any cluster you may use.",
                param="model",
                code="model_not_found",
            )
        offered = [c for c in usable if openai_path in c.cluster.openai_endpoints]
        if not offered:
            raise ApiError(
                400,
                f"'/v1/{openai_path}' is not available for model '{model[:200]}' on any cluster you may use.",
                code="unsupported_endpoint",
            )
        return offered

    def _serving_of(self, model: str) -> list[Candidate]:
        endpoints = self._registry.endpoints
        if endpoints is not self._indexed:
            serving: dict[str, list[Candidate]] = {}
            for endpoint in endpoints.values():
                cluster = self._registry.clusters[endpoint.cluster]
                serving.setdefault(endpoint.model, []).append(Candidate(endpoint, cluster))
            self._serving, self._indexed = serving, endpoints
        return self._serving.get(model, [])

    def _open(self, candidates: list[Candidate]) -> tuple[list[Candidate], list[str]]:
        """Candidates outside maintenance, and the operators' messages for the others."""
        open_, reasons = [], []
        for candidate in candidates:
            message = self._maintenance.message(candidate.cluster.cluster_name)
            if message is None:
                open_.append(candidate)
            else:
                reasons.append(f"{candidate.name}: {message[:MAX_REASON_CHARS]}")
        return open_, reasons

    async def _ranked(self, candidates: list[Candidate]) -> list[Candidate]:
        clusters = {c.cluster.cluster_name: c.cluster for c in candidates}
        reports = await self._reports(clusters.values())
        states = {name: self._states_in(name, report) for name, report in reports.items()}

        def rank(candidate: Candidate) -> tuple[int, int]:
            endpoint = candidate.endpoint
            state = _deployment_rank(endpoint)
            if state is None:
                state = states.get(endpoint.cluster, {}).get((endpoint.framework, endpoint.model), OTHER)
            return state, self._in_flight.get(endpoint.endpoint_slug, 0)

        return sorted(candidates, key=rank)

    async def _reports(self, clusters: Iterable[BaseCluster]) -> dict[str, GetJobsResponse]:
        """From the cache; only expired reports are fetched, all at once."""
        reports, missing = {}, []
        for cluster in clusters:
            report = self._jobs.cached(cluster)
            if report is None:
                missing.append(cluster)
            else:
                reports[cluster.cluster_name] = report
        if missing:
            reports |= await self._fetch(missing)
        return reports

    async def _fetch(self, clusters: list[BaseCluster]) -> dict[str, GetJobsResponse]:
        """Waits at most `jobs_wait_seconds`: a cluster whose report is late ranks as unknown for this
        request. Its fetch goes on in the background (never cancelled, so that the cache keeps it)
        and later requests read it from the cache."""
        tasks = {cluster.cluster_name: asyncio.ensure_future(self._jobs.get(cluster)) for cluster in clusters}
        for task in tasks.values():
            self._fetches.add(task)
            task.add_done_callback(self._fetched)
        await asyncio.wait(tasks.values(), timeout=self._jobs_wait)
        return {
            name: task.result()
            for name, task in tasks.items()
            if task.done() and not task.cancelled() and task.exception() is None
        }

    def _fetched(self, task: asyncio.Task[GetJobsResponse]) -> None:
        self._fetches.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a cluster adaptor's get_jobs failed: %r", task.exception())

    def _states_in(self, cluster: str, report: GetJobsResponse) -> dict[tuple[str, str], int]:
        """A failed report knows nothing: its cluster's endpoints rank as OTHER."""
        if report.jobs is None or report.error_code is not None:
            return {}
        known = self._states.get(cluster)
        if known is not None and known[0] is report:
            return known[1]
        states = {}
        for state, jobs in ((QUEUED, report.jobs.queued), (RUNNING, report.jobs.running)):
            for job in jobs:
                for model in job_models(job):
                    states[(job.Framework, model)] = state
        self._states[cluster] = (report, states)
        return states


def _deployment_rank(endpoint: BaseEndpoint) -> int | None:
    """An on-demand deployment's rank from the controller's memory, not a cluster's report: one
    with a ready replica runs, one starting is queued; None for any other endpoint."""
    if not isinstance(endpoint, DeploymentEndpoint):
        return None
    progress = endpoint.progress()
    if progress.ready_replicas > 0 or progress.phase is Phase.ready:
        return RUNNING
    return QUEUED if progress.phase in _STARTING else OTHER


_STARTING = frozenset({Phase.queued, Phase.starting, Phase.loading})


async def name_serving_endpoint(request: web.Request, response: web.StreamResponse) -> None:
    """On every response of a federated request, streams included: `write_stream` prepares the
    stream's headers itself, with its first chunk, so they are added as it does."""
    slug = request.get(SERVED_BY)
    if slug is not None:
        response.headers[ENDPOINT_HEADER] = slug
