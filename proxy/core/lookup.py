"""Finding what a request names (cluster, framework, endpoint) and whether the caller may use it.

Each check raises the OpenAI-shaped error for its step, so a route lists its steps in the order
the API promises: cluster (404) → framework (400) → OpenAI path (400) → endpoint (404) → access (403).
"""

from __future__ import annotations

from adaptors import BaseCluster, BaseEndpoint
from proxy.core.authz import allowed, may_use
from proxy.core.identity import User
from proxy.core.registry import Registry
from proxy.core.slug import endpoint_slug
from proxy.errors import ApiError


def find_cluster(registry: Registry, name: str, user: User) -> BaseCluster:
    """A cluster the caller may not use answers exactly as one that does not exist: its name, its
    frameworks, its maintenance and its jobs are nobody else's business."""
    cluster = registry.clusters.get(name)
    if cluster is None or not allowed(user, cluster):
        raise ApiError(404, f"Cluster '{name[:100]}' does not exist.", code="cluster_not_found")
    return cluster


def check_framework(cluster: BaseCluster, framework: str) -> None:
    if framework not in cluster.frameworks:
        raise ApiError(
            400,
            f"Framework '{framework[:100]}' is not available on cluster '{cluster.cluster_name}'; "
            f"it serves {', '.join(cluster.frameworks)}.",
            code="unsupported_framework",
        )


def check_openai_path(cluster: BaseCluster, openai_path: str) -> None:
    if openai_path not in cluster.openai_endpoints:
        raise ApiError(
            400,
            f"'/v1/{openai_path}' is not available on cluster '{cluster.cluster_name}'.",
            code="unsupported_endpoint",
        )


def endpoint_named(registry: Registry, cluster: str, framework: str, model: str) -> BaseEndpoint | None:
    """By slug, as the existing gateway does, but the slug drops and folds characters: a different
    name with the same slug (`a/b` and `ab`) is a different model, which the backend might serve
    outside the endpoint's access lists. Case does not count, as the slug lowercases the model."""
    endpoint = registry.endpoints.get(endpoint_slug(cluster, framework, model))
    if (
        endpoint is None
        or (endpoint.cluster, endpoint.framework) != (cluster, framework)
        or endpoint.model.lower() != model.lower()
    ):
        return None
    return endpoint


def find_endpoint(
    registry: Registry, cluster: BaseCluster, framework: str, model: str, user: User
) -> BaseEndpoint:
    """A model the caller may not use answers exactly as one that is not served: a 404 with the same
    message, so access lists do not reveal which restricted models a cluster has."""
    endpoint = endpoint_named(registry, cluster.cluster_name, framework, model)
    if endpoint is None or not may_use(user, endpoint, cluster):
        raise ApiError(
            404,
            f"Model '{model[:200]}' is not served by framework '{framework[:100]}' on cluster "
            f"'{cluster.cluster_name}'.",
            param="model",
            code="model_not_found",
        )
    return endpoint
