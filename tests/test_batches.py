"""Batch jobs through Globus Compute: created by a user, advanced by the gateway on its own, kept
in the database (SQLite and PostgreSQL) after the compute service has forgotten them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.state import STATE
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from tests.compute_setup import ENDPOINT, compute_config
from tests.conftest import CHAT_MODEL, Server, auth, free_port, start_gateway
from tests.test_routes import assert_openai_error, call

BATCH = "11111111-aaaa-4bbb-8ccc-000000000004"


def batch_function(parameters: dict[str, Any]) -> str:
    """Like the existing batch function: read a JSONL file on the cluster, write results, summarize."""
    params = parameters["model_params"]
    lines = Path(params["input_file"]).read_text().splitlines()
    if not lines:
        raise ValueError("the input file is empty")
    output = Path(params.get("output_folder_path") or Path(params["input_file"]).parent)
    results = output / f"{parameters['batch_id']}.results.jsonl"
    results.write_text(
        "".join(json.dumps({"line": n, "model": params["model"]}) + "\n" for n in range(len(lines)))
    )
    return json.dumps(
        {"results_file": str(results), "num_responses": len(lines), "username": parameters["username"]}
    )


@pytest.fixture
async def gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, database_url: str
) -> AsyncIterator[Server]:
    compute.register_function(BATCH, batch_function)
    config = compute_config(
        tmp_path,
        backend,
        compute,
        globus,
        free_port(),
        database_url=database_url,
        batches={"max_active_per_user": 2, "poll_seconds": 0.1},
        chat_config={"batch_endpoint_uuid": ENDPOINT, "batch_function_uuid": BATCH},
    )
    runner, server = await start_gateway(config)
    yield server
    await runner.cleanup()


def input_file(tmp_path: Path, name: str = "input.jsonl", lines: int = 3) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": f"p{n}"}) + "\n" for n in range(lines)))
    return str(path)


async def submit(
    http: aiohttp.ClientSession, gateway: Server, body: dict[str, Any], user: str = "alice"
) -> tuple[int, Any]:
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/hpc/vllm/v1/batches", json=body, headers=auth(user)
    )
    return status, document


async def finished(gateway: Server, batch_id: str, seconds: float = 10) -> str:
    """Reads the database directly: nobody polls the API while the gateway advances the batch."""
    store = gateway.app[STATE].batches
    for _ in range(int(seconds / 0.05)):
        record = await store.get(batch_id)
        assert record is not None
        if record.status in ("completed", "failed"):
            return record.status
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish")


async def test_a_batch_runs_to_completion_on_its_own(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    compute.queue_delay = 0.3
    status, created = await submit(http, gateway, {"input_file": input_file(tmp_path), "model": CHAT_MODEL})
    assert status == 200 and created["status"] == "pending" and created["task_ids"]
    assert set(created) == {"batch_id", "input_file", "output_folder_path", "task_ids", "status"}
    task = compute.task(created["task_ids"])
    assert list(task.args) == [
        {
            "model_params": {"input_file": str(tmp_path / "input.jsonl"), "model": CHAT_MODEL},
            "batch_id": created["batch_id"],
            "username": "alice@uni.edu",
        }
    ]
    assert await finished(gateway, created["batch_id"]) == "completed"
    compute.tasks.clear()
    status, document, _ = await call(
        http, "GET", f"{gateway.url}/v1/batches/{created['batch_id']}", headers=auth()
    )
    assert (status, document) == (200, "completed")
    status, result, _ = await call(
        http, "GET", f"{gateway.url}/v1/batches/{created['batch_id']}/result", headers=auth()
    )
    assert status == 200 and result["num_responses"] == 3
    status, listing, _ = await call(http, "GET", f"{gateway.url}/v1/batches", headers=auth())
    assert [item["batch_id"] for item in listing] == [created["batch_id"]]
    assert listing[0]["completed_at"] and listing[0]["failed_at"] is None


async def test_other_users_see_nothing(gateway: Server, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    _, created = await submit(http, gateway, {"input_file": input_file(tmp_path), "model": CHAT_MODEL})
    for path in (f"/v1/batches/{created['batch_id']}", f"/v1/batches/{created['batch_id']}/result"):
        status, document, _ = await call(http, "GET", gateway.url + path, headers=auth("bob"))
        assert status == 404 and assert_openai_error(document)["code"] == "batch_not_found"
    _, listing, _ = await call(http, "GET", f"{gateway.url}/v1/batches", headers=auth("bob"))
    assert listing == []


async def test_failed_batch_and_unfinished_results(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    compute.queue_delay = 0.5
    _, slow = await submit(http, gateway, {"input_file": input_file(tmp_path), "model": CHAT_MODEL})
    status, document, _ = await call(
        http, "GET", f"{gateway.url}/v1/batches/{slow['batch_id']}/result", headers=auth()
    )
    assert status == 400 and assert_openai_error(document)["code"] == "batch_pending"
    compute.queue_delay = 0
    _, broken = await submit(
        http, gateway, {"input_file": input_file(tmp_path, "empty.jsonl", 0), "model": CHAT_MODEL}
    )
    assert await finished(gateway, broken["batch_id"]) == "failed"
    status, document, _ = await call(
        http, "GET", f"{gateway.url}/v1/batches/{broken['batch_id']}/result", headers=auth()
    )
    assert status == 400 and "the input file is empty" in assert_openai_error(document)["message"]
    _, failed, _ = await call(http, "GET", f"{gateway.url}/v1/batches?status=failed", headers=auth())
    assert [item["batch_id"] for item in failed] == [broken["batch_id"]]


async def test_quota_and_duplicate_input(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    compute.queue_delay = 5
    first = input_file(tmp_path, "a.jsonl")
    assert (await submit(http, gateway, {"input_file": first, "model": CHAT_MODEL}))[0] == 200
    status, document = await submit(http, gateway, {"input_file": first, "model": CHAT_MODEL})
    assert status == 409 and assert_openai_error(document)["code"] == "batch_ongoing"
    assert (
        await submit(http, gateway, {"input_file": input_file(tmp_path, "b.jsonl"), "model": CHAT_MODEL})
    )[0] == 200
    status, document = await submit(
        http, gateway, {"input_file": input_file(tmp_path, "c.jsonl"), "model": CHAT_MODEL}
    )
    assert status == 429 and assert_openai_error(document)["code"] == "batch_quota"
    assert (await submit(http, gateway, {"input_file": first, "model": CHAT_MODEL}, user="bob"))[0] == 200


@pytest.mark.parametrize(
    "path, body, status, expected",
    [
        ("/hpc/vllm/v1/batches", {"model": CHAT_MODEL}, 400, "input_file"),
        ("/hpc/vllm/v1/batches", {"input_file": "/x", "model": CHAT_MODEL, "extra": 1}, 400, "extra"),
        (
            "/hpc/vllm/v1/batches",
            {"input_file": "/x", "model": "slow/Compute-Model"},
            400,
            "batch_not_enabled",
        ),
        ("/local/vllm/v1/batches", {"input_file": "/x", "model": CHAT_MODEL}, 400, "batch_not_enabled"),
        ("/nope/vllm/v1/batches", {"input_file": "/x", "model": CHAT_MODEL}, 404, "cluster_not_found"),
        ("/hpc/vllm/v1/batches", {"input_file": "/x", "model": "nope"}, 404, "model_not_found"),
    ],
)
async def test_bad_batch_requests(
    gateway: Server, http: aiohttp.ClientSession, path: str, body: dict[str, Any], status: int, expected: str
) -> None:
    got, document, _ = await call(http, "POST", gateway.url + path, json=body, headers=auth())
    assert got == status
    error = assert_openai_error(document, document["error"]["param"])
    assert expected in (error["param"], error["code"])


async def test_status_filter_is_checked(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/v1/batches?status=done", headers=auth())
    assert status == 400 and assert_openai_error(document, "status")
