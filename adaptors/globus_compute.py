"""Adaptors for models served by Globus Compute functions on HPC clusters.

The existing gateway's functions run unchanged: the same payload
`{"model_params": {<client's fields>, "openai_endpoint", "api_port", [streaming fields]}}` and the
same streaming callbacks. This module is the endpoint adaptor; its parts are beside it: the config
(compute_config.py), the shared service and result poller (compute_service.py), streams
(compute_streams.py), batches (compute_batches.py), asynchronous tasks (compute_tasks.py) and the
cluster adaptor (compute_cluster.py), which fixtures name by this module's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import globus_sdk

from adaptors.compute_batches import batch_payload, batch_status, task_ids_of
from adaptors.compute_cluster import GlobusComputeCluster
from adaptors.compute_config import GlobusComputeClusterConfig, GlobusComputeEndpointConfig
from adaptors.compute_jobs import EndpointStatuses
from adaptors.compute_push import PUSH_WHILE_WAITING_FOR, first_answer, open_slot, release_slot
from adaptors.compute_results import UnreadableResult, as_json_text
from adaptors.compute_service import (
    GLOBUS_COMPUTE,
    ComputeService,
    TaskFailed,
    acquire_service,
    release_service,
)
from adaptors.compute_streams import client_events, drain, stream_failure, unsupported_stream, with_watcher
from adaptors.compute_tasks import start_task, task_result
from adaptors.configured import ConfiguredEndpoint
from adaptors.context import AdaptorContext
from adaptors.endpoint import (
    BatchStatusEnum,
    GetBatchStatusResponse,
    GetTaskResultResponse,
    SubmitBatchResponse,
    SubmitStreamingTaskResponse,
    SubmitTaskAsyncResponse,
    SubmitTaskResponse,
)
from adaptors.relay import RelayStream, StreamRelay
from adaptors.remote_errors import RemoteFailure, remote_error
from adaptors.telemetry import NoTelemetry, Telemetry
from adaptors.transport import TransportFailure, transport_failure

__all__ = [
    "GlobusComputeCluster",
    "GlobusComputeClusterConfig",
    "GlobusComputeEndpoint",
    "GlobusComputeEndpointConfig",
]

log = logging.getLogger(__name__)

MIN_RETRY_AFTER_SECONDS = 10


class GlobusComputeEndpoint(ConfiguredEndpoint[GlobusComputeEndpointConfig]):
    """Runs each request as a task of the endpoint's function, after checking that its Compute
    endpoint is online and its model not still loading; streams come back through the relay."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._context: AdaptorContext | None = None
        self._service: ComputeService | None = None
        self._statuses: EndpointStatuses | None = None
        self._relay: StreamRelay | None = None
        self._telemetry: Telemetry = NoTelemetry()
        self._status: tuple[float, dict[str, Any]] | None = None
        self._status_call: asyncio.Future[dict[str, Any] | None] | None = None
        self._triggered_at: float | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._context = context
        self._service = acquire_service(self.config, context)
        self._relay = context.relay
        self._telemetry = context.telemetry
        self._statuses = context.shared.acquire(EndpointStatuses, (), EndpointStatuses)
        self._statuses.serve((self.cluster, self.framework, self.model), self.endpoint_status)

    async def shutdown(self) -> None:
        context, service, statuses = self._context, self._service, self._statuses
        if context is None or service is None or statuses is None:
            return
        statuses.leave((self.cluster, self.framework, self.model), self.endpoint_status)
        context.shared.release(EndpointStatuses, ())
        await release_service(service, context)

    async def endpoint_status(self) -> dict[str, Any] | None:
        """The Compute endpoint's status (cached), None when it cannot be read."""
        return await self._endpoint_status()

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        service = self._ready()
        pushes = self._pushes(service)
        service.answering += 1
        try:
            return await self._answer(service, data, pushes)
        finally:
            service.answering -= 1

    async def _answer(
        self, service: ComputeService, data: dict[str, Any], pushes: bool
    ) -> SubmitTaskResponse:
        refusal = await self._unavailable()
        if refusal is not None:
            return SubmitTaskResponse(**refusal)
        params = {**data["model_params"], "api_port": self.config.api_port}
        slot = await open_slot(self._ready_relay()) if pushes else None
        if slot is not None:
            params |= self._callback_fields(slot)
        try:
            task_id = await self._submit(service, params)
        except globus_sdk.GlobusError as exc:
            if slot is not None:
                await release_slot(slot)
            failure = self._globus_failed(exc)
            return SubmitTaskResponse(
                error_code=failure.status, error_message=failure.message, retryable=failure.retryable
            )
        try:
            polled = self._result(service, task_id)
            value = await (polled if slot is None else first_answer(slot, polled))
            # A string goes as it came: the core reads every answer as JSON once (dispatch._answer)
            # and refuses one that is not, so a second reading here would only cost its time.
            text = value if isinstance(value, str) else as_json_text(value)
            return SubmitTaskResponse(result=text, task_id=task_id)
        except TimeoutError:
            self._telemetry.upstream_error(self.endpoint_slug, "timeout")
            return SubmitTaskResponse(error_code=504, error_message=self._timeout(task_id), task_id=task_id)
        except TaskFailed as exc:
            remote = self._task_failed(exc)
            return SubmitTaskResponse(
                error_code=remote.status,
                error_message=remote.message,
                error_detail=remote.detail,
                task_id=task_id,
                retryable=False,
            )
        except UnreadableResult as exc:
            self._telemetry.upstream_error(self.endpoint_slug, "5xx")
            return SubmitTaskResponse(
                error_code=502, error_message=str(exc), task_id=task_id, retryable=False
            )
        except ValueError:
            return SubmitTaskResponse(
                error_code=502,
                error_message="The task's result is not JSON.",
                task_id=task_id,
                retryable=False,
            )

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        service, relay = self._ready(), self._ready_relay()
        openai_endpoint = str(data["model_params"].get("openai_endpoint", ""))
        unsupported = unsupported_stream(self.config.callback_protocol, openai_endpoint)
        if unsupported is not None:
            return SubmitStreamingTaskResponse(error_code=400, error_message=unsupported)
        refusal = await self._unavailable()
        if refusal is not None:
            return SubmitStreamingTaskResponse(**refusal)
        stream = await relay.open()
        params = {**data["model_params"], "api_port": self.config.api_port, **self._callback_fields(stream)}
        try:
            task_id = await self._submit(service, params)
        except globus_sdk.GlobusError as exc:
            failure = self._globus_failed(exc)
            await stream.fail(failure.status, failure.message)
            await drain(stream)
            return SubmitStreamingTaskResponse(
                error_code=failure.status, error_message=failure.message, retryable=failure.retryable
            )
        watcher = asyncio.create_task(self._watch(service, task_id, stream))
        events = client_events(stream, openai_endpoint)
        return SubmitStreamingTaskResponse(response=with_watcher(events, watcher), task_id=task_id)

    async def submit_task_async(self, data: dict[str, Any]) -> SubmitTaskAsyncResponse:
        """See adaptors/compute_tasks.py."""
        refusal = await self._unavailable()
        if refusal is not None:
            return SubmitTaskAsyncResponse(**refusal)
        config = self.config
        started = await start_task(
            self._ready(), config.endpoint_uuid, config.function_uuid, data, config.endpoint_config_fields
        )
        if started.task_id is not None:
            self._triggered_at = time.monotonic()
        return started

    async def get_task_result(self, task_id: str) -> GetTaskResultResponse:
        return await task_result(self._ready(), task_id)

    def has_batch_enabled(self) -> bool:
        return bool(self.config.batch_endpoint_uuid and self.config.batch_function_uuid)

    async def submit_batch(self, batch_data: dict[str, Any], username: str) -> SubmitBatchResponse:
        """See adaptors/compute_batches.py."""
        if not (self.config.batch_endpoint_uuid and self.config.batch_function_uuid):
            return await super().submit_batch(batch_data, username)
        payload = batch_payload(batch_data, username)
        try:
            task_id = await self._ready().submit(
                self.config.batch_endpoint_uuid, self.config.batch_function_uuid, payload
            )
        except globus_sdk.GlobusError as exc:
            failure = self._globus_failed(exc)
            return SubmitBatchResponse(error_code=failure.status, error_message=failure.message)
        return SubmitBatchResponse(
            batch_id=payload["batch_id"], task_ids=task_id, status=BatchStatusEnum.pending
        )

    async def get_batch_status(self, batch: Any) -> GetBatchStatusResponse:
        task_ids = task_ids_of(batch)
        if not task_ids:
            return GetBatchStatusResponse(error_code=400, error_message="The batch has no task.")
        service = self._ready()
        try:
            documents = await service.statuses(task_ids)
        except globus_sdk.GlobusError as exc:
            failure = self._globus_failed(exc)
            return GetBatchStatusResponse(error_code=failure.status, error_message=failure.message)
        documents_in_order = [documents.get(task_id, {}) for task_id in task_ids]
        return batch_status(service, documents_in_order, self.config.accept_dill_results)

    async def _watch(self, service: ComputeService, task_id: str, stream: RelayStream) -> None:
        """The task's own end also ends the stream: a failure before any callback is not a silence,
        and a result that reports a failed stream (the existing function's way) is a failure."""
        try:
            value = await self._result(service, task_id)
        except TaskFailed as exc:
            remote = self._task_failed(exc)
            await stream.fail(remote.status, remote.message)
        except UnreadableResult as exc:
            await stream.fail(502, str(exc))
        except TimeoutError:
            return
        else:
            failure = stream_failure(value)
            if failure is None:
                await stream.finish()
            else:
                self._telemetry.upstream_error(self.endpoint_slug, "4xx" if failure[0] < 500 else "5xx")
                await stream.fail(*failure)

    def _pushes(self, service: ComputeService) -> bool:
        """Whether to have this answer pushed: only while few requests await theirs (see
        adaptors/compute_push.py, `PUSH_WHILE_WAITING_FOR`)."""
        return self.config.pushes and self._relay is not None and service.answering < PUSH_WHILE_WAITING_FOR

    def _callback_fields(self, stream: RelayStream) -> dict[str, Any]:
        """Where and how the function POSTs to the gateway's callback routes."""
        target = self._ready_relay().callback
        return {
            "streaming_server_host": target.host,
            "streaming_server_port": target.port,
            "streaming_server_protocol": target.protocol,
            "stream_task_id": stream.stream_id,
            "stream_task_token": stream.token,
        }

    def _ready_relay(self) -> StreamRelay:
        if self._relay is None:
            raise RuntimeError("GlobusComputeEndpoint needs the gateway's stream relay")
        return self._relay

    async def _result(self, service: ComputeService, task_id: str) -> Any:
        timeout, accept_dill = self.config.task_timeout_seconds, self.config.accept_dill_results
        return await service.result(task_id, timeout, self._queued, accept_dill)

    def _queued(self, seconds: float) -> None:
        self._telemetry.phase(self.endpoint_slug, "queue", seconds)

    def _globus_failed(self, exc: globus_sdk.GlobusError) -> TransportFailure:
        """Globus Compute did not take or report a task. Logged by type, never by text, which may
        name the gateway's credentials or hosts."""
        failure = transport_failure(exc, GLOBUS_COMPUTE)
        log.warning("Globus Compute failed a call for %s: %s", self.endpoint_slug, type(exc).__name__)
        self._telemetry.upstream_error(self.endpoint_slug, failure.kind)
        return failure

    def _task_failed(self, exc: TaskFailed) -> RemoteFailure:
        """Its detail (the function's own text) goes to the log for streams, which have no record of
        it, and to the record for plain requests."""
        failure = remote_error(str(exc))
        self._telemetry.upstream_error(self.endpoint_slug, "4xx" if failure.status < 500 else "5xx")
        if failure.detail is not None:
            log.warning("task on %s failed: %s", self.endpoint_slug, failure.detail[:2000])
        return failure

    async def _submit(self, service: ComputeService, params: dict[str, Any]) -> str:
        task_id = await service.submit(
            self.config.endpoint_uuid, self.config.function_uuid, {"model_params": params}
        )
        self._triggered_at = time.monotonic()
        return task_id

    async def _unavailable(self) -> dict[str, Any] | None:
        """Why not to submit now (the error fields of a 503): the endpoint is offline, or its model
        is still loading, in which case the client is told to come back when it should be loaded."""
        status = await self._endpoint_status()
        if status is None:
            return None
        if status.get("status") != "online":
            return {
                "error_code": 503,
                "error_message": f"The compute endpoint of {self.cluster} is offline; try again later.",
            }
        managers = (status.get("details") or {}).get("managers")
        since = None if self._triggered_at is None else time.monotonic() - self._triggered_at
        if managers == 0 and since is not None and since < self.config.cold_start_seconds:
            wait = max(MIN_RETRY_AFTER_SECONDS, self.config.loading_estimate_seconds - since)
            return {
                "error_code": 503,
                "error_message": (
                    f"The model {self.model} is starting on {self.cluster}; try again in {wait:.0f} seconds."
                ),
                "retry_after": wait,
            }
        return None

    async def _endpoint_status(self) -> dict[str, Any] | None:
        """Cached; a burst of requests shares one status call instead of each making its own."""
        cached = self._status
        if cached is not None and time.monotonic() - cached[0] < self.config.status_cache_seconds:
            return cached[1]
        if self._status_call is None or self._status_call.done():
            self._status_call = asyncio.ensure_future(self._read_status())
        return await asyncio.shield(self._status_call)

    async def _read_status(self) -> dict[str, Any] | None:
        try:
            status = await self._ready().endpoint_status(self.config.endpoint_uuid)
        except globus_sdk.GlobusError as exc:
            log.warning("cannot read the status of %s: %s", self.endpoint_slug, type(exc).__name__)
            return None
        self._status = (time.monotonic(), status)
        return status

    def _timeout(self, task_id: str) -> str:
        return (
            f"Task {task_id} did not finish within {self.config.task_timeout_seconds:g} seconds; "
            "the model may still be loading. Try again later."
        )

    def _ready(self) -> ComputeService:
        if self._service is None:
            raise RuntimeError("GlobusComputeEndpoint used before startup()")
        return self._service
