"""Each deployment's state in `/{cluster}/jobs`, `/v1/models`, `/{cluster}/{framework}/v1/models` and
`list-endpoints`, beside what those answers always held; and the deployment's configuration
checked at start-up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from adaptors.deployments import Phase, Progress
from proxy.core.registry import load_registry
from proxy.settings.files import ConfigError
from tests.deployment_endpoint_setup import (
    LLAMA,
    MIXED_MODEL,
    TIGHT,
    TIGHT_MODEL,
    ScriptedDeployments,
    Site,
    attach,
    deployment,
    make_site,
    replica_server,
    write_config,
)
from tests.support import CHAT_MODEL, PRIVATE_MODEL, TOKENS, Server, auth, start_gateway, write_yaml
from tests.test_routes import call

MIXED = "mixed-vllm-mixedmodel"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


@pytest.fixture
def deployments(site: Site) -> ScriptedDeployments:
    return ScriptedDeployments(site.gateway_ssl())


@pytest.fixture
async def gateway(backend: Server, tmp_path: Path, deployments: ScriptedDeployments) -> AsyncIterator[Server]:
    runner, server = await start_gateway(write_config(tmp_path, backend.url))
    executor = await attach(server, deployments)
    yield server
    await runner.cleanup()
    executor.shutdown()


async def get(http: aiohttp.ClientSession, url: str, user: str = "alice") -> Any:
    status, document, _ = await call(http, "GET", url, headers=auth(user))
    assert status == 200, document
    return document


def state(name: str, phase: str, ready: int = 0, eta: int | None = None, detail: str = "") -> dict[str, Any]:
    return {"name": name, "phase": phase, "ready_replicas": ready, "eta_seconds": eta, "detail": detail}


async def test_jobs_list_a_cluster_of_deployments_by_phase(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    deployments.set(TIGHT, Progress(Phase.loading, 41.2, detail="node x1"))
    jobs = await get(http, f"{gateway.url}/hpc/jobs")
    assert [job["Models"] for job in jobs["stopped"]] == [CHAT_MODEL, PRIVATE_MODEL]
    assert jobs["stopped"][0] == {
        "Models": CHAT_MODEL,
        "Framework": "vllm",
        "Cluster": "hpc",
        "Model Status": "idle",
        "Deployment": LLAMA,
        "Deployment Phase": "idle",
        "Ready Replicas": 0,
        "ETA Seconds": None,
    }
    starting = jobs["running"][0]
    assert (starting["Models"], starting["Model Status"], starting["Deployment Phase"]) == (
        TIGHT_MODEL,
        "starting",
        "loading",
    )
    assert starting["ETA Seconds"] == 42
    assert jobs["cluster_status"] == {
        "cluster": "hpc",
        "total_models": 3,
        "live_models": 1,
        "stopped_models": 2,
    }

    jobs = await get(http, f"{gateway.url}/hpc/jobs", user="bob")
    assert [job["Models"] for job in jobs["stopped"]] == [CHAT_MODEL], "bob may not use the private model"

    deployments.set(LLAMA, Progress(Phase.queued, 300))
    jobs = await get(http, f"{gateway.url}/hpc/jobs")
    assert [(job["Models"], job["Model Status"], job["ETA Seconds"]) for job in jobs["queued"]] == [
        (CHAT_MODEL, "queued", 300)
    ]
    async with replica_server(site, LLAMA) as pilot:
        deployments.ready(LLAMA, pilot.replica(LLAMA), pilot.replica(LLAMA, "r2"))
        jobs = await get(http, f"{gateway.url}/hpc/jobs")
    running = {job["Models"]: job for job in jobs["running"]}
    assert running[CHAT_MODEL]["Model Status"] == "running" and running[CHAT_MODEL]["Ready Replicas"] == 2


async def test_jobs_of_a_cluster_that_does_not_know_its_deployments_list_them_too(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    jobs = await get(http, f"{gateway.url}/mixed/jobs")
    assert [(job["Models"], job["Model Status"]) for job in jobs["running"]] == [(CHAT_MODEL, "running")]
    assert [(job["Models"], job["Deployment"]) for job in jobs["stopped"]] == [(MIXED_MODEL, MIXED)]
    assert jobs["cluster_status"]["total_models"] == 2


async def test_models_are_listed_with_their_deployments_state_even_when_idle(
    gateway: Server, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    deployments.set(LLAMA, Progress(Phase.starting, 100))
    listed = {card["id"]: card for card in (await get(http, f"{gateway.url}/v1/models"))["data"]}
    assert set(listed) == {CHAT_MODEL, PRIVATE_MODEL, TIGHT_MODEL, MIXED_MODEL}
    chat_card = listed[CHAT_MODEL]
    assert chat_card["clusters"] == ["hpc", "mixed"] and chat_card["object"] == "model"
    assert chat_card["deployments"] == [{"cluster": "hpc", **state(LLAMA, "starting", eta=100)}]
    assert listed[MIXED_MODEL]["deployments"] == [{"cluster": "mixed", **state(MIXED, "idle")}]

    cards = (await get(http, f"{gateway.url}/hpc/vllm/v1/models", user="bob"))["data"]
    assert [card["id"] for card in cards] == [CHAT_MODEL, TIGHT_MODEL]
    assert cards[0]["deployment"] == state(LLAMA, "starting", eta=100)
    assert set(cards[0]) == {"id", "object", "created", "owned_by", "deployment"}
    cards = (await get(http, f"{gateway.url}/mixed/vllm/v1/models"))["data"]
    assert "deployment" not in cards[0] and cards[1]["deployment"]["name"] == MIXED

    models = openai.AsyncOpenAI(base_url=f"{gateway.url}/hpc/vllm/v1", api_key=TOKENS["alice"])
    assert [model.id async for model in models.models.list()] == [CHAT_MODEL, PRIVATE_MODEL, TIGHT_MODEL]


async def test_list_endpoints_shows_each_deployments_state(
    gateway: Server, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    deployments.set(LLAMA, Progress(Phase.loading, 12))
    listed = (await get(http, f"{gateway.url}/list-endpoints"))["clusters"]
    hpc = listed["hpc"]["frameworks"]["vllm"]
    assert hpc["models"] == [CHAT_MODEL, PRIVATE_MODEL, TIGHT_MODEL]
    assert hpc["endpoints"][0] == "/v1/chat/completions"
    assert hpc["deployments"] == {
        CHAT_MODEL: state(LLAMA, "loading", eta=12),
        PRIVATE_MODEL: state("private-g", "idle"),
        TIGHT_MODEL: state(TIGHT, "idle"),
    }
    assert listed["mixed"]["frameworks"]["vllm"]["deployments"] == {MIXED_MODEL: state(MIXED, "idle")}
    bob = (await get(http, f"{gateway.url}/list-endpoints", user="bob"))["clusters"]
    assert set(bob["hpc"]["frameworks"]["vllm"]["deployments"]) == {CHAT_MODEL, TIGHT_MODEL}


@pytest.mark.parametrize(
    "model, config, problem",
    [
        ("m", {"min_replicas": 2, "max_replicas": 1}, "max_replicas must be at least min_replicas"),
        ("m", {"model_command": ["vllm", "serve"]}, "model_command must pass the model server its port"),
        ("m", {"deployment": "a/b"}, "field 'config.deployment'"),
        ("m", {"max_held_requests": -1}, "field 'config.max_held_requests'"),
        ("m" * 130, {}, "cannot name a deployment: set config.deployment"),
    ],
)
def test_a_misconfigured_deployment_stops_start_up(
    tmp_path: Path, model: str, config: dict[str, Any], problem: str
) -> None:
    clusters = [
        {
            "cluster_name": "hpc",
            "cluster_adapter": "adaptors.deployment.DeploymentCluster",
            "frameworks": ["vllm"],
            "openai_endpoints": ["chat/completions"],
        }
    ]
    entry = deployment(model, None)
    entry["config"].update(config)
    write_yaml(tmp_path / "clusters.yaml", clusters)
    write_yaml(tmp_path / "endpoints.yaml", [entry])
    with pytest.raises(ConfigError) as raised:
        load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml")
    assert "endpoints.yaml, entry 1" in str(raised.value) and problem in str(raised.value)
