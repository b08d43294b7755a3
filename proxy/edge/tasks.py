"""Asynchronous tasks for services that are not OpenAI-shaped (the existing gateway's
`sam3service`): `POST /{cluster}/{framework}/process` starts the endpoint's function on the
client's JSON object and answers its task id at once; `GET /{cluster}/{framework}/tasks/{task_id}`
answers the result, or 202 while the task runs.

The gateway remembers who started each task (proxy/core/task_book.py), so that only they may read it:
anyone else is told that it does not exist.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from adaptors import BaseCluster, BaseEndpoint
from proxy.core.authz import may_use
from proxy.core.dispatch import EndpointAdmission, UserAdmission
from proxy.core.exchange import EXCHANGE, Served
from proxy.core.identity import USER, User
from proxy.core.lookup import check_framework, find_cluster, find_endpoint
from proxy.core.registry import Registry
from proxy.core.state import STATE
from proxy.edge.bodies import read_json
from proxy.errors import ApiError, adaptor_failed

PENDING = "task_accepted_and_pending"
RETRY_AFTER_SECONDS = 2


def add_task_routes(app: web.Application, base_path: str) -> None:
    app.router.add_post(f"{base_path}/{{cluster}}/{{framework}}/process", process)
    app.router.add_get(f"{base_path}/{{cluster}}/{{framework}}/tasks/{{task_id}}", task_result)


async def process(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_request")
    state, user = request.app[STATE], request[USER]
    cluster = find_cluster(state.registry, request.match_info["cluster"], user)
    state.maintenance.check(cluster)
    framework = request.match_info["framework"]
    check_framework(cluster, framework)
    endpoint = _task_endpoint(state.registry, cluster, framework, user, body.get("model"))
    exchange = request[EXCHANGE]
    exchange.serving(endpoint, stream=False)
    async with UserAdmission(request), EndpointAdmission(request, endpoint):
        started = await endpoint.submit_task_async(body)
    if started.error_code is not None or started.task_id is None:
        message = started.error_message or "The task was not accepted."
        adaptor_failed(started.error_code, message, retry_after=started.retry_after)
    exchange.served = Served(outcome="ok", task_id=started.task_id)
    await state.tasks.add(started.task_id, user, endpoint)
    return web.json_response({"task_id": started.task_id})


async def task_result(request: web.Request) -> web.Response:
    """Readable during maintenance: the result is kept by the compute service, not the cluster.
    Each call asks the compute service, so the caller's rate limits apply to it."""
    state, user = request.app[STATE], request[USER]
    cluster = find_cluster(state.registry, request.match_info["cluster"], user)
    framework, task_id = request.match_info["framework"], request.match_info["task_id"]
    entry = await state.tasks.get(task_id)
    endpoint = None if entry is None else state.registry.endpoints.get(entry.endpoint_slug)
    if (
        entry is None
        or endpoint is None
        or entry.user_id != user.id
        or (entry.cluster, entry.framework) != (cluster.cluster_name, framework)
        or not may_use(user, endpoint, cluster)
    ):
        raise ApiError(404, f"Task '{task_id[:64]}' does not exist.", code="task_not_found")
    async with UserAdmission(request), EndpointAdmission(request, endpoint):
        report = await endpoint.get_task_result(task_id)
    if report.error_code is not None:
        adaptor_failed(report.error_code, report.error_message or "The task failed.")
    if not report.done:
        pending = {"status": PENDING, "task_id": task_id}
        return web.json_response(pending, status=202, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    return web.json_response({"result": report.result, "task_id": task_id})


def _task_endpoint(
    registry: Registry, cluster: BaseCluster, framework: str, user: User, model: Any
) -> BaseEndpoint:
    """The body may name the model; without it, the framework's one endpoint the caller may use."""
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string.", param="model", code="invalid_type")
        endpoint = find_endpoint(registry, cluster, framework, model, user)
        return endpoint
    usable = [
        endpoint
        for endpoint in registry.endpoints.values()
        if (endpoint.cluster, endpoint.framework) == (cluster.cluster_name, framework)
        and may_use(user, endpoint, cluster)
    ]
    if not usable:
        message = (
            f"Framework '{framework[:100]}' on cluster '{cluster.cluster_name}' serves nothing you may use."
        )
        raise ApiError(404, message, code="model_not_found")
    if len(usable) > 1:
        models = ", ".join(sorted(endpoint.model for endpoint in usable))
        raise ApiError(400, f"Name the 'model': one of {models}.", param="model", code="model_required")
    return usable[0]
