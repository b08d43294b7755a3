"""A user who may not use a cluster cannot tell it from one that does not exist, on any route; and
job reports show nobody else's models, not even as counts or under a name that shares a slug."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import (
    CHAT_MODEL,
    EMBED_MODEL,
    PRIVATE_MODEL,
    Server,
    auth,
    chat,
    start,
    start_gateway,
    write_gateway_config,
    write_yaml,
)
from tests.test_routes import assert_openai_error, call

LOOKALIKE = "metallama/Meta-Llama-3.1-8B-Instruct"
"""Not configured anywhere, but its slug is the slug of CHAT_MODEL's endpoint."""


def job(model: str) -> dict[str, str]:
    return {"Models": model, "Framework": "vllm", "Cluster": "local", "Model Status": "running"}


JOBS = {
    "running": [job(CHAT_MODEL), job(PRIVATE_MODEL), job(LOOKALIKE)],
    "stopped": [{**job(EMBED_MODEL), "Model Status": "stopped"}],
    "cluster_status": {
        "cluster": "local",
        "free_nodes": 2,
        "total_models": 4,
        "live_models": 3,
        "stopped_models": 1,
        "private_models": 1,
    },
}


async def same_as_missing(
    http: aiohttp.ClientSession, method: str, hidden: str, missing: str, **kwargs: Any
) -> None:
    """`hidden` (the restricted cluster `uni`) answers exactly as `missing` (the cluster `nowhere`)."""
    status, document, _ = await call(http, method, hidden, headers=auth("bob"), **kwargs)
    missing_status, missing_document, _ = await call(http, method, missing, headers=auth("bob"), **kwargs)
    assert (status, missing_status) == (404, 404), hidden
    error = assert_openai_error(document)
    assert error == {**assert_openai_error(missing_document), "message": error["message"]}
    assert error["message"] == missing_document["error"]["message"].replace("nowhere", "uni")


@pytest.mark.parametrize(
    "method, path, body, alice_status",
    [
        ("GET", "/{}/jobs", None, 200),
        ("GET", "/{}/vllm/v1/models", None, 200),
        ("POST", "/{}/vllm/v1/chat/completions", chat(), 200),
        ("POST", "/{}/sglang/v1/chat/completions", chat(), 400),
        ("POST", "/{}/vllm/v1/batches", {"model": CHAT_MODEL, "input_file": "/data/in.jsonl"}, 400),
        ("POST", "/{}/sam3service/process", {"data_uri": "x"}, 400),
        ("GET", "/{}/vllm/tasks/5f0c8a9e-1111-4222-8333-444455556666", None, 404),
    ],
)
async def test_a_restricted_cluster_is_a_missing_cluster(
    gateway: Server, http: aiohttp.ClientSession, method: str, path: str, body: Any, alice_status: int
) -> None:
    """Alice, who may use `uni`, gets past the cluster: to the answer, or the next check's error."""
    hidden, missing = gateway.url + path.format("uni"), gateway.url + path.format("nowhere")
    await same_as_missing(http, method, hidden, missing, json=body)
    status, document, _ = await call(http, method, hidden, headers=auth("alice"), json=body)
    assert status == alice_status
    assert status == 200 or document["error"]["code"] != "cluster_not_found"


async def test_maintenance_of_a_restricted_cluster_is_not_told(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(config.read_text())
    write_yaml(config, {**document, "maintenance": {"uni": "Down until Monday"}})
    runner, gateway = await start_gateway(config)
    try:
        path = "/{}/vllm/v1/chat/completions"
        hidden, missing = gateway.url + path.format("uni"), gateway.url + path.format("nowhere")
        await same_as_missing(http, "POST", hidden, missing, json=chat())
        status, document, _ = await call(http, "POST", hidden, json=chat(), headers=auth("alice"))
        assert status == 503 and "Monday" in document["error"]["message"]
    finally:
        await runner.cleanup()


async def test_a_batch_names_no_endpoint_before_the_permission_check(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    body = {"model": PRIVATE_MODEL, "input_file": "/data/in.jsonl"}
    url = f"{gateway.url}/local/vllm/v1/batches"
    status, document, _ = await call(http, "POST", url, json=body, headers=auth("bob"))
    assert status == 404 and document["error"]["code"] == "model_not_found"
    assert "local-vllm-privatemodel-g" not in document["error"]["message"]
    status, document, _ = await call(http, "POST", url, json=body, headers=auth("alice"))
    assert status == 400 and assert_openai_error(document)["code"] == "batch_not_enabled"


@pytest.fixture
async def reported(backend: Server, tmp_path: Path) -> AsyncIterator[Server]:
    """The default test gateway, its cluster `local` reporting JOBS."""
    status_app = aiohttp.web.Application()

    async def jobs(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(JOBS)

    status_app.router.add_get("/jobs", jobs)
    status_runner, status_url = await start(status_app)
    config = write_gateway_config(tmp_path, backend.url)
    clusters = yaml.safe_load((tmp_path / "clusters.yaml").read_text())
    clusters[0]["config"]["status_url"] = f"{status_url}/jobs"
    write_yaml(tmp_path / "clusters.yaml", clusters)
    runner, gateway = await start_gateway(config)
    yield gateway
    await runner.cleanup()
    await status_runner.cleanup()


async def test_job_reports_hide_lookalikes_and_recount_models(
    reported: Server, http: aiohttp.ClientSession
) -> None:
    status, bob, _ = await call(http, "GET", f"{reported.url}/local/jobs", headers=auth("bob"))
    assert status == 200
    assert [j["Models"] for j in bob["running"]] == [CHAT_MODEL]
    assert [j["Models"] for j in bob["stopped"]] == [EMBED_MODEL]
    assert bob["cluster_status"] == {
        "cluster": "local",
        "free_nodes": 2,
        "total_models": 2,
        "live_models": 1,
        "stopped_models": 1,
    }
    _, alice, _ = await call(http, "GET", f"{reported.url}/local/jobs", headers=auth("alice"))
    assert [j["Models"] for j in alice["running"]] == [CHAT_MODEL, PRIVATE_MODEL]
    assert (alice["cluster_status"]["total_models"], alice["cluster_status"]["live_models"]) == (3, 2)


async def test_a_restricted_model_answers_as_one_that_is_not_served(gateway: Server) -> None:
    """bob may use the cluster but not the model: he cannot tell it from a model the cluster lacks."""
    answers = []
    async with aiohttp.ClientSession() as http:
        for model in (PRIVATE_MODEL, "no/such-model"):
            url = f"{gateway.url}/local/vllm/v1/chat/completions"
            async with http.post(url, json=chat(model=model), headers=auth("bob")) as response:
                error = (await response.json())["error"]
                answers.append((response.status, error["code"], error["message"].replace(model, "MODEL")))
    assert answers[0] == answers[1] == (404, "model_not_found", answers[0][2])
