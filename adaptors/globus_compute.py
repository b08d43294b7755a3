"""Adaptors for models served by Globus Compute functions on HPC clusters.

The existing gateway's functions run unchanged: the same payload
`{"model_params": {<client's fields>, "openai_endpoint", "api_port", [streaming fields]}}` and the
same streaming callbacks. Results come from one poller per process and credentials, which asks
the service about every task in flight at once; no AMQP and no polling loop per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import globus_sdk
import requests.adapters
from globus_compute_sdk.sdk.batch import Batch
from globus_compute_sdk.serialize import AllowlistWildcard, ComputeSerializer, JSONData
from globus_sdk.transport import RequestsTransport, RetryConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptors.cluster import BaseCluster, GetJobsResponse, JobInfo, Jobs
from adaptors.compute_credentials import with_endpoint_credentials
from adaptors.compute_jobs import StatusReader, mark_disconnected
from adaptors.compute_results import UnreadableResult, read_result
from adaptors.compute_streams import (
    CallbackProtocol,
    client_events,
    close,
    stream_failure,
    unsupported_stream,
)
from adaptors.compute_tasks import start_task, task_result
from adaptors.context import AdaptorContext
from adaptors.endpoint import (
    BaseEndpoint,
    BatchStatusEnum,
    GetBatchStatusResponse,
    GetTaskResultResponse,
    StreamError,
    SubmitBatchResponse,
    SubmitStreamingTaskResponse,
    SubmitTaskAsyncResponse,
    SubmitTaskResponse,
)
from adaptors.relay import RelayStream, StreamRelay
from adaptors.remote_errors import RemoteFailure, remote_error
from adaptors.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)

UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
HTTP_URL = r"^https?://\S+$"
RESULT_SERIALIZERS = ["globus_compute_sdk.serialize.JSONData"]
MAX_TASKS_PER_POLL = 1000
HTTP_POOL_SIZE = 64
MIN_RETRY_AFTER_SECONDS = 10
Result = TypeVar("Result")


class ComputeAccess(BaseModel):
    """Who the gateway is to Globus Compute, and where the services are.

    Credentials default to the existing gateway's SERVICE_ACCOUNT_ID / SERVICE_ACCOUNT_SECRET;
    URLs default to globus-sdk's (GLOBUS_SDK_SERVICE_URL_COMPUTE / _AUTH, or production).
    """

    model_config = ConfigDict(extra="forbid")

    client_id: str | None = None
    client_secret: str | None = None
    compute_url: str | None = Field(default=None, pattern=HTTP_URL)
    auth_url: str | None = Field(default=None, pattern=HTTP_URL)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    http_timeout_seconds: float = Field(default=10, gt=0)

    def credentials(self) -> tuple[str, str]:
        client_id = self.client_id or os.environ.get("SERVICE_ACCOUNT_ID")
        secret = self.client_secret or os.environ.get("SERVICE_ACCOUNT_SECRET")
        if not client_id or not secret:
            raise ValueError(
                "client_id and client_secret: not configured, and SERVICE_ACCOUNT_ID / "
                "SERVICE_ACCOUNT_SECRET are not set"
            )
        return client_id, secret


class GlobusComputeEndpointConfig(ComputeAccess):
    api_port: int = Field(ge=1, le=65535)
    endpoint_uuid: str = Field(pattern=UUID)
    function_uuid: str = Field(pattern=UUID)
    batch_endpoint_uuid: str | None = Field(default=None, pattern=UUID)
    batch_function_uuid: str | None = Field(default=None, pattern=UUID)
    task_timeout_seconds: float = Field(default=600, gt=0)
    status_cache_seconds: float = Field(default=60, ge=0)
    cold_start_seconds: float = Field(default=1800, ge=0)
    endpoint_config_fields: dict[str, str] = Field(
        default_factory=dict,
        description="asynchronous tasks: body field → user_endpoint_config key it moves to",
    )
    loading_estimate_seconds: float = Field(default=300, gt=0)
    callback_protocol: CallbackProtocol = "existing"
    accept_dill_results: bool = False
    """Trust the site's own Compute endpoint with results in dill (older endpoints ignore JSON)."""


class GlobusComputeClusterConfig(ComputeAccess):
    qstat_endpoint_uuid: str = Field(pattern=UUID)
    qstat_function_uuid: str = Field(pattern=UUID)
    task_timeout_seconds: float = Field(default=60, gt=0)
    accept_dill_results: bool = False


class TaskFailed(Exception):
    """The remote function raised; the text is the remote error."""


@dataclass
class _Pending:
    future: asyncio.Future[Any]
    deadline: float
    submitted: float
    on_started: Callable[[float], None] | None
    accept_dill: bool
    started: bool = False


@dataclass
class ComputeService:
    """The SDK clients and the result poller for one set of credentials, shared in a process."""

    access: ComputeAccess
    executor: Executor
    telemetry: Telemetry
    users: int = 0
    _clients: tuple[globus_sdk.ComputeClientV2, globus_sdk.ComputeClientV3] | None = None
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _poller: asyncio.Task[None] | None = None
    _serializer: ComputeSerializer = field(default_factory=lambda: _json_serializer())

    async def submit(
        self,
        endpoint_uuid: str,
        function_uuid: str,
        *args: Any,
        endpoint_config: dict[str, Any] | None = None,
    ) -> str:
        """`endpoint_config` is the task's `user_endpoint_config`, which the endpoint's template reads."""

        def send() -> str:
            batch = Batch(
                task_group_id=None,
                serializer=self._serializer,
                result_serializers=RESULT_SERIALIZERS,
                request_queue=False,
                user_endpoint_config=endpoint_config or None,
            )
            batch.add(function_uuid, args=args)
            answer = self._sdk()[1].submit(endpoint_uuid, batch.prepare())
            return str(answer["tasks"][function_uuid][0])

        return await self._blocking(send)

    async def result(
        self,
        task_id: str,
        timeout: float,
        on_started: Callable[[float], None] | None = None,
        accept_dill: bool = False,
    ) -> Any:
        """The task's return value. A timeout gives up waiting; the task itself keeps running.
        `on_started` gets the seconds the task waited for the endpoint (to a poll's resolution).
        Raises `TaskFailed`, `UnreadableResult` or `TimeoutError`."""
        future = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._pending[task_id] = _Pending(future, now + timeout, now, on_started, accept_dill)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        self.telemetry.tasks_in_flight(1)
        try:
            return await future
        finally:
            self.telemetry.tasks_in_flight(-1)
            self._pending.pop(task_id, None)

    async def endpoint_status(self, endpoint_uuid: str) -> dict[str, Any]:
        return await self._blocking(lambda: dict(self._sdk()[0].get_endpoint_status(endpoint_uuid).data))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    async def _poll(self) -> None:
        while self._pending:
            await asyncio.sleep(self.access.poll_interval_seconds)
            self._expire()
            task_ids = list(self._pending)[:MAX_TASKS_PER_POLL]
            if not task_ids:
                continue
            try:
                asked = time.monotonic()
                documents = await self.statuses(task_ids)
                self.telemetry.poll(time.monotonic() - asked)
            except globus_sdk.GlobusError as exc:
                log.warning("Globus Compute status poll failed: %s", type(exc).__name__)
                continue
            except Exception:
                log.exception("Globus Compute status poll failed")
                continue
            for task_id, document in documents.items():
                self._settle(task_id, document)

    async def statuses(self, task_ids: list[str]) -> dict[str, Any]:
        """The raw task documents, for every id at once (`get_batch_result` would drop failures)."""

        def ask() -> dict[str, Any]:
            answer = self._sdk()[0].get_task_batch(task_ids)
            results = answer.data.get("results", {}) if isinstance(answer.data, dict) else {}
            return dict(results)

        return await self._blocking(ask)

    def value(self, document: dict[str, Any], accept_dill: bool = False) -> Any:
        """A finished task's return value: JSON, or with `accept_dill` plain data pickled by dill."""
        return read_result(self._serializer, str(document["result"]), accept_dill)

    def _settle(self, task_id: str, document: dict[str, Any]) -> None:
        pending = self._pending.get(task_id)
        if pending is None or pending.future.done():
            return
        status = str(document.get("status", "")).lower()
        if status in ("running", "success", "failed") and not pending.started:
            pending.started = True
            if pending.on_started is not None:
                pending.on_started(time.monotonic() - pending.submitted)
        if status == "success" and "result" in document:
            try:
                pending.future.set_result(self.value(document, pending.accept_dill))
            except UnreadableResult as exc:
                pending.future.set_exception(exc)
        elif status == "failed" or "exception" in document:
            pending.future.set_exception(TaskFailed(str(document.get("exception") or document.get("reason"))))

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in self._pending.values():
            if now >= pending.deadline and not pending.future.done():
                pending.future.set_exception(TimeoutError())

    async def _blocking(self, call: Callable[[], Result]) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def _sdk(self) -> tuple[globus_sdk.ComputeClientV2, globus_sdk.ComputeClientV3]:
        """Built on first use, in a worker thread: the authorizer fetches a token as it is built."""
        if self._clients is None:
            client_id, secret = self.access.credentials()
            transport = _pooled_transport(self.access.http_timeout_seconds)
            retries = RetryConfig(max_retries=2, max_sleep=2)
            auth = globus_sdk.ConfidentialAppAuthClient(
                client_id, secret, base_url=self.access.auth_url, transport=transport, retry_config=retries
            )
            authorizer = globus_sdk.ClientCredentialsAuthorizer(auth, globus_sdk.ComputeClientV2.scopes.all)
            options: dict[str, Any] = {
                "base_url": self.access.compute_url,
                "authorizer": authorizer,
                "transport": transport,
                "retry_config": retries,
            }
            self._clients = (globus_sdk.ComputeClientV2(**options), globus_sdk.ComputeClientV3(**options))
        return self._clients


def _pooled_transport(timeout: float) -> RequestsTransport:
    """`requests` keeps 10 connections per host by default, fewer than the threads calling it:
    every extra call would open (and log discarding) a new connection."""
    transport = RequestsTransport(http_timeout=timeout)
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=HTTP_POOL_SIZE)
    for scheme in ("https://", "http://"):
        transport.session.mount(scheme, adapter)
    return transport


def _json_serializer() -> ComputeSerializer:
    """Arguments and results travel as JSON; a result in any other form (dill, which would run
    code in the gateway) is refused."""
    return ComputeSerializer(
        strategy_data=JSONData(),  # type: ignore[no-untyped-call]
        allowed_deserializer_types=[JSONData, AllowlistWildcard.CODE],
    )


_services: dict[tuple[Any, ...], ComputeService] = {}


def _acquire(access: ComputeAccess, context: AdaptorContext) -> ComputeService:
    """One service (and so one poller) per process for each credentials and URLs."""
    client_id, secret = access.credentials()
    key = (client_id, secret, access.compute_url, access.auth_url)
    service = _services.get(key)
    if service is None:
        service = _services[key] = ComputeService(access, context.executor, context.telemetry)
    service.users += 1
    return service


async def _release(service: ComputeService) -> None:
    service.users -= 1
    if service.users == 0:
        await service.close()
        _services.pop(next(k for k, v in _services.items() if v is service), None)


def _unwrap(value: Any) -> str:
    """The functions return a JSON string; anything else is encoded here."""
    if isinstance(value, str):
        json.loads(value)
        return value
    return json.dumps(value)


_serving: dict[tuple[str, str, str], GlobusComputeEndpoint] = {}
"""(cluster, framework, model) → the started endpoint, for the cluster's job report."""


class GlobusComputeEndpoint(BaseEndpoint):
    def __init__(
        self,
        id: str,
        endpoint_slug: str,
        cluster: str,
        framework: str,
        model: str,
        endpoint_adapter: str,
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id, endpoint_slug, cluster, framework, model, endpoint_adapter,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self.config = GlobusComputeEndpointConfig.model_validate(
            with_endpoint_credentials(config or {}, "endpoint_uuid")
        )
        self.config.credentials()
        self._service: ComputeService | None = None
        self._relay: StreamRelay | None = None
        self._telemetry: Telemetry = NoTelemetry()
        self._status: tuple[float, dict[str, Any]] | None = None
        self._status_call: asyncio.Future[dict[str, Any] | None] | None = None
        self._triggered_at: float | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._service = _acquire(self.config, context)
        self._relay = context.relay
        self._telemetry = context.telemetry
        _serving[(self.cluster, self.framework, self.model)] = self

    async def shutdown(self) -> None:
        if _serving.get((self.cluster, self.framework, self.model)) is self:
            del _serving[(self.cluster, self.framework, self.model)]
        if self._service is not None:
            await _release(self._service)

    async def endpoint_status(self) -> dict[str, Any] | None:
        """The Compute endpoint's status (cached), None when it cannot be read."""
        return await self._endpoint_status()

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        service = self._ready()
        refusal = await self._unavailable()
        if refusal is not None:
            return SubmitTaskResponse(**refusal)
        params = {**data["model_params"], "api_port": self.config.api_port}
        try:
            task_id = await self._submit(service, params)
        except globus_sdk.GlobusError as exc:
            self._telemetry.upstream_error(self.endpoint_slug, "connect")
            return SubmitTaskResponse(**_submit_refused(exc))
        try:
            value = await self._result(service, task_id)
            return SubmitTaskResponse(result=_unwrap(value), task_id=task_id)
        except TimeoutError:
            self._telemetry.upstream_error(self.endpoint_slug, "timeout")
            return SubmitTaskResponse(error_code=504, error_message=self._timeout(task_id), task_id=task_id)
        except TaskFailed as exc:
            failure = self._task_failed(exc)
            return SubmitTaskResponse(
                error_code=failure.status,
                error_message=failure.message,
                error_detail=failure.detail,
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
        service, relay = self._ready(), self._relay
        if relay is None:
            raise RuntimeError("GlobusComputeEndpoint needs the gateway's stream relay")
        openai_endpoint = str(data["model_params"].get("openai_endpoint", ""))
        unsupported = unsupported_stream(self.config.callback_protocol, openai_endpoint)
        if unsupported is not None:
            return SubmitStreamingTaskResponse(error_code=400, error_message=unsupported)
        refusal = await self._unavailable()
        if refusal is not None:
            return SubmitStreamingTaskResponse(**refusal)
        stream = await relay.open()
        target = relay.callback
        params = {
            **data["model_params"],
            "api_port": self.config.api_port,
            "streaming_server_host": target.host,
            "streaming_server_port": target.port,
            "streaming_server_protocol": target.protocol,
            "stream_task_id": stream.stream_id,
            "stream_task_token": stream.token,
        }
        try:
            task_id = await self._submit(service, params)
        except globus_sdk.GlobusError as exc:
            refused = _submit_refused(exc)
            await stream.fail(refused["error_code"], refused["error_message"])
            await _drain(stream)
            return SubmitStreamingTaskResponse(**refused)
        watcher = asyncio.create_task(self._watch(service, task_id, stream))
        events = client_events(stream, openai_endpoint)
        return SubmitStreamingTaskResponse(response=_with_watcher(events, watcher), task_id=task_id)

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
        """The existing batch function's payload: file paths on the cluster, the batch id and user."""
        if not (self.config.batch_endpoint_uuid and self.config.batch_function_uuid):
            return await super().submit_batch(batch_data, username)
        batch_id = str(batch_data["batch_id"])
        fields = ("input_file", "model", "output_folder_path")
        params = {key: batch_data[key] for key in fields if batch_data.get(key) is not None}
        payload = {"model_params": params, "batch_id": batch_id, "username": username}
        try:
            task_id = await self._ready().submit(
                self.config.batch_endpoint_uuid, self.config.batch_function_uuid, payload
            )
        except globus_sdk.GlobusError as exc:
            return SubmitBatchResponse(error_code=503, error_message=_submit_failure(exc))
        return SubmitBatchResponse(batch_id=batch_id, task_ids=task_id, status=BatchStatusEnum.pending)

    async def get_batch_status(self, batch: Any) -> GetBatchStatusResponse:
        """`batch` is the gateway's record of it; its `task_ids` are comma-separated."""
        task_ids = [task_id for task_id in str(batch.task_ids or "").split(",") if task_id]
        if not task_ids:
            return GetBatchStatusResponse(error_code=400, error_message="The batch has no task.")
        service = self._ready()
        try:
            documents = await service.statuses(task_ids)
        except globus_sdk.GlobusError as exc:
            return GetBatchStatusResponse(error_code=503, error_message=_submit_failure(exc))
        documents_in_order = [documents.get(task_id, {}) for task_id in task_ids]
        return _batch_status(service, documents_in_order, self.config.accept_dill_results)

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

    async def _result(self, service: ComputeService, task_id: str) -> Any:
        timeout, accept_dill = self.config.task_timeout_seconds, self.config.accept_dill_results
        return await service.result(task_id, timeout, self._queued, accept_dill)

    def _queued(self, seconds: float) -> None:
        self._telemetry.phase(self.endpoint_slug, "queue", seconds)

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


async def _with_watcher(events: AsyncIterator[bytes], watcher: asyncio.Task[None]) -> AsyncIterator[bytes]:
    """A failure before the first chunk is the task's (it failed, or it is still running after the
    first-chunk limit): a retry would run it again. Only an unavailable relay (503) is worth one."""
    try:
        async for chunk in events:
            yield chunk
    except StreamError as exc:
        if exc.code == 503:
            raise
        raise StreamError(exc.message, exc.code, retryable=False) from exc
    finally:
        watcher.cancel()
        await close(events)


async def _drain(stream: RelayStream) -> None:
    """Release a stream that never reached a client."""
    events = stream.events()
    try:
        async for _ in events:
            pass
    except StreamError:
        pass


def _batch_status(
    service: ComputeService, documents: list[dict[str, Any]], accept_dill: bool
) -> GetBatchStatusResponse:
    states = [str(document.get("status", "")).lower() for document in documents]
    if "failed" in states:
        failed = documents[states.index("failed")]
        message = str(failed.get("exception") or failed.get("reason") or "The batch task failed.")
        return GetBatchStatusResponse(status=BatchStatusEnum.failed, error_message=message[-2000:])
    if states and all(state == "success" for state in states):
        try:
            values = [_unwrap(service.value(document, accept_dill)) for document in documents]
        except UnreadableResult as exc:
            return GetBatchStatusResponse(status=BatchStatusEnum.failed, error_message=str(exc))
        except ValueError:
            return GetBatchStatusResponse(
                status=BatchStatusEnum.failed, error_message="Unreadable batch result."
            )
        result = values[0] if len(values) == 1 else "[" + ",".join(values) + "]"
        return GetBatchStatusResponse(status=BatchStatusEnum.completed, result=result)
    running = any(state in ("running", "success") for state in states)
    return GetBatchStatusResponse(status=BatchStatusEnum.running if running else BatchStatusEnum.pending)


def _submit_refused(exc: globus_sdk.GlobusError) -> dict[str, Any]:
    """The error fields for a submission Globus did not take. Refused outright (a 4xx other than
    429: an unknown endpoint or function, no permission, bad credentials), it is the gateway's
    configuration: retrying cannot help. Otherwise (unreachable, 5xx, 429) it is worth a retry."""
    status = exc.http_status if isinstance(exc, globus_sdk.GlobusAPIError) else None
    if status is not None and 400 <= status < 500 and status != 429:
        log.warning("Globus Compute refused the task: %s %s", status, type(exc).__name__)
        message = (
            "Globus Compute refused the task: the gateway's configuration of this endpoint needs fixing."
        )
        return {"error_code": 502, "error_message": message, "retryable": False}
    return {"error_code": 503, "error_message": _submit_failure(exc)}


def _submit_failure(exc: globus_sdk.GlobusError) -> str:
    log.warning("Globus Compute submission failed: %s", type(exc).__name__)
    return "Globus Compute did not accept the task; try again shortly."


class GlobusComputeCluster(BaseCluster):
    """Runs the site's qstat function to learn which models run, queue or are stopped."""

    def __init__(
        self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: Iterable[str],
        openai_endpoints: Iterable[str],
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id, cluster_name, cluster_adapter, frameworks, openai_endpoints,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self.config = GlobusComputeClusterConfig.model_validate(
            with_endpoint_credentials(config or {}, "qstat_endpoint_uuid")
        )
        self.config.credentials()
        self._service: ComputeService | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._service = _acquire(self.config, context)

    async def shutdown(self) -> None:
        if self._service is not None:
            await _release(self._service)

    async def get_jobs(self) -> GetJobsResponse:
        if self._service is None:
            raise RuntimeError("GlobusComputeCluster used before startup()")
        config = self.config
        try:
            task_id = await self._service.submit(config.qstat_endpoint_uuid, config.qstat_function_uuid)
            value = await self._service.result(
                task_id, config.task_timeout_seconds, accept_dill=config.accept_dill_results
            )
        except globus_sdk.GlobusError as exc:
            return GetJobsResponse(error_code=503, error_message=_submit_failure(exc))
        except TimeoutError:
            return GetJobsResponse(
                error_code=504, error_message="The cluster's status task did not finish in time."
            )
        except TaskFailed as exc:
            return GetJobsResponse(
                error_code=502, error_message=f"The cluster's status task failed: {exc}"[:500]
            )
        except UnreadableResult as exc:
            return GetJobsResponse(error_code=502, error_message=str(exc))
        try:
            jobs = Jobs.model_validate_json(_unwrap(value))
        except (ValueError, ValidationError):
            return GetJobsResponse(
                error_code=502, error_message="The cluster's status task returned no jobs report."
            )
        await mark_disconnected(jobs, self._status_reader)
        return GetJobsResponse(jobs=jobs)

    def _status_reader(self, job: JobInfo) -> StatusReader | None:
        """The existing gateway looks up a job's first model."""
        model = job.Models.split(",")[0].strip()
        endpoint = _serving.get((self.cluster_name, job.Framework, model))
        return None if endpoint is None else endpoint.endpoint_status
