"""The benchmark's Globus Compute gateways: their configuration against the fake Compute service
(bench.fake_compute_server), shared by the Compute and on-demand sections and the HTTP front."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from bench.common import MODEL, NO_LIMITS, STATIC_AUTH, tokens_document, write_documents
from bench.compute_client import API_PORT, DEFAULT_THREADS

ADAPTOR_THREADS: Final = DEFAULT_THREADS
"""The gateway's thread pool for SDK calls, set to the baseline client's so that both wait alike."""
CLUSTER: Final = "hpc"
COMPUTE_PATH: Final = f"/resource_server/{CLUSTER}/vllm/v1/chat/completions"


def compute_access(fake: dict[str, Any]) -> dict[str, Any]:
    """The service account and URLs, shared by the endpoint's and the cluster's configuration; the
    polling settings are the defaults."""
    keys = ("client_id", "client_secret", "compute_url", "auth_url")
    return {key: fake[key] for key in keys}


def write_compute_config(workdir: Path, port: int, fake: dict[str, Any], variant: str = "") -> Path:
    """A gateway whose only cluster is the fake endpoint, with the relay's callbacks coming to itself;
    variant `push`: the endpoint runs our function's protocol, whose answers are pushed through the
    relay (that protocol's default); `polled`: no result queue."""
    access = compute_access(fake) | ({"result_queue": False} if variant == "polled" else {})
    endpoint = {
        "api_port": API_PORT,
        "endpoint_uuid": fake["endpoint_uuid"],
        "function_uuid": fake["function_uuid"],
        **access,
        **({"callback_protocol": "gateway"} if variant == "push" else {}),
    }
    suffix = f"-{variant}" if variant else ""
    cluster = {
        "qstat_endpoint_uuid": fake["endpoint_uuid"],
        "qstat_function_uuid": fake["qstat_function_uuid"],
        **access,
    }
    documents: dict[str, Any] = {
        f"gateway-compute{suffix}.yaml": {
            "server": {"host": "127.0.0.1", "port": port, "adaptor_threads": ADAPTOR_THREADS},
            "auth": STATIC_AUTH,
            "limits": NO_LIMITS,
            "endpoints_file": f"endpoints-compute{suffix}.yaml",
            "clusters_file": f"clusters-compute{suffix}.yaml",
            "database_url": f"sqlite:///{workdir / f'gateway-compute{suffix}.db'}",
            "streaming": {
                "internal_secret": fake["callback_secret"],
                "callback_url": f"http://127.0.0.1:{port}",
            },
        },
        "tokens.yaml": tokens_document(),
        f"endpoints-compute{suffix}.yaml": [
            {
                "cluster": CLUSTER,
                "framework": "vllm",
                "model": MODEL,
                "endpoint_adapter": "adaptors.globus_compute.GlobusComputeEndpoint",
                "config": endpoint,
            }
        ],
        f"clusters-compute{suffix}.yaml": [
            {
                "cluster_name": CLUSTER,
                "cluster_adapter": "adaptors.globus_compute.GlobusComputeCluster",
                "frameworks": ["vllm"],
                "openai_endpoints": ["chat/completions"],
                "config": cluster,
            }
        ],
    }
    write_documents(workdir, documents)
    return workdir / f"gateway-compute{suffix}.yaml"
