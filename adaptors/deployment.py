"""An on-demand deployment as an endpoint: requests go to a ready replica (a pilot job's model
server) over mutual TLS, and wait, bounded, while none is ready (docs/on-demand.md).

The endpoint's `config` declares the deployment (`DeploymentSpec`), which `startup` hands to the
gateway's controller (`AdaptorContext.deployments`). Per request it reads only the controller's
routing map, in memory: a ready replica gets the request at `{base_url}/v1/{path}`, inside
`in_flight` (the controller's load and idle clock); a replica whose connection is refused (its
job ended) makes the request look once more. Without one, the request asks for a replica
(`want`) and is held as adaptors/holding.py says, woken by the controller's `changed`.
Forwarding, answer limits and error mapping are those of every OpenAI-compatible backend
(adaptors/forwarding.py).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import Field, model_validator

from adaptors.cluster import GetJobsResponse, Jobs
from adaptors.configured import AdaptorConfig, ConfiguredCluster
from adaptors.context import AdaptorContext, SharedResources
from adaptors.deployments import (
    DEPLOYMENT_NAME,
    Deployments,
    DeploymentSpec,
    NoDeployments,
    Phase,
    Progress,
    Replica,
    is_deployment_name,
)
from adaptors.endpoint import StreamError, SubmitStreamingTaskResponse, SubmitTaskResponse
from adaptors.forwarding import ForwardingConfig, ForwardingEndpoint, Unreachable
from adaptors.holding import HeldCount, NotNow, Slot, WaitLimit, comment, refusal, too_many

_SHORTEST_WAIT = 0.02
_EARLY = 0.01
"""A timer may fire this much before it is due (the event loop's clock resolution and rounding)."""


class DeploymentEndpointConfig(ForwardingConfig):
    deployment: str | None = Field(default=None, pattern=DEPLOYMENT_NAME)
    """The deployment's name; by default the endpoint's slug."""
    scheduler: str = Field(min_length=1)
    model_command: tuple[str, ...] = Field(min_length=1)
    resources: dict[str, str | int] = Field(default_factory=dict)
    walltime_seconds: int = Field(default=3600, gt=0)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    idle_timeout_seconds: float = Field(default=900, gt=0)
    target_in_flight: int = Field(default=64, ge=1)
    health_path: str = Field(default="/health", pattern=r"^/\S*$")
    expected_start_seconds: float = Field(default=900, gt=0)
    max_held_requests: int = Field(default=256, ge=0)
    """Requests of one gateway process held for this deployment at once; more get 503."""
    max_wait_seconds: float = Field(default=300, gt=0)
    """The longest a request that is not streamed is held (under the OpenAI SDKs' 600 s timeout)."""
    max_stream_wait_seconds: float = Field(default=1800, gt=0)
    """The longest a stream is held: its comments keep clients and proxies from timing out."""
    progress_seconds: float = Field(default=15, gt=0)
    """A held stream gets a progress comment this often, and at each change of phase."""

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentEndpointConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        if not any("{port}" in argument for argument in self.model_command):
            raise ValueError("model_command must pass the model server its port as {port}")
        return self


class DeploymentEndpoint(ForwardingEndpoint[DeploymentEndpointConfig]):
    forwards_client_json = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        name = config.deployment or self.endpoint_slug
        if config.deployment is None and not is_deployment_name(name):
            raise ValueError(f"the endpoint's slug '{name}' cannot name a deployment: set config.deployment")
        self.spec = DeploymentSpec(
            name=name,
            cluster=self.cluster,
            model=self.model,
            scheduler=config.scheduler,
            model_command=config.model_command,
            resources=dict(config.resources),
            walltime_seconds=config.walltime_seconds,
            min_replicas=config.min_replicas,
            max_replicas=config.max_replicas,
            idle_timeout_seconds=config.idle_timeout_seconds,
            target_in_flight=config.target_in_flight,
            health_path=config.health_path,
            expected_start_seconds=config.expected_start_seconds,
        )
        self._task_wait = WaitLimit(config.max_wait_seconds, "request")
        self._stream_wait = WaitLimit(config.max_stream_wait_seconds, "stream")
        self._deployments: Deployments = NoDeployments()
        self._shared: SharedResources | None = None
        self._held = HeldCount()

    def client_ssl(self, context: AdaptorContext) -> ssl.SSLContext | None:
        """The gateway's pilot client certificate; the pilot's chain is checked against the site
        CA, its host name is not (compute nodes have none that is stable)."""
        return context.deployments.client_ssl

    async def startup(self, context: AdaptorContext) -> None:
        await super().startup(context)
        self._deployments = context.deployments
        self._shared = context.shared
        self._held = context.shared.acquire(HeldCount, self.spec.name, HeldCount)
        self._deployments.declare(self.spec)

    async def shutdown(self) -> None:
        self._deployments.withdraw(self.spec)
        if self._shared is not None:
            self._shared.release(HeldCount, self.spec.name)
            self._shared = None
        await super().shutdown()

    def progress(self) -> Progress:
        """The deployment's state, for `/jobs`, `/v1/models` and `list-endpoints`."""
        return self._deployments.progress(self.spec.name)

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        path, body = data["model_params"]["openai_endpoint"], self.body_of(data)
        deadline = time.monotonic() + self._task_wait.seconds
        name, deployments = self.spec.name, self._deployments
        replica, look_again = deployments.route(name), True
        try:
            while True:
                if replica is None:
                    replica = await self._held_until_ready(deadline)
                with deployments.in_flight(name, replica):
                    try:
                        return await self.forward(_url(replica, path), body, or_unreachable=look_again)
                    except Unreachable:
                        deployments.unreachable(name, replica)
                        look_again, replica = False, deployments.route(name)
        except NotNow as exc:
            return SubmitTaskResponse(
                error_code=exc.status,
                error_message=exc.message,
                retryable=exc.retryable,
                retry_after=exc.retry_after,
            )

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        """With a ready replica, as a direct API's stream. Without one, a refusal is still a plain
        error status; a request that may wait gets its stream at once, progress comments first."""
        path, body = data["model_params"]["openai_endpoint"], self.body_of(data)
        deadline = time.monotonic() + self._stream_wait.seconds
        replica = self._deployments.route(self.spec.name)
        slot = None
        if replica is None:
            try:
                slot = self._hold(self._admitted(deadline, self._stream_wait))
            except NotNow as exc:
                return SubmitStreamingTaskResponse(
                    error_code=exc.status,
                    error_message=exc.message,
                    retryable=exc.retryable,
                    retry_after=exc.retry_after,
                )
        stream = self._stream(path, body, deadline, replica, slot)
        return SubmitStreamingTaskResponse(
            response=stream if slot is None else _Releasing(stream, slot),
            keepalive_seconds=self.config.keepalive_seconds,
        )

    async def _stream(
        self, path: str, body: bytes, deadline: float, replica: Replica | None, slot: Slot | None
    ) -> AsyncIterator[bytes]:
        name, deployments = self.spec.name, self._deployments
        look_again = True
        try:
            while True:
                if replica is None:
                    if slot is None:
                        slot = self._hold(self._admitted(deadline, self._stream_wait))
                    progress: Progress | None = None
                    due = time.monotonic()
                    while replica is None:
                        step = await self._next_step(deadline, self._stream_wait, due - time.monotonic())
                        if isinstance(step, Replica):
                            replica = step
                        elif _comment_due(progress, step, due):
                            progress, due = step, time.monotonic() + self.config.progress_seconds
                            yield comment(name, step)
                    slot.release()
                    slot = None
                upstream = self.forward_stream(_url(replica, path), body, or_unreachable=look_again)
                with deployments.in_flight(name, replica):
                    try:
                        async with aclosing(upstream):
                            async for chunk in upstream:
                                yield chunk
                        return
                    except Unreachable:
                        deployments.unreachable(name, replica)
                        look_again, replica = False, deployments.route(name)
        except NotNow as exc:
            raise StreamError(
                exc.message, exc.status, retryable=exc.retryable, retry_after=exc.retry_after
            ) from None
        finally:
            if slot is not None:
                slot.release()

    async def _held_until_ready(self, deadline: float) -> Replica:
        slot = self._hold(self._admitted(deadline, self._task_wait))
        try:
            while True:
                step = await self._next_step(deadline, self._task_wait, self.config.progress_seconds)
                if isinstance(step, Replica):
                    return step
        finally:
            slot.release()

    def _admitted(self, deadline: float, limit: WaitLimit) -> Progress:
        """No replica is ready: one is asked for, and the request may wait (else `NotNow`)."""
        name = self.spec.name
        self._deployments.want(name)
        progress = self._deployments.progress(name)
        refused = refusal(name, progress, deadline - time.monotonic(), limit)
        if refused is not None:
            raise refused
        return progress

    def _hold(self, progress: Progress) -> Slot:
        slot = self._held.take(self.config.max_held_requests)
        if slot is None:
            raise too_many(self.spec.name, progress, self.spec.expected_start_seconds)
        return slot

    async def _next_step(self, deadline: float, limit: WaitLimit, longest: float) -> Replica | Progress:
        """Waits for the next change (at most `longest` seconds, and never past `deadline`): the
        replica now ready, or the deployment's progress if the request may wait on."""
        name, deployments = self.spec.name, self._deployments
        wait = min(deadline - time.monotonic(), longest)
        if wait > 0:
            started = time.monotonic()
            await deployments.changed(name, wait)
            if time.monotonic() - started < _SHORTEST_WAIT and deployments.route(name) is None:
                await asyncio.sleep(min(wait, _SHORTEST_WAIT))  # a `changed` that never waits cannot spin
        replica = deployments.route(name)
        if replica is not None:
            return replica
        progress = deployments.progress(name)
        if progress.phase is Phase.idle:
            deployments.want(name)  # the replica it was waiting for has gone: another one
        refused = refusal(name, progress, deadline - time.monotonic(), limit)
        if refused is not None:
            raise refused
        return progress


class _Releasing:
    """A held stream as the gateway gets it: closing it gives up its place among the held even
    when it was never iterated (the gateway closes every stream it was given)."""

    def __init__(self, chunks: AsyncIterator[bytes], slot: Slot | None) -> None:
        self._chunks = chunks
        self._slot = slot

    def __aiter__(self) -> _Releasing:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if self._slot is not None:
                self._slot.release()


def _comment_due(last: Progress | None, now: Progress, due: float) -> bool:
    """A held stream's comment: at once, at each change of phase, and every `progress_seconds`."""
    return last is None or now.phase is not last.phase or time.monotonic() >= due - _EARLY


def _url(replica: Replica, path: str) -> str:
    return f"{replica.base_url}/v1/{path}"


class DeploymentClusterConfig(AdaptorConfig):
    """Nothing to configure: the cluster's deployments are its endpoints' own."""


class DeploymentCluster(ConfiguredCluster[DeploymentClusterConfig]):
    """A cluster made only of on-demand deployments. It has no status of its own to read: the
    gateway lists each deployment in its jobs (proxy/core/deployment_views.py), and recounts these
    model counts from them."""

    async def get_jobs(self) -> GetJobsResponse:
        status = {"cluster": self.cluster_name, "total_models": 0, "live_models": 0, "stopped_models": 0}
        return GetJobsResponse(jobs=Jobs(cluster_status=status))
