"""The Globus Compute test setup shared by several test modules: ids, the remote functions the fake
service runs, and gateway configurations pointing at the fakes."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.fake_compute import FakeCompute
from tests.fake_globus import FakeGlobus
from tests.support import CHAT_MODEL, Server, write_gateway_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET = "compute-relay-secret-0123"
SERVICE_ID, SERVICE_SECRET = "7d0e1c36-2b57-4f0c-9a2b-6f1c5b0e9a11", "service-account-secret"
ENDPOINT = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"
INFER = "11111111-aaaa-4bbb-8ccc-000000000001"
QSTAT = "11111111-aaaa-4bbb-8ccc-000000000002"
LEGACY = "11111111-aaaa-4bbb-8ccc-000000000003"
SLOW_MODEL = "slow/Compute-Model"
LEGACY_MODEL = "legacy/Compute-Model"
"""Served by tests/existing_function.py, the existing gateway's function, with the default protocol."""
OURS = {"callback_protocol": "gateway"}
"""The config of endpoints that run compute-functions/vllm_inference.py."""


def load_function() -> Callable[[dict[str, Any]], str]:
    spec = importlib.util.spec_from_file_location(
        "vllm_inference", ROOT / "compute-functions" / "vllm_inference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vllm_inference  # type: ignore[no-any-return]


def qstat() -> str:
    return json.dumps(
        {
            "running": [
                {"Models": f"{CHAT_MODEL},{SLOW_MODEL}", "Framework": "vllm", "Cluster": "hpc", "Job ID": "1"}
            ],
            "queued": [{"Models": "hidden/model", "Framework": "vllm", "Cluster": "hpc"}],
            "stopped": [],
            "others": [],
            "private_batch_running": [],
            "private_batch_queued": [],
            "cluster_status": {"cluster": "hpc", "total_models": 3},
        }
    )


def compute_endpoint(
    model: str, function: str, backend: Server, compute: FakeCompute, globus: FakeGlobus, **extra: Any
) -> dict[str, Any]:
    return {
        "cluster": "hpc",
        "framework": "vllm",
        "model": model,
        "endpoint_adapter": "resource_server_async.endpoints.globus_compute.GlobusComputeEndpoint",
        "config": {
            "api_port": int(backend.url.rsplit(":", 1)[1]),
            "endpoint_uuid": ENDPOINT,
            "function_uuid": function,
            "client_id": SERVICE_ID,
            "client_secret": SERVICE_SECRET,
            "compute_url": compute.url,
            "auth_url": globus.auth_url,
            "poll_interval_seconds": 0.05,
            **extra,
        },
    }


def compute_config(
    directory: Path,
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    port: int,
    redis_url: str | None = None,
    **settings: Any,
) -> Path:
    """`settings` are more top-level gateway settings; `chat_config` extends the chat endpoint's config."""
    chat_config = settings.pop("chat_config", {})
    path = write_gateway_config(directory, backend.url, port=port)
    document = yaml.safe_load(path.read_text()) | settings
    document["streaming"] = {
        "internal_secret": SECRET,
        "callback_url": f"http://127.0.0.1:{port}",
        "keepalive_seconds": 5,
    }
    if redis_url:
        document["redis_url"] = redis_url
    path.write_text(yaml.safe_dump(document))
    cluster = {
        "cluster_name": "hpc",
        "cluster_adapter": "resource_server_async.clusters.globus_compute.GlobusComputeCluster",
        "frameworks": ["vllm"],
        "openai_endpoints": ["chat/completions", "completions", "embeddings", "responses", "messages"],
        "config": {
            "qstat_endpoint_uuid": ENDPOINT,
            "qstat_function_uuid": QSTAT,
            "client_id": SERVICE_ID,
            "client_secret": SERVICE_SECRET,
            "compute_url": compute.url,
            "auth_url": globus.auth_url,
            "poll_interval_seconds": 0.05,
        },
    }
    clusters = [*yaml.safe_load((directory / "clusters.yaml").read_text()), cluster]
    endpoints = [
        *yaml.safe_load((directory / "endpoints.yaml").read_text()),
        compute_endpoint(CHAT_MODEL, INFER, backend, compute, globus, **{**OURS, **chat_config}),
        compute_endpoint(SLOW_MODEL, INFER, backend, compute, globus, **OURS, task_timeout_seconds=0.5),
        compute_endpoint(LEGACY_MODEL, LEGACY, backend, compute, globus),
    ]
    write_yaml(directory / "clusters.yaml", clusters)
    write_yaml(directory / "endpoints.yaml", endpoints)
    return path
