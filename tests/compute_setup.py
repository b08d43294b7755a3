"""The Globus Compute test setup shared by several test modules: ids, the remote functions the fake
service runs, and gateway configurations pointing at the fakes."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
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
"""Served by testing/existing_function.py, the existing gateway's function, with the default protocol."""
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
    """The existing qstat function's answer: jobs by state, the private batch lists spelled with
    hyphens, no `stopped` list, and the free nodes."""

    def job(models: str, job_id: str, state: str, model_status: str) -> dict[str, str]:
        return {
            "Models": models, "Framework": "vllm", "Cluster": "hpc", "Model Status": model_status,
            "Job ID": job_id, "Job State": state, "Host Name": "x1000c0s0b0n0/0*64",
            "Job Comments": "Job run at Thu Dec 03 at 09:12", "Nodes Reserved": "1",
        }  # fmt: skip

    return json.dumps(
        {
            "running": [job(f"{CHAT_MODEL},{SLOW_MODEL}", "1", "R", "running")],
            "queued": [job("hidden/model", "2", "Q", "queued")],
            "others": [],
            "private-batch-running": [job(CHAT_MODEL, "3", "R", "running")],
            "private-batch-queued": [job(CHAT_MODEL, "4", "Q", "queued")],
            "cluster_status": {"free_nodes": 3},
        },
        indent=4,
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
            "result_queue": has_queues(compute),
            **extra,
        },
    }


def has_queues(compute: FakeCompute) -> bool:
    """The gateway consumes result queues (its default) where the fake publishes them: a fake without
    a broker is a service whose queues are out of reach, which costs a warning and a retry now and
    then (tests/test_compute_result_queue.py), and the other tests only polling."""
    return compute.result_broker_url is not None


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
            "result_queue": has_queues(compute),
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
