"""Authorization: may this user use this endpoint or cluster? Empty lists mean any
authenticated user; a non-empty list must match."""

from __future__ import annotations

from adaptors import BaseCluster, BaseEndpoint
from proxy.core.identity import User


def allowed(user: User, resource: BaseEndpoint | BaseCluster) -> bool:
    groups = resource.allowed_globus_groups
    domains = resource.allowed_domains
    if groups and user.groups.isdisjoint(groups):
        return False
    return not domains or user.domain in domains


def may_use(user: User, endpoint: BaseEndpoint, cluster: BaseCluster) -> bool:
    """Both the endpoint's and its cluster's lists apply, on every route that serves the endpoint."""
    return allowed(user, cluster) and allowed(user, endpoint)
