"""A local fake of the Globus Compute web service and the endpoints behind it, faithful at the HTTP boundary.

The gateway submits work through globus-sdk's ``ComputeClientV3`` / ``ComputeClientV2`` with payloads packed
by globus-compute-sdk's serializer. This fake serves the same paths and documents as the real service, so the
real SDKs can be pointed at it::

    ComputeClientV3(base_url=fake.url, authorizer=...).submit(endpoint_id, batch.prepare())
    ComputeClientV2(base_url=fake.url, authorizer=...).get_task_batch(task_ids)

Instead of shipping tasks to an HPC site, each submitted task runs a Python callable registered with
:meth:`FakeCompute.register_function`, for real, in its own thread: it may block on HTTP (the tests' remote
functions call a fake vLLM and post streaming callbacks to the gateway). Its return value or exception is
encoded exactly as a ``globus-compute-endpoint`` worker encodes it.

Verified against the installed SDKs (globus-sdk 4.9.1, globus-compute-sdk 4.19.0) and public sources:

- paths, and the request bodies the SDK sends (``ComputeClientV3.submit``, ``ComputeClientV2.get_task_batch``,
  ``get_task``, ``get_endpoint_status``); the body of a submit is ``Batch.prepare()``;
- the submit answer ``{request_id, task_group_id, endpoint_id, tasks: {function_id: [task_id]}}``, the
  ``batch_status`` answer ``{"response": "batch", "results": {task_id: document}}``, the task document
  ``{task_id, status, result, completion_t, details}`` and the endpoint status document: the example documents
  in ``globus_sdk.testing.data.compute``, and how ``globus_compute_sdk.Client`` / ``Executor`` read them
  (a task counts as finished only once ``completion_t`` is set);
- payloads: ``pack_buffers([serialize(args), serialize(kwargs)])``; the function is not in the payload (the
  service adds the registered function's code);
- results: the endpoint worker (``globus_compute_endpoint.engines.helper.execute_task``) answers
  ``ComputeSerializer.serialize_from_list(value, result_serializers)``; the default data strategy is dill;
  an older endpoint (``add_endpoint(..., honours_result_serializers=False)``) ignores the task's
  ``result_serializers`` and answers ``ComputeSerializer().serialize(value)``: ``00\n`` and the base64 of
  a dill pickle (``DillDataBase64``), whatever the submitter asked for;
- exceptions: the worker sends plain text, not a serialized object: ``traceback.format_exception`` without
  its own two innermost frames (``exception_handling.get_error_string``), or ``repr(exc)`` for its internal
  errors such as ``MaxResultSizeExceeded``. The SDK wraps that text in ``TaskExecutionFailed``.

Assumed (the modern service is closed source): error bodies (``{"code", "message"}``, codes named after the
last public funcX web service, which answered 404 for unknown endpoints, functions and tasks), 422 for
malformed requests (the API is a FastAPI application, judging by its operation ids), the details of endpoint
status beyond ``status`` and ``managers``, the answer for unknown ids in ``batch_status`` (copied from the old
funcX service), and that results stay readable after the first read (the old service deleted them).
Not modelled: per-user access to endpoints, functions and tasks; task groups beyond echoing their id and
their result queue.

Result queues: given a RabbitMQ broker (``result_broker_url``), the fake hands out its URL (``GET
/v2/get_amqp_result_connection_url``), declares a task group's queue when a submit asks for one
(``"create_queue": true``, as the SDK's ``Executor`` does) and pushes each of its finished tasks' Result
there (``compute_results_queue.py``: the message, and what is assumed); results stay pollable as well.
Without a broker that route answers 503, as the real one could while its broker is away.

The tasks and endpoints themselves, and how a worker runs a task, are in ``compute_tasks.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from globus_compute_sdk.sdk.utils import get_env_details

from testing.fake_globus.compute_requests import (
    RecordedRequest,
    RequestError,
    canonical_uuid,
    compute_error,
    json_object,
    submission,
)
from testing.fake_globus.compute_results_queue import QUEUE_PREFIX, ResultPublisher
from testing.fake_globus.compute_tasks import (
    FAILED,
    ONLINE,
    RESULT_SIZE_LIMIT,
    RUNNING,
    SUCCESS,
    FakeEndpoint,
    FakeTask,
    check_status,
    execute,
    in_daemon_thread,
    online,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeCompute:
    """The Globus Compute web service (submit, task status, endpoint status) with in-process endpoints.

    Knobs that may be changed at any time, also while the gateway under test is running: ``queue_delay``
    (seconds a task stays ``waiting-for-ep`` before it runs), ``fail_status`` (every request answers this
    status), ``delay`` (every answer waits this long), ``result_size_limit``, ``publish_results`` (False:
    the service stops pushing results to result queues), ``high_assurance_results`` (True: pushed results
    carry no data, only the header that makes a consumer poll for it), ``persistent_results`` (False:
    results go out as transient messages, which cost the broker a third as much), and endpoints through
    :meth:`set_endpoint`. Mutate state from the event loop the fake runs on (the test's loop).
    """

    def __init__(
        self, *, accepted_tokens: Callable[[str], bool] | None = None, result_broker_url: str | None = None
    ) -> None:
        """``accepted_tokens`` decides which bearer tokens are valid, e.g.
        ``lambda token: token in fake_globus.issued_tokens``; ``None`` accepts any bearer token.
        ``result_broker_url`` (an ``amqp://`` URL, e.g. ``RabbitMQServer.url``) enables result queues."""
        self.accepted_tokens = accepted_tokens
        self.result_broker_url = result_broker_url
        self.queue_prefix = QUEUE_PREFIX
        self.publish_results = True
        self.high_assurance_results = False
        self.persistent_results = True
        self.result_queues: ResultPublisher | None = None
        self.requests: list[RecordedRequest] = []
        self.tasks: dict[str, FakeTask] = {}
        self.queue_delay = 0.0
        self.fail_status: int | None = None
        self.delay = 0.0
        self.result_size_limit = RESULT_SIZE_LIMIT
        self._endpoints: dict[str, FakeEndpoint] = {}
        self._functions: dict[str, Callable[..., Any]] = {}
        self._runs: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0

    # -- setup -------------------------------------------------------------------------------------------

    def add_endpoint(
        self,
        endpoint_id: str,
        *,
        status: str = ONLINE,
        managers: int = 1,
        honours_result_serializers: bool = True,
    ) -> None:
        """Register an endpoint (a UUID, as the service requires) that tasks may be submitted to."""
        check_status(status)
        endpoint_id = str(uuid.UUID(endpoint_id))
        self._endpoints[endpoint_id] = FakeEndpoint(endpoint_id, status, managers, honours_result_serializers)

    def set_endpoint(
        self, endpoint_id: str, *, status: str | None = None, managers: int | None = None
    ) -> None:
        """Change an endpoint: taking it offline holds its tasks (waiting ones, and the results of running
        ones, which reach the service only through a connected endpoint); online again releases them."""
        endpoint = self._endpoints[str(uuid.UUID(endpoint_id))]
        if status is not None:
            check_status(status)
            endpoint.status = status
        if managers is not None:
            endpoint.managers = managers
        previous, endpoint.changed = endpoint.changed, asyncio.Event()
        previous.set()

    def register_function(self, function_id: str, function: Callable[..., Any]) -> None:
        """The callable that runs for tasks of ``function_id`` (a UUID: ``Batch.add`` insists on one)."""
        self._functions[str(uuid.UUID(function_id))] = function

    def task(self, task_id: str) -> FakeTask:
        return self.tasks[task_id]

    def count(self, path_suffix: str) -> int:
        """How many requests hit a path ending with ``path_suffix``."""
        return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    async def settled(self, task_id: str, timeout: float = 5.0) -> FakeTask:
        """Wait until a task has succeeded or failed, as the service will report it."""
        task = self.tasks[task_id]
        await asyncio.wait_for(task.finished.wait(), timeout)
        return task

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``base_url`` for ComputeClientV2 / ComputeClientV3."""
        if not self._port:
            raise RuntimeError("FakeCompute is not started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        """Listen on an ephemeral port; after a stop(), on the same port again (the service coming back)."""
        if self._runner is not None:
            return
        self._loop = asyncio.get_running_loop()
        runner = web.AppRunner(
            self._build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner
        if self.result_broker_url is not None:
            self.result_queues = ResultPublisher(self.result_broker_url)
            await self.result_queues.start()

    async def stop(self, *, keep_tasks: bool = False) -> None:
        """Close the port: the service becomes unreachable. Unless ``keep_tasks`` (an outage of the cloud
        service while endpoints keep working), also abandon all tasks. Threads already running a function
        cannot be interrupted: they are daemon threads and their outcome is dropped."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        publisher, self.result_queues = self.result_queues, None
        if publisher is not None:
            await publisher.close()
        if not keep_tasks:
            runs, self._runs = list(self._runs), set()
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    async def __aenter__(self) -> FakeCompute:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v3/endpoints/{endpoint_id}/submit", self._submit)
        app.router.add_post("/v2/batch_status", self._batch_status)
        app.router.add_get("/v2/tasks/{task_id}", self._get_task)
        app.router.add_get("/v2/endpoints/{endpoint_id}/status", self._endpoint_status)
        app.router.add_get("/v2/get_amqp_result_connection_url", self._result_queue_url)
        return app

    # -- cross-cutting behaviour -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record every request, then apply ``delay``, ``fail_status`` and the bearer-token check."""
        body: Any = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = None
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                json=body,
                authorization=request.headers.get("Authorization"),
                time=time.monotonic(),
                user_agent=request.headers.get("User-Agent"),
            )
        )
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if self.fail_status is not None:
            code = "SERVICE_UNAVAILABLE" if self.fail_status == 503 else "ERROR"
            return compute_error(
                self.fail_status, code, f"fake Compute configured to fail with {self.fail_status}"
            )
        if not self._authorized(request.headers.get("Authorization")):
            return compute_error(401, "UNAUTHORIZED", "invalid or missing bearer token")
        try:
            return await handler(request)
        except RequestError as error:
            return compute_error(error.status, error.code, error.message)
        except web.HTTPNotFound:
            return compute_error(404, "NOT_FOUND", f"no route {request.path}")
        except web.HTTPMethodNotAllowed:
            return compute_error(405, "METHOD_NOT_ALLOWED", f"{request.method} {request.path}")

    def _authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer ") or not header[7:].strip():
            return False
        return self.accepted_tokens is None or self.accepted_tokens(header[7:].strip())

    # -- routes ------------------------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        """All or nothing: an unknown endpoint or function rejects the whole batch before any task exists."""
        endpoint_id = canonical_uuid(request.match_info["endpoint_id"], "endpoint_id")
        body = await json_object(request)
        batches, serializers, create_queue = submission(body)
        if endpoint_id not in self._endpoints:
            raise RequestError(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} could not be resolved")
        functions = {fid: canonical_uuid(fid, "function_id") for fid in batches}
        for function_id in functions.values():
            if function_id not in self._functions:
                raise RequestError(404, "FUNCTION_NOT_FOUND", f"Function {function_id} could not be resolved")
        group = body.get("task_group_id")
        task_group_id = canonical_uuid(group, "task_group_id") if group else str(uuid.uuid4())
        queue = None
        if create_queue and self.result_queues is not None:
            queue = self.queue_prefix + task_group_id
            await self.result_queues.declare(queue)
        answer: dict[str, list[str]] = {}
        for given_id, payloads in batches.items():
            answer[given_id] = [
                self._enqueue(endpoint_id, functions[given_id], task_group_id, payload, serializers)
                for payload in payloads
            ]
            for task_id in answer[given_id]:  # before any of them can run: none has been scheduled yet
                self.tasks[task_id].result_queue = queue
        return web.json_response(
            {
                "request_id": str(uuid.uuid4()),
                "task_group_id": task_group_id,
                "endpoint_id": endpoint_id,
                "tasks": answer,
            }
        )

    async def _batch_status(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        task_ids = body.get("task_ids")
        if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
            raise RequestError(422, "REQUEST_MALFORMED", "task_ids must be a list of strings")
        results: dict[str, dict[str, Any]] = {}
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            # The old funcX service's answer for unknown ids; the SDK reads it as a failure without task_id.
            results[task_id] = task.document() if task else {"status": "Failed", "reason": "Unknown task id"}
        return web.json_response({"response": "batch", "results": results})

    async def _get_task(self, request: web.Request) -> web.Response:
        task_id = canonical_uuid(request.match_info["task_id"], "task_id")
        task = self.tasks.get(task_id)
        if task is None:
            raise RequestError(404, "TASK_NOT_FOUND", f"Task {task_id} not found")
        return web.json_response(task.document())

    async def _result_queue_url(self, request: web.Request) -> web.Response:
        """The real service mints credentials per user; the fake hands out the broker's own URL."""
        if self.result_broker_url is None:
            raise RequestError(503, "SERVICE_UNAVAILABLE", "the result queue service is unavailable")
        answer = {"queue_prefix": self.queue_prefix, "connection_url": self.result_broker_url}
        return web.json_response(answer)

    async def _endpoint_status(self, request: web.Request) -> web.Response:
        endpoint_id = canonical_uuid(request.match_info["endpoint_id"], "endpoint_id")
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            raise RequestError(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} could not be resolved")
        return web.json_response(endpoint.status_document(self.tasks.values()))

    # -- task execution ----------------------------------------------------------------------------------

    def _enqueue(
        self, endpoint_id: str, function_id: str, task_group_id: str, payload: str, serializers: list[str]
    ) -> str:
        task = FakeTask.submitted(endpoint_id, function_id, task_group_id, payload, serializers)
        self.tasks[task.task_id] = task
        run = asyncio.get_running_loop().create_task(self._run(task, self._functions[function_id]))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        return task.task_id

    async def _run(self, task: FakeTask, function: Callable[..., Any]) -> None:
        endpoint = self._endpoints[task.endpoint_id]
        await online(endpoint)
        if self.queue_delay > 0:
            await asyncio.sleep(self.queue_delay)
            await online(endpoint)
        task.status = RUNNING
        task.started_at = time.time()
        honours = self._endpoints[task.endpoint_id].honours_result_serializers
        outcome = await in_daemon_thread(execute, task, function, honours, self.result_size_limit)
        await online(endpoint)
        task.finished_at = time.time()
        task.completion_t = str(task.finished_at)
        task.details = {
            **get_env_details(),
            "endpoint_id": task.endpoint_id,
            "task_transitions": {"execution-start": outcome.started, "execution-end": outcome.ended},
        }
        task.result, task.value = outcome.result, outcome.value
        task.exception, task.error = outcome.exception, outcome.error
        task.status = SUCCESS if outcome.exception is None else FAILED
        task.finished.set()
        if task.result_queue and self.result_queues is not None and self.publish_results:
            self.result_queues.publish(
                task.result_queue,
                task,
                high_assurance=self.high_assurance_results,
                persistent=self.persistent_results,
            )
