"""Non-streamed Globus Compute answers pushed by the function through the real relay (in-process and
Redis), with polling as the fallback: our function (compute-functions/vllm_inference.py) run by the
fake Compute service, whose task result is held back for a second after the function returns, so
that an answer within that second can only have been pushed."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from adaptors.compute_config import GlobusComputeEndpointConfig
from adaptors.compute_push import PUSH_WHILE_WAITING_FOR
from testing.existing_function import existing_vllm_function
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from tests.compute_setup import ENDPOINT, LEGACY, LEGACY_MODEL, SECRET, compute_config, load_function
from tests.conftest import CHAT_MODEL, Server, auth, chat, free_port, start_gateway
from tests.test_routes import call

SLOW_RESULT = "11111111-aaaa-4bbb-8ccc-000000000011"
OVERSIZED = "11111111-aaaa-4bbb-8ccc-000000000012"
RESULT_HELD_SECONDS = 1.0
CALLBACK_KEYS = {
    "streaming_server_host",
    "streaming_server_port",
    "streaming_server_protocol",
    "stream_task_id",
    "stream_task_token",
}


def held(function: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
    """The function's result reaches the service a second after the function has its answer."""

    def run(parameters: dict[str, Any]) -> str:
        answer = function(parameters)
        time.sleep(RESULT_HELD_SECONDS)
        return answer

    return run


def oversized_push(parameters: dict[str, Any]) -> str:
    """Our function's answer, after a push over the data route's 150 kB limit with the right secret
    and token (what a function without our function's own bound would send)."""
    params = parameters["model_params"]
    unpushed = {key: value for key, value in params.items() if key not in CALLBACK_KEYS}
    answer = load_function()({"model_params": unpushed})
    document = {"task_id": params["stream_task_id"], "data": "data: " + " " * 160_000 + answer}
    request = urllib.request.Request(
        f"http://{params['streaming_server_host']}:{params['streaming_server_port']}"
        "/resource_server/api/streaming/data/",
        data=json.dumps(document).encode(),
        headers={
            "Content-Type": "application/json",
            "X-Internal-Secret": SECRET,
            "X-Stream-Task-Token": params["stream_task_token"],
        },
    )
    try:
        urllib.request.urlopen(request, timeout=5).read()
        status = 200
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 413, status
    time.sleep(RESULT_HELD_SECONDS)
    return answer


@pytest.fixture(params=["local", "redis"])
async def gateway(
    request: pytest.FixtureRequest,
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    tmp_path: Path,
    redis_url: str,
) -> AsyncIterator[Server]:
    compute.register_function(SLOW_RESULT, held(load_function()))
    relay = redis_url if request.param == "redis" else None
    path = compute_config(
        tmp_path, backend, compute, globus, free_port(), relay, chat_config={"function_uuid": SLOW_RESULT}
    )
    runner, server = await start_gateway(path)
    yield server
    await runner.cleanup()


async def ask(http: aiohttp.ClientSession, gateway: Server, model: str = CHAT_MODEL) -> tuple[float, Any]:
    """Seconds to the answer, and the answer's content."""
    started = time.monotonic()
    status, document, _ = await call(
        http, "POST", f"{gateway.url}/hpc/vllm/v1/chat/completions", json=chat("Hi", model), headers=auth()
    )
    assert status == 200, document
    return time.monotonic() - started, document["choices"][0]["message"]["content"]


def status_calls_naming(compute: FakeCompute, task_id: str) -> list[float]:
    return [
        request.time
        for request in compute.requests
        if request.path.endswith("/batch_status") and task_id in (request.json or {}).get("task_ids", [])
    ]


@pytest.mark.alone("answered within 0.8 s, before the result held for 1 s")
async def test_a_pushed_answer_comes_before_the_result_and_ends_the_polling(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    elapsed, content = await ask(http, gateway)
    answered = time.monotonic()
    assert content
    assert elapsed < RESULT_HELD_SECONDS * 0.8, "answered by the push, not by the held result"
    (task_id,) = compute.tasks
    await compute.settled(task_id)
    assert [at for at in status_calls_naming(compute, task_id) if at > answered] == []
    params = compute.tasks[task_id].args[0]["model_params"]
    assert params.keys() >= CALLBACK_KEYS


async def test_a_push_that_never_comes_is_answered_by_polling(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the secret on the endpoint our function does not push."""
    monkeypatch.delenv("INTERNAL_STREAMING_SECRET")
    elapsed, content = await ask(http, gateway)
    assert content
    assert elapsed >= RESULT_HELD_SECONDS
    (task_id,) = compute.tasks
    assert status_calls_naming(compute, task_id)


async def test_a_push_with_a_wrong_secret_is_refused_and_the_result_polled(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERNAL_STREAMING_SECRET", "not-the-gateways-secret")
    elapsed, content = await ask(http, gateway)
    assert content
    assert elapsed >= RESULT_HELD_SECONDS


async def test_an_oversized_push_is_refused_and_the_result_polled(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    compute.register_function(OVERSIZED, oversized_push)
    path = compute_config(
        tmp_path, backend, compute, globus, free_port(), chat_config={"function_uuid": OVERSIZED}
    )
    runner, gateway = await start_gateway(path)
    try:
        elapsed, content = await ask(http, gateway)
    finally:
        await runner.cleanup()
    assert content
    assert elapsed >= RESULT_HELD_SECONDS
    (task,) = compute.tasks.values()
    assert task.exception is None, "the function's push was answered 413"


async def test_the_existing_function_gets_nothing_new_and_is_polled(
    gateway: Server, compute: FakeCompute, backend: Server, http: aiohttp.ClientSession
) -> None:
    given: list[set[str]] = []

    def existing(parameters: dict[str, Any]) -> str:
        given.append(set(parameters["model_params"]))  # before the function pops its own keys
        return existing_vllm_function(parameters)

    compute.register_function(LEGACY, existing)
    _, content = await ask(http, gateway, LEGACY_MODEL)
    assert content
    assert given == [{"model", "messages", "openai_endpoint", "api_port"}]


def test_push_results_cannot_be_turned_on_for_the_existing_function() -> None:
    base = {
        "api_port": 8000,
        "endpoint_uuid": ENDPOINT,
        "function_uuid": SLOW_RESULT,
        "client_id": "id",
        "client_secret": "secret",
    }
    assert GlobusComputeEndpointConfig.model_validate(base).pushes is False
    assert GlobusComputeEndpointConfig.model_validate({**base, "callback_protocol": "gateway"}).pushes
    off = {**base, "callback_protocol": "gateway", "push_results": False}
    assert GlobusComputeEndpointConfig.model_validate(off).pushes is False
    with pytest.raises(ValidationError, match="push_results needs callback_protocol: gateway"):
        GlobusComputeEndpointConfig.model_validate({**base, "push_results": True})


async def test_a_push_for_an_unknown_or_answered_slot_is_refused_without_a_warning(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A push that comes after its request was answered finds its slot released (410); one for a
    slot that never existed gets 404. Neither is worth a warning: the function ignores the answer."""
    await ask(http, gateway)
    (task,) = compute.tasks.values()
    params = task.args[0]["model_params"]
    callback = f"{gateway.url}/api/streaming/data/"
    pushes = [
        (params["stream_task_id"], params["stream_task_token"], 410),
        ("00000000-0000-4000-8000-000000000000", "any-token", 404),
    ]
    with caplog.at_level("WARNING"):
        for slot, token, expected in pushes:
            headers = {"X-Internal-Secret": SECRET, "X-Stream-Task-Token": token}
            document = {"task_id": slot, "data": "data: {}", "type": "result"}
            status, answer, _ = await call(http, "POST", callback, json=document, headers=headers)
            assert status == expected, answer
    assert [record for record in caplog.records if record.levelname == "WARNING"] == []


async def test_with_many_requests_waiting_answers_are_polled_not_pushed(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    """Under load one status call answers for every pending task, at less cost than a push each."""
    address = f"{gateway.url}/hpc/vllm/v1/chat/completions"

    async def slow() -> None:
        status, _, _ = await call(http, "POST", address, json=chat("[[delay=1]]"), headers=auth())
        assert status == 200

    waiting = [asyncio.create_task(slow()) for _ in range(PUSH_WHILE_WAITING_FOR)]
    while len(compute.tasks) < PUSH_WHILE_WAITING_FOR:
        await asyncio.sleep(0.01)
    _, content = await ask(http, gateway)
    await asyncio.gather(*waiting)
    assert content
    pushed = [set(task.args[0]["model_params"]) >= CALLBACK_KEYS for task in compute.tasks.values()]
    assert pushed.count(False) == 1
