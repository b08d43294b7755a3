"""A site's own adaptors move unchanged: written from the existing gateway's guide (imports from
`resource_server_async`, Django's `StreamingHttpResponse`) or to its current contract (`tpm_*`
constructor arguments, `get_jobs(auth)`, `SubmitTaskResult`, exceptions), loaded by dotted path
from fixture records and served through the gateway."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.core.state import STATE
from proxy.edge.batches import advance_batches
from tests.conftest import Server, auth, chat, start_gateway, write_gateway_config
from tests.site.current_adaptors import CurrentEndpoint


def record(kind: str, pk: int, fields: dict[str, Any]) -> dict[str, Any]:
    return {"model": f"resource_server_async.{kind}", "pk": pk, "fields": fields}


@pytest.fixture
async def site(tmp_path: Path, backend: Server) -> AsyncIterator[Server]:
    clusters = [
        record("cluster", 1, {
            "cluster_name": "custom", "cluster_adapter": "tests.site.custom_adaptors.CustomCluster",
            "frameworks": ["echo"], "openai_endpoints": ["chat/completions"],
            "config": "{'models': ['custom-1']}",
        }),
        record("cluster", 2, {
            "cluster_name": "current", "cluster_adapter": "tests.site.current_adaptors.CurrentCluster",
            "frameworks": ["api"], "openai_endpoints": ["chat/completions"], "config": {},
        }),
    ]  # fmt: skip
    endpoints = [
        record("endpoint", 1, {
            "endpoint_slug": "custom-echo-custom-1", "cluster": "custom", "framework": "echo",
            "model": "custom-1", "endpoint_adapter": "tests.site.custom_adaptors.CustomEndpoint",
            "config": {"prefix": "you said: "},
        }),
        record("endpoint", 2, {
            "endpoint_slug": "current-api-current-1", "cluster": "current", "framework": "api",
            "model": "current-1", "endpoint_adapter": "tests.site.current_adaptors.CurrentEndpoint",
            "tpm_model": 5000, "config": {"reply": "three words here"},
        }),
        record("endpoint", 3, {
            "endpoint_slug": "current-api-current-2", "cluster": "current", "framework": "api",
            "model": "current-2", "endpoint_adapter": "tests.site.current_adaptors.CurrentEndpoint",
            "config": {"reply": "offline"},
        }),
    ]  # fmt: skip
    config = write_gateway_config(tmp_path, backend.url)
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
    (tmp_path / "clusters.json").write_text(json.dumps(clusters))
    document = yaml.safe_load(config.read_text())
    document.update(endpoints_file="endpoints.json", clusters_file="clusters.json")
    config.write_text(yaml.safe_dump(document))
    runner, gateway = await start_gateway(config)
    yield gateway
    await runner.cleanup()


async def test_the_guides_adaptor_serves_unchanged(site: Server, http: aiohttp.ClientSession) -> None:
    url = f"{site.url}/custom/echo/v1/chat/completions"
    async with http.post(url, json=chat("hello there", model="custom-1"), headers=auth()) as response:
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == "you said: hello there"

    client = openai.AsyncOpenAI(base_url=f"{site.url}/custom/echo/v1", api_key="alice-token-0001")
    stream = await client.chat.completions.create(
        model="custom-1", messages=[{"role": "user", "content": "a b"}], stream=True
    )
    words = [chunk.choices[0].delta.content async for chunk in stream]
    assert "".join(w or "" for w in words) == "you said: a b "
    await client.close()

    async with http.get(f"{site.url}/custom/jobs", headers=auth()) as response:
        jobs = await response.json()
    assert [job["Models"] for job in jobs["running"]] == ["custom-1"]


async def test_an_adaptor_written_to_the_current_contract_serves(
    site: Server, http: aiohttp.ClientSession
) -> None:
    endpoint = site.app[STATE].registry.endpoints["current-api-current-1"]
    assert isinstance(endpoint, CurrentEndpoint) and (endpoint.tpm_model, endpoint.tpm_user) == (5000, 60_000)

    url = f"{site.url}/current/api/v1/chat/completions"
    async with http.post(url, json=chat(model="current-1"), headers=auth()) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == "three words here"

    async with http.post(url, json=chat(model="current-1", stream=True), headers=auth()) as response:
        assert response.status == 200
        events = (await response.read()).decode()
    assert [line for line in events.split("\n\n") if line][-1] == "data: [DONE]"
    assert events.count('"delta"') == 3

    async with http.post(url, json=chat(model="current-2"), headers=auth()) as response:
        assert response.status == 503
        error = (await response.json())["error"]
    assert error["message"] == "'current-2' is not currently live."


async def test_get_jobs_with_the_user_is_called_and_cached_per_user(
    site: Server, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{site.url}/current/jobs", headers=auth()) as response:
        jobs = await response.json()
    assert jobs["cluster_status"] == {"asked_by": "alice@uni.edu"}
    assert [job["Models"] for job in jobs["running"]] == ["current-1"]
    async with http.get(f"{site.url}/current/jobs", headers=auth("bob")) as response:
        assert response.status == 503
        assert (await response.json())["error"]["message"] == "The scheduler is down."


async def test_batches_of_the_current_contract(site: Server, http: aiohttp.ClientSession) -> None:
    url = f"{site.url}/current/api/v1/batches"
    body = {"model": "current-1", "input_file": "/data/prompts.jsonl"}
    async with http.post(url, json=body, headers=auth()) as response:
        assert response.status == 200, await response.text()
        submitted = await response.json()
    assert (submitted["status"], submitted["task_ids"]) == ("pending", "task-of-alice@uni.edu")
    missing = {"model": "current-1", "input_file": "/data/prompts.missing"}
    async with http.post(url, json=missing, headers=auth("bob")) as response:
        assert response.status == 400
        assert (await response.json())["error"]["message"] == "/data/prompts.missing does not exist."

    assert await advance_batches(site.app[STATE].batches, site.app[STATE].registry) == 1
    async with http.get(f"{site.url}/v1/batches/{submitted['batch_id']}", headers=auth()) as response:
        assert await response.json() == "completed"
    async with http.get(f"{site.url}/v1/batches/{submitted['batch_id']}/result", headers=auth()) as response:
        assert await response.json() == {"num_responses": 2}
