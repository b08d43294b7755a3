"""The SDK clients a `ComputeService` talks to the Globus Compute service through, and its serializer.

Built in a worker thread on first use: the authorizer fetches a token as it is built.
"""

from __future__ import annotations

from typing import Any

import globus_sdk
import requests.adapters
from globus_compute_sdk.serialize import AllowlistWildcard, ComputeSerializer, JSONData
from globus_sdk.transport import RequestsTransport, RetryConfig

from adaptors.compute_config import ComputeAccess

HTTP_POOL_SIZE = 64
Clients = tuple[globus_sdk.ComputeClientV2, globus_sdk.ComputeClientV3, globus_sdk.ComputeClientV2]


def sdk_clients(access: ComputeAccess) -> Clients:
    """V2 (status calls, endpoint status), V3 (submissions) and V2 without retries (the result
    queue's URL: adaptors/compute_result_queue.py retries on its own, after a growing pause, and a
    thread kept in the SDK's retries would outlive a shutdown), sharing one token and one pool of
    connections."""
    client_id, secret = access.credentials()
    transport = pooled_transport(access.http_timeout_seconds)
    retries = RetryConfig(max_retries=2, max_sleep=2)
    auth = globus_sdk.ConfidentialAppAuthClient(
        client_id, secret, base_url=access.auth_url, transport=transport, retry_config=retries
    )
    authorizer = globus_sdk.ClientCredentialsAuthorizer(auth, globus_sdk.ComputeClientV2.scopes.all)
    options: dict[str, Any] = {
        "base_url": access.compute_url,
        "authorizer": authorizer,
        "transport": transport,
        "retry_config": retries,
    }
    once = options | {"retry_config": RetryConfig(max_retries=0)}
    return (
        globus_sdk.ComputeClientV2(**options),
        globus_sdk.ComputeClientV3(**options),
        globus_sdk.ComputeClientV2(**once),
    )


def pooled_transport(timeout: float) -> RequestsTransport:
    """`requests` keeps 10 connections per host by default, fewer than the threads calling it:
    every extra call would open (and log discarding) a new connection."""
    transport = RequestsTransport(http_timeout=timeout)
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=HTTP_POOL_SIZE)
    for scheme in ("https://", "http://"):
        transport.session.mount(scheme, adapter)
    return transport


def json_serializer() -> ComputeSerializer:
    """Arguments and results travel as JSON; a result in any other form (dill, which would run
    code in the gateway) is refused."""
    return ComputeSerializer(
        strategy_data=JSONData(),  # type: ignore[no-untyped-call]
        allowed_deserializer_types=[JSONData, AllowlistWildcard.CODE],
    )


def queue_details(clients: Clients) -> tuple[str, str]:
    """The result queue's connection URL and queue prefix; ValueError when the answer lacks them."""
    answer = clients[2].get_result_amqp_url().data
    url = answer.get("connection_url") if isinstance(answer, dict) else None
    prefix = answer.get("queue_prefix", "") if isinstance(answer, dict) else None
    if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")) or not isinstance(prefix, str):
        raise ValueError("the service's answer holds no AMQP connection URL and queue prefix")
    return url, prefix
