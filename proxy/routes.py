"""HTTP routes under the base path. Inference reads top to bottom in the order of its checks:
body → cluster → framework → OpenAI path → endpoint → permission → adaptor."""

from __future__ import annotations

import json
import uuid
from typing import Any, NoReturn

from aiohttp import hdrs, web

from adaptors import BaseCluster, BaseEndpoint, SubmitTaskResponse
from proxy.auth import USER, User
from proxy.authz import allowed, may_use
from proxy.errors import ApiError
from proxy.jobs import JobsCache, visible_jobs
from proxy.registry import Registry
from proxy.schemas import validate_request
from proxy.slug import endpoint_slug
from proxy.streaming import relay

REGISTRY = web.AppKey("registry", Registry)
JOBS = web.AppKey("jobs", JobsCache)
STARTED_AT = web.AppKey("started_at", int)
BASE_PATH = web.AppKey("base_path", str)

OPENAI_PATHS = ("chat/completions", "completions", "embeddings")
STREAMING_PATHS = frozenset({"chat/completions", "completions"})
PUBLIC_ROUTES = frozenset({"health", "status"})


def add_routes(app: web.Application, base_path: str) -> None:
    inference_path = "{openai_path:" + "|".join(OPENAI_PATHS) + "}"
    app.router.add_get(f"{base_path}/health", health, name="health")
    app.router.add_get(f"{base_path}/status", status, name="status")
    app.router.add_get(f"{base_path}/whoami", whoami)
    app.router.add_get(f"{base_path}/list-endpoints", list_endpoints)
    app.router.add_get(f"{base_path}/v1/models", all_models)
    app.router.add_get(f"{base_path}/{{cluster}}/jobs", jobs)
    app.router.add_get(f"{base_path}/{{cluster}}/{{framework}}/v1/models", cluster_models)
    app.router.add_post(f"{base_path}/{{cluster}}/{{framework}}/v1/{inference_path}", inference)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    """Public clusters only: naming a restricted cluster would tell strangers it exists."""
    clusters = request.app[REGISTRY].clusters.values()
    return web.json_response(
        {c.cluster_name: True for c in clusters if not c.allowed_globus_groups and not c.allowed_domains}
    )


async def whoami(request: web.Request) -> web.Response:
    user = request[USER]
    return web.json_response(
        {
            "id": user.id,
            "name": user.name,
            "username": user.username,
            "user_group_uuids": sorted(user.groups),
            "idp_id": user.idp_id,
            "idp_name": user.idp_name,
            "auth_service": user.auth_service,
        }
    )


async def list_endpoints(request: web.Request) -> web.Response:
    registry, user = request.app[REGISTRY], request[USER]
    clusters: dict[str, Any] = {}
    for endpoint, cluster in _usable_endpoints(registry, user):
        entry = clusters.setdefault(
            cluster.cluster_name,
            {"base_url": f"{request.app[BASE_PATH]}/{cluster.cluster_name}", "frameworks": {}},
        )
        framework = entry["frameworks"].setdefault(
            endpoint.framework,
            {"models": [], "endpoints": [f"/v1/{path}" for path in cluster.openai_endpoints]},
        )
        framework["models"].append(endpoint.model)
    for entry in clusters.values():
        for framework in entry["frameworks"].values():
            framework["models"].sort()
    return web.json_response({"clusters": clusters})


async def all_models(request: web.Request) -> web.Response:
    """Every model the caller may use, once, with the clusters that serve it."""
    registry, user = request.app[REGISTRY], request[USER]
    clusters_by_model: dict[str, list[str]] = {}
    for endpoint, cluster in _usable_endpoints(registry, user):
        serving = clusters_by_model.setdefault(endpoint.model, [])
        if cluster.cluster_name not in serving:
            serving.append(cluster.cluster_name)
    models = [
        {**_model_card(request, model, clusters[0]), "clusters": clusters}
        for model, clusters in sorted(clusters_by_model.items())
    ]
    return web.json_response({"object": "list", "data": models})


async def cluster_models(request: web.Request) -> web.Response:
    """What OpenAI clients' `models.list()` calls under a cluster and framework base URL."""
    registry, user = request.app[REGISTRY], request[USER]
    cluster = _cluster(registry, request.match_info["cluster"])
    framework = request.match_info["framework"]
    models = sorted(
        endpoint.model
        for endpoint, owner in _usable_endpoints(registry, user)
        if owner is cluster and endpoint.framework == framework
    )
    data = [_model_card(request, model, cluster.cluster_name) for model in models]
    return web.json_response({"object": "list", "data": data})


async def jobs(request: web.Request) -> web.Response:
    registry, user = request.app[REGISTRY], request[USER]
    cluster = _cluster(registry, request.match_info["cluster"])
    if not allowed(user, cluster):
        raise ApiError(403, f"You may not use cluster '{cluster.cluster_name}'.", code="permission_denied")
    report = await request.app[JOBS].get(cluster)
    if report.jobs is None:
        _adaptor_failed(report.error_code, report.error_message or "The cluster sent no job report.")
    shown = visible_jobs(report.jobs, user, registry, cluster)
    return web.json_response(shown.model_dump(mode="json"))


async def inference(request: web.Request) -> web.StreamResponse:
    openai_path = request.match_info["openai_path"]
    body = await _read_json(request)
    validate_request(openai_path, body)
    registry = request.app[REGISTRY]
    cluster = _cluster(registry, request.match_info["cluster"])
    framework = request.match_info["framework"]
    if framework not in cluster.frameworks:
        raise ApiError(
            400,
            f"Framework '{framework}' is not available on cluster '{cluster.cluster_name}'; "
            f"it serves {', '.join(cluster.frameworks)}.",
            code="unsupported_framework",
        )
    if openai_path not in cluster.openai_endpoints:
        raise ApiError(
            400,
            f"'/v1/{openai_path}' is not available on cluster '{cluster.cluster_name}'.",
            code="unsupported_endpoint",
        )
    endpoint = _endpoint(registry, cluster, framework, body["model"])
    if not may_use(request[USER], endpoint, cluster):
        raise ApiError(
            403,
            f"You may not use model '{endpoint.model}' on cluster '{cluster.cluster_name}'.",
            code="permission_denied",
        )
    data = {"model_params": {**body, "openai_endpoint": openai_path}}
    if body.get("stream") is True and openai_path in STREAMING_PATHS:
        started = await endpoint.submit_streaming_task(data, uuid.uuid4().hex)
        if started.error_code is not None or started.response is None:
            _adaptor_failed(started.error_code, started.error_message or "The backend sent no stream.")
        return await relay(request, started.response)
    return _task_result(await endpoint.submit_task(data))


async def _read_json(request: web.Request) -> Any:
    if hdrs.CONTENT_TYPE in request.headers and not _is_json(request.content_type):
        raise ApiError(
            415,
            f"Content-Type '{request.content_type}' is not supported; send 'application/json'.",
            code="unsupported_media_type",
        )
    raw = await request.read()
    if not raw:
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = (
            exc.msg if isinstance(exc, json.JSONDecodeError) else "it is not UTF-8 JSON or nests too deeply"
        )
        raise ApiError(400, f"The request body is not valid JSON: {reason}.", code="invalid_json") from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _cluster(registry: Registry, name: str) -> BaseCluster:
    cluster = registry.clusters.get(name)
    if cluster is None:
        raise ApiError(404, f"Cluster '{name[:100]}' does not exist.", code="cluster_not_found")
    return cluster


def _endpoint(registry: Registry, cluster: BaseCluster, framework: str, model: str) -> BaseEndpoint:
    endpoint = registry.endpoints.get(endpoint_slug(cluster.cluster_name, framework, model))
    if endpoint is None or (endpoint.cluster, endpoint.framework) != (cluster.cluster_name, framework):
        raise ApiError(
            404,
            f"Model '{model[:200]}' is not served by framework '{framework}' on cluster "
            f"'{cluster.cluster_name}'.",
            param="model",
            code="model_not_found",
        )
    return endpoint


def _usable_endpoints(registry: Registry, user: User) -> list[tuple[BaseEndpoint, BaseCluster]]:
    return [
        (endpoint, cluster)
        for endpoint in registry.endpoints.values()
        if (cluster := registry.clusters[endpoint.cluster]) and may_use(user, endpoint, cluster)
    ]


def _model_card(request: web.Request, model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": request.app[STARTED_AT], "owned_by": owner}


def _task_result(task: SubmitTaskResponse) -> web.Response:
    if task.error_code is not None or task.result is None:
        _adaptor_failed(task.error_code, task.error_message or "The backend sent no result.")
    return web.Response(body=task.result.encode(), content_type="application/json")


def _adaptor_failed(code: int | None, message: str) -> NoReturn:
    """An adaptor's error code becomes the status, if it is an error status at all."""
    status = code if code is not None and 400 <= code <= 599 else 502
    raise ApiError(status, message, code="backend_error" if status >= 500 else None)
