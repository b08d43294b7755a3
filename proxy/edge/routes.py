"""HTTP routes under the base path. Inference reads top to bottom in the order of its checks:
the user's rate limits → body → cluster → framework → OpenAI path → endpoint → permission → adaptor."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from adaptors import BaseCluster, BaseEndpoint
from proxy.core.authz import may_use
from proxy.core.deployment_views import deployment_state, with_deployments
from proxy.core.dispatch import UserAdmission, dispatch
from proxy.core.identity import USER, User
from proxy.core.jobs import visible_jobs
from proxy.core.lookup import check_framework, check_openai_path, find_cluster, find_endpoint
from proxy.core.registry import SERVED_PATHS, Registry
from proxy.core.state import STATE
from proxy.edge.bodies import read_valid
from proxy.errors import adaptor_failed

OPENAI_PATHS = SERVED_PATHS
"""`messages` is Anthropic's Messages API, which vLLM serves beside OpenAI's."""
PUBLIC_ROUTES = frozenset({"health", "status"})


def add_routes(app: web.Application, base_path: str) -> None:
    """Inference first: aiohttp tries the routes that begin with a variable in the order they were
    added, and no other route's paths are inference paths, so that most requests match at once."""
    inference_path = "{openai_path:" + "|".join(OPENAI_PATHS) + "}"
    app.router.add_post(f"{base_path}/{{cluster}}/{{framework}}/v1/{inference_path}", inference)
    app.router.add_post(f"{base_path}/v1/{inference_path}", federated_inference)
    app.router.add_get(f"{base_path}/health", health, name="health")
    app.router.add_get(f"{base_path}/status", status, name="status")
    app.router.add_get(f"{base_path}/whoami", whoami)
    app.router.add_get(f"{base_path}/list-endpoints", list_endpoints)
    app.router.add_get(f"{base_path}/v1/models", all_models)
    app.router.add_get(f"{base_path}/{{cluster}}/jobs", jobs)
    app.router.add_get(f"{base_path}/{{cluster}}/{{framework}}/v1/models", cluster_models)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    """Public clusters only: naming a restricted cluster would tell strangers it exists.
    False means under maintenance."""
    state = request.app[STATE]
    clusters = state.registry.clusters.values()
    maintenance = state.maintenance
    return web.json_response(
        {
            c.cluster_name: maintenance.message(c.cluster_name) is None
            for c in clusters
            if not c.allowed_globus_groups and not c.allowed_domains
        }
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
    state, user = request.app[STATE], request[USER]
    clusters: dict[str, Any] = {}
    for endpoint, cluster in _usable_endpoints(state.registry, user):
        entry = clusters.setdefault(
            cluster.cluster_name,
            {"base_url": f"{state.base_path}/{cluster.cluster_name}", "frameworks": {}},
        )
        framework = entry["frameworks"].setdefault(
            endpoint.framework,
            {"models": [], "endpoints": [f"/v1/{p}" for p in cluster.openai_endpoints if p in OPENAI_PATHS]},
        )
        framework["models"].append(endpoint.model)
        deployment = deployment_state(endpoint)
        if deployment is not None:
            framework.setdefault("deployments", {})[endpoint.model] = deployment
    for entry in clusters.values():
        for framework in entry["frameworks"].values():
            framework["models"].sort()
    return web.json_response({"clusters": clusters})


async def all_models(request: web.Request) -> web.Response:
    """Every model the caller may use, once, with the clusters that serve it."""
    registry, user = request.app[STATE].registry, request[USER]
    clusters_by_model: dict[str, list[str]] = {}
    deployments: dict[str, list[dict[str, Any]]] = {}
    for endpoint, cluster in _usable_endpoints(registry, user):
        serving = clusters_by_model.setdefault(endpoint.model, [])
        if cluster.cluster_name not in serving:
            serving.append(cluster.cluster_name)
        state = deployment_state(endpoint)
        if state is not None:
            deployments.setdefault(endpoint.model, []).append({"cluster": cluster.cluster_name, **state})
    models = [
        {**_model_card(request, model, clusters[0]), "clusters": clusters}
        | ({"deployments": deployments[model]} if model in deployments else {})
        for model, clusters in sorted(clusters_by_model.items())
    ]
    return web.json_response({"object": "list", "data": models})


async def cluster_models(request: web.Request) -> web.Response:
    """What OpenAI clients' `models.list()` calls under a cluster and framework base URL."""
    registry, user = request.app[STATE].registry, request[USER]
    cluster = find_cluster(registry, request.match_info["cluster"], user)
    framework = request.match_info["framework"]
    served = [
        e for e, owner in _usable_endpoints(registry, user) if owner is cluster and e.framework == framework
    ]
    data = []
    for endpoint in sorted(served, key=lambda endpoint: endpoint.model):
        card = _model_card(request, endpoint.model, cluster.cluster_name)
        state = deployment_state(endpoint)
        data.append(card if state is None else {**card, "deployment": state})
    return web.json_response({"object": "list", "data": data})


async def jobs(request: web.Request) -> web.Response:
    state, user = request.app[STATE], request[USER]
    registry = state.registry
    cluster = find_cluster(registry, request.match_info["cluster"], user)
    if state.maintenance.message(cluster.cluster_name) is not None:
        models = [
            (e.framework, e.model) for e, owner in _usable_endpoints(registry, user) if owner is cluster
        ]
        stopped = state.maintenance.stopped_jobs(cluster, models)
        return web.json_response(stopped.model_dump(mode="json"))
    report = await state.jobs.get(cluster, user)
    if report.jobs is None:
        message = report.error_message or "The cluster sent no job report."
        adaptor_failed(report.error_code, message, detail=report.error_detail)
    shown = visible_jobs(with_deployments(report.jobs, cluster, registry), user, registry, cluster)
    return web.json_response(shown.model_dump(mode="json"))


async def inference(request: web.Request) -> web.StreamResponse:
    async with UserAdmission(request):
        openai_path = request.match_info["openai_path"]
        body = await read_valid(request, openai_path)
        state, user = request.app[STATE], request[USER]
        registry = state.registry
        cluster = find_cluster(registry, request.match_info["cluster"], user)
        state.maintenance.check(cluster)
        framework = request.match_info["framework"]
        check_framework(cluster, framework)
        check_openai_path(cluster, openai_path)
        endpoint = find_endpoint(registry, cluster, framework, body.fields["model"], user)
        return await dispatch(request, endpoint, openai_path, body)


async def federated_inference(request: web.Request) -> web.StreamResponse:
    """No cluster in the path: proxy/core/federation.py chooses the endpoint and fails over."""
    async with UserAdmission(request):
        openai_path = request.match_info["openai_path"]
        body = await read_valid(request, openai_path)

        def attempt(endpoint: BaseEndpoint) -> Awaitable[web.StreamResponse]:
            return dispatch(request, endpoint, openai_path, body)

        return await request.app[STATE].federation.serve(request, openai_path, body.fields["model"], attempt)


def _usable_endpoints(registry: Registry, user: User) -> list[tuple[BaseEndpoint, BaseCluster]]:
    return [
        (endpoint, cluster)
        for endpoint in registry.endpoints.values()
        if (cluster := registry.clusters[endpoint.cluster]) and may_use(user, endpoint, cluster)
    ]


def _model_card(request: web.Request, model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": request.app[STATE].started_at, "owned_by": owner}
