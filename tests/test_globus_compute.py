"""Globus Compute backends end to end: the real SDKs against local fakes of Globus Auth and Globus
Compute, whose "remote" functions run for real (our compute function calling the fake vLLM, or
callers that behave like the existing gateway's function), streaming back through the relay."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from proxy.core.state import STATE
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_vllm import DISCONNECTS, REQUESTS
from tests.compute_setup import (
    ENDPOINT,
    ROOT,
    SLOW_MODEL,
    compute_config,
)
from tests.conftest import (
    CHAT_MODEL,
    TOKENS,
    Server,
    auth,
    chat,
    free_port,
    start_gateway,
)
from tests.processes import wait_until_serving
from tests.support import value
from tests.test_routes import assert_openai_error, call

PUSH_KEYS = (
    "streaming_server_host",
    "streaming_server_port",
    "streaming_server_protocol",
    "stream_task_id",
    "stream_task_token",
)


@pytest.fixture
async def gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await start_gateway(compute_config(tmp_path, backend, compute, globus, free_port()))
    yield server
    await runner.cleanup()


def hpc(gateway: Server) -> str:
    return f"{gateway.url}/hpc/vllm/v1"


def client(gateway: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=hpc(gateway), api_key=TOKENS["alice"], max_retries=0)


async def test_chat_through_globus_compute_with_the_existing_payload(
    gateway: Server, compute: FakeCompute, backend: Server, globus: FakeGlobus
) -> None:
    async with client(gateway) as api:
        answer = await api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], extra_body={"top_k": 3}
        )
    assert answer.choices[0].message.content
    task = next(iter(compute.tasks.values()))
    (argument,) = task.args
    callback = {key: argument["model_params"].pop(key) for key in PUSH_KEYS}
    assert argument == {
        "model_params": {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "top_k": 3,
            "openai_endpoint": "chat/completions",
            "api_port": int(backend.url.rsplit(":", 1)[1]),
        }
    }
    assert callback["streaming_server_protocol"] == "http", "our function is given the push's details"
    assert backend.app[REQUESTS][-1]["body"] == {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "top_k": 3,
    }
    submit = next(r for r in compute.requests if r.path.endswith("/submit"))
    assert submit.json["result_serializers"] == ["globus_compute_sdk.serialize.JSONData"]
    assert submit.authorization in {f"Bearer {token}" for token in globus.issued_tokens}


async def test_one_poller_asks_for_every_task_at_once(gateway: Server, compute: FakeCompute) -> None:
    async with client(gateway) as api:
        answers = await asyncio.gather(
            *(
                api.chat.completions.create(
                    model=CHAT_MODEL, messages=[{"role": "user", "content": f"q{n} [[delay=0.3]]"}]
                )
                for n in range(20)
            )
        )
    assert len(answers) == 20
    polls = [r for r in compute.requests if r.path.endswith("/batch_status")]
    assert max(len(r.json["task_ids"]) for r in polls) >= 10
    assert len(polls) < 40, "a poll per request per tick would make hundreds"


async def test_vllm_client_error_comes_back_as_that_error(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    status, document, _ = await call(
        http, "POST", f"{hpc(gateway)}/chat/completions", json=chat("[[status=400]]"), headers=auth()
    )
    assert status == 400
    assert assert_openai_error(document)["message"] == "fake backend error 400"


async def test_task_failure_is_502(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(
        http, "POST", f"{hpc(gateway)}/chat/completions", json=chat("[[status=500]]"), headers=auth()
    )
    assert status == 502
    assert assert_openai_error(document)["type"] == "upstream_error"


async def test_timeout_is_504_with_the_task_id_and_spares_other_requests(
    gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    url = f"{hpc(gateway)}/chat/completions"
    slow = call(http, "POST", url, json=chat("[[delay=1]]", model=SLOW_MODEL), headers=auth())
    patient = call(http, "POST", url, json=chat("[[delay=1]]"), headers=auth())
    (slow_status, slow_document, _), (patient_status, _, _) = await asyncio.gather(slow, patient)
    assert slow_status == 504 and patient_status == 200
    message = assert_openai_error(slow_document)["message"]
    assert any(task_id in message for task_id in compute.tasks)


def in_flight(gateway: Server) -> float:
    """Compute tasks the gateway waits for: its requests that have submitted theirs."""
    return value(gateway.app[STATE].metrics.exposition().decode(), "gateway_compute_tasks_in_flight")


async def test_offline_endpoint_and_cold_start_are_503(
    gateway: Server,
    compute: FakeCompute,
    http: aiohttp.ClientSession,
    backend: Server,
    globus: FakeGlobus,
    tmp_path: Path,
) -> None:
    compute.set_endpoint(ENDPOINT, status="offline")
    (tmp_path / "x").mkdir()
    runner, fresh = await start_gateway(compute_config(tmp_path / "x", backend, compute, globus, free_port()))
    try:
        status, document, _ = await call(
            http, "POST", f"{hpc(fresh)}/chat/completions", json=chat(), headers=auth()
        )
        assert status == 503 and "offline" in assert_openai_error(document)["message"]
    finally:
        await runner.cleanup()
    compute.set_endpoint(ENDPOINT, status="online", managers=0)
    (tmp_path / "y").mkdir()
    runner, cold = await start_gateway(compute_config(tmp_path / "y", backend, compute, globus, free_port()))
    try:
        first = call(http, "POST", f"{hpc(cold)}/chat/completions", json=chat(), headers=auth())
        first_task = asyncio.ensure_future(first)
        deadline = time.monotonic() + 10
        while not first_task.done() and in_flight(cold) < 1:  # not a fixed pause: CI may stall
            assert time.monotonic() < deadline, "the first request never submitted its task"
            await asyncio.sleep(0.005)
        status, document, _ = await call(
            http, "POST", f"{hpc(cold)}/chat/completions", json=chat(), headers=auth()
        )
        assert status == 503 and "starting" in assert_openai_error(document)["message"]
        assert (await first_task)[0] == 200
    finally:
        await runner.cleanup()


async def test_streaming_through_the_relay_with_the_openai_client(gateway: Server) -> None:
    async with client(gateway) as api:
        stream = await api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "[[chunks=30]]"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 30 and text


async def test_streaming_with_curl(gateway: Server) -> None:
    body = json.dumps(
        {
            "model": CHAT_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "[[chunks=3]][[chunk_delay=0.7]]"}],
        }
    )
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "-H", f"Authorization: Bearer {TOKENS['alice']}",
        "-H", "Content-Type: application/json",
        "-d", body, f"{hpc(gateway)}/chat/completions", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 10)
    assert first.startswith(b"data: {") and process.returncode is None
    rest = await asyncio.wait_for(process.stdout.read(), 15)
    assert await process.wait() == 0 and rest.rstrip().endswith(b"data: [DONE]")


async def test_streaming_error_before_any_chunk_is_a_plain_status(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    status, document, _ = await call(
        http,
        "POST",
        f"{hpc(gateway)}/chat/completions",
        json=chat("[[status=400]]", stream=True),
        headers=auth(),
    )
    assert status == 400 and assert_openai_error(document)["message"] == "fake backend error 400"


async def test_client_disconnect_stops_the_remote_generation(
    gateway: Server, backend: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    body = chat("[[chunks=100]][[chunk_delay=0.05]]", stream=True)
    response = await http.post(f"{hpc(gateway)}/chat/completions", json=body, headers=auth())
    assert (await response.content.readany()).startswith(b"data: ")
    response.close()
    task = await compute.settled(next(iter(compute.tasks)), timeout=10)
    assert json.loads(task.value)["cancelled"] is True
    assert backend.app[DISCONNECTS] == 1


async def test_jobs_from_the_qstat_function(gateway: Server, http: aiohttp.ClientSession) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/hpc/jobs", headers=auth())
    assert status == 200
    assert document["running"][0]["Models"] == f"{CHAT_MODEL},{SLOW_MODEL}"
    assert document["running"][0]["Job ID"] == "1"
    assert document["queued"] == [], "models without an endpoint the caller may use are hidden"


async def test_redis_relay_across_two_gateway_processes(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, redis_url: str
) -> None:
    """The client holds its stream on this process; the function's callbacks land on another one."""
    receiver_port = free_port()
    (tmp_path / "receiver").mkdir()
    receiver_config = compute_config(
        tmp_path / "receiver", backend, compute, globus, receiver_port, redis_url
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(receiver_config), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    (tmp_path / "holder").mkdir()
    holder_config = compute_config(tmp_path / "holder", backend, compute, globus, free_port(), redis_url)
    document = yaml.safe_load(holder_config.read_text())
    document["streaming"]["callback_url"] = f"http://127.0.0.1:{receiver_port}"
    holder_config.write_text(yaml.safe_dump(document))
    runner, holder = await start_gateway(holder_config)
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until_serving(http, f"http://127.0.0.1:{receiver_port}/resource_server/health")
        async with client(holder) as api:
            stream = await api.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "[[chunks=10]]"}], stream=True
            )
            chunks = [chunk async for chunk in stream]
        assert len([c for c in chunks if c.choices]) >= 10
    finally:
        await runner.cleanup()
        process.terminate()
        await process.wait()


async def test_compute_telemetry(gateway: Server, http: aiohttp.ClientSession) -> None:
    for prompt in ("Hi", "[[status=400]]"):
        await call(http, "POST", f"{hpc(gateway)}/chat/completions", json=chat(prompt), headers=auth())
    text = gateway.app[STATE].metrics.exposition().decode()
    endpoint = {"adaptor": "GlobusComputeEndpoint", "cluster": "hpc", "model": CHAT_MODEL}
    # "Hi" was answered by push: the service was never asked about its task, so its queue time is unknown
    assert value(text, "gateway_phase_duration_seconds_count", **endpoint, phase="queue") == 1
    assert value(text, "gateway_upstream_errors_total", **endpoint, kind="4xx") == 1
    assert value(text, "gateway_compute_tasks_in_flight") == 0
    assert value(text, "gateway_compute_poll_duration_seconds_count") > 0
