"""The Globus Compute service as adaptors use it: submitting tasks and waiting for their results.

One `ComputeService` per gateway and set of credentials holds the SDK clients and one result
poller, which asks the service about every task in flight at once: no AMQP and no polling loop
per request. Adaptors get it from `AdaptorContext.shared` (`acquire_service`), so every endpoint
and cluster with the same credentials shares it, and the last one to shut down closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import globus_sdk
import requests.adapters
from globus_compute_sdk.sdk.batch import Batch
from globus_compute_sdk.serialize import AllowlistWildcard, ComputeSerializer, JSONData
from globus_sdk.transport import RequestsTransport, RetryConfig

from adaptors.compute_config import ComputeAccess
from adaptors.compute_results import UnreadableResult, read_result
from adaptors.context import AdaptorContext
from adaptors.telemetry import Telemetry

log = logging.getLogger(__name__)

GLOBUS_COMPUTE = "Globus Compute"
"""The service's name in what clients are told (see adaptors/transport.py)."""
RESULT_SERIALIZERS = ["globus_compute_sdk.serialize.JSONData"]
MAX_TASKS_PER_POLL = 1000
HTTP_POOL_SIZE = 64
Result = TypeVar("Result")


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
    """The SDK clients and the result poller for one set of credentials, shared in a gateway."""

    access: ComputeAccess
    key: Hashable
    """What it is shared under: `access.service_key()` when it was made."""
    executor: Executor
    telemetry: Telemetry
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


def acquire_service(access: ComputeAccess, context: AdaptorContext) -> ComputeService:
    """The gateway's service for these credentials and URLs; `release_service` it at shutdown."""
    key = access.service_key()

    def make() -> ComputeService:
        return ComputeService(access, key, context.executor, context.telemetry)

    return context.shared.acquire(ComputeService, key, make)


async def release_service(service: ComputeService, context: AdaptorContext) -> None:
    """The last user closes it (its poller)."""
    if context.shared.release(ComputeService, service.key) is not None:
        await service.close()
