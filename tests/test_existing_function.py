"""A site of the existing gateway moves over unchanged: its streaming function (imitated faithfully
in testing/existing_function.py) and its qstat function, through the real SDKs, the fake Compute
service and the relay, next to our own function (compute-functions/vllm_inference.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from globus_compute_sdk.serialize import ComputeSerializer

from adaptors.compute_results import UnreadableResult, read_result
from adaptors.remote_errors import remote_error
from proxy.core.registry import load_registry
from proxy.core.state import STATE
from proxy.settings.files import ConfigError
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from tests.compute_setup import ENDPOINT, LEGACY_MODEL, compute_config
from tests.conftest import CHAT_MODEL, TOKENS, Server, auth, chat, free_port, start_gateway
from tests.support import value
from tests.test_routes import assert_openai_error

MODELS = [LEGACY_MODEL, CHAT_MODEL]
"""The existing function, and ours."""


@pytest.fixture
async def gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await start_gateway(compute_config(tmp_path, backend, compute, globus, free_port()))
    yield server
    await runner.cleanup()


@pytest.fixture
async def unreachable(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    """A gateway whose callback_url no function can reach (nothing listens there)."""
    path = compute_config(tmp_path, backend, compute, globus, free_port())
    document = yaml.safe_load(path.read_text())
    document["streaming"]["callback_url"] = f"http://127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump(document))
    runner, server = await start_gateway(path)
    yield server
    await runner.cleanup()


def url(gateway: Server, path: str = "chat/completions") -> str:
    return f"{gateway.url}/hpc/vllm/v1/{path}"


async def sse(http: aiohttp.ClientSession, address: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    """The status and the events of a stream, comments left out."""
    async with http.post(address, json=body, headers=auth()) as response:
        text = (await response.read()).decode()
    return response.status, [event for event in text.split("\n\n") if event and not event.startswith(":")]


def outcomes(gateway: Server, model: str, outcome: str) -> float:
    text = gateway.app[STATE].metrics.exposition().decode()
    return value(text, "gateway_adaptor_duration_seconds_count", model=model, outcome=outcome)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
async def test_streams_end_with_exactly_one_done(
    gateway: Server, http: aiohttp.ClientSession, model: str, path: str
) -> None:
    """The existing function never forwards [DONE]; ours forwards vLLM's. Both end with one."""
    body: dict[str, Any] = {"model": model, "stream": True}
    body |= {"messages": [{"role": "user", "content": "[[chunks=30]]"}]} if path == "chat/completions" else {}
    body |= {"prompt": "[[chunks=30]]"} if path == "completions" else {}
    status, events = await sse(http, url(gateway, path), body)
    assert status == 200
    assert events.count("data: [DONE]") == 1 and events[-1] == "data: [DONE]"
    assert len(events) == 32, "30 tokens, the finish chunk, [DONE]: no line lost in the batches"


async def test_the_openai_client_reads_the_existing_functions_stream(gateway: Server) -> None:
    async with openai.AsyncOpenAI(base_url=url(gateway, ""), api_key=TOKENS["alice"], max_retries=0) as api:
        stream = await api.chat.completions.create(
            model=LEGACY_MODEL,
            messages=[{"role": "user", "content": "[[chunks=25]][[chunk_delay=0.03]]"}],
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) == 26 and text.startswith("Hello! This is")


@pytest.mark.parametrize("model", MODELS)
async def test_refused_callbacks_fail_the_stream_within_seconds(
    gateway: Server, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """The site's INTERNAL_STREAMING_SECRET differs from the gateway's: the first refused callback
    ends the stream with the reason, long before the first-chunk limit (900 s)."""
    monkeypatch.setenv("INTERNAL_STREAMING_SECRET", "not-the-gateways-secret")
    started = time.monotonic()
    body = chat("[[chunks=30]]", model=model, stream=True)
    async with http.post(url(gateway), json=body, headers=auth()) as response:
        status, document = response.status, await response.json()
    assert time.monotonic() - started < 5
    assert status == 502
    message = assert_openai_error(document)["message"]
    assert "callbacks were refused: check INTERNAL_STREAMING_SECRET" in message
    assert outcomes(gateway, model, "backend_error") == 1


async def test_a_result_that_relayed_nothing_is_a_502_not_an_empty_stream(
    unreachable: Server, http: aiohttp.ClientSession
) -> None:
    """The existing function's callbacks cannot reach the gateway: it still returns `completed`,
    with `chunks_sent_to_server: 0` and a warning, which the gateway reads."""
    async with http.post(url(unreachable), json=chat("[[chunks=3]]", model=LEGACY_MODEL, stream=True),
                         headers=auth()) as response:  # fmt: skip
        status, document = response.status, await response.json()
    assert status == 502
    message = assert_openai_error(document)["message"]
    assert "None of the model's output reached the gateway (5 chunks failed to send" in message
    assert "streaming.callback_url" in message
    assert outcomes(unreachable, LEGACY_MODEL, "backend_error") == 1
    assert outcomes(unreachable, LEGACY_MODEL, "ok") == 0


async def test_an_error_result_carries_vllms_status_and_message(
    unreachable: Server, http: aiohttp.ClientSession
) -> None:
    """vLLM refuses the request and the /error/ callbacks do not arrive: the result says why."""
    async with http.post(url(unreachable), json=chat("[[status=400]]", model=LEGACY_MODEL, stream=True),
                         headers=auth()) as response:  # fmt: skip
        status, document = response.status, await response.json()
    assert status == 400
    assert assert_openai_error(document)["message"] == "fake backend error 400"


async def test_an_error_after_some_output_is_an_error_event(
    gateway: Server, http: aiohttp.ClientSession, compute: FakeCompute
) -> None:
    """vLLM breaks off mid-stream: the existing function posts /error/ and returns status error."""
    body = chat("[[chunks=50]][[chunk_delay=0.02]][[die_after=40]]", model=LEGACY_MODEL, stream=True)
    status, events = await sse(http, url(gateway), body)
    assert status == 200
    assert events[0].startswith("data: {") and "data: [DONE]" not in events
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["message"] == "The model's backend failed: The remote task failed."
    assert outcomes(gateway, LEGACY_MODEL, "backend_error") == 1
    task = await compute.settled(next(iter(compute.tasks)))
    assert json.loads(task.value)["status"] == "error"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "status, expected",
    [
        (400, (400, "fake backend error 400")),
        (500, (502, "The model's backend failed: fake backend error 500")),
    ],
)
async def test_a_vllm_error_comes_back_with_vllms_status_and_message(
    gateway: Server, http: aiohttp.ClientSession, model: str, status: int, expected: tuple[int, str]
) -> None:
    """The existing function's error text holds vLLM's JSON, then the headers as a Python dict
    (braces too) and the time; the endpoint wraps it all in tracebacks."""
    async with http.post(
        url(gateway), json=chat(f"[[status={status}]]", model=model), headers=auth()
    ) as response:
        got = response.status, assert_openai_error(await response.json())["message"]
    assert got == expected


def test_error_texts_without_json_show_no_traceback_or_headers() -> None:
    """A body that is not JSON, and a failure that is not vLLM's, as the endpoint reports them: the
    client gets a generic message, the record the text."""
    text = (
        "Traceback (most recent call last):\n"
        '  File "/home/site/function.py", line 170, in handle\n'
        "    raise Exception(error_msg)\n"
        "Exception: API request failed with status code: 503\nResponse text: Service Unavailable\n"
        "Response headers: {'Content-Type': 'text/plain', 'Server': 'uvicorn'}\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/home/site/function.py", line 420, in vllm_inference_function\n'
        "    raise Exception(error_msg)\n"
        "Exception: Unexpected error of type Exception: API request failed with status code: 503\n"
        "Response text: Service Unavailable\n"
        "Response headers: {'Content-Type': 'text/plain', 'Server': 'uvicorn'}\n"
        "Response time: 0.0123\n"
    )
    failure = remote_error(text)
    assert (failure.status, failure.message) == (
        502,
        "The model's backend failed: The model's server answered HTTP 503.",
    )
    assert failure.detail == "API request failed with status code: 503\nResponse text: Service Unavailable"
    unreachable = (
        "Traceback (most recent call last):\n"
        '  File "/home/site/function.py", line 10, in run\n'
        "RuntimeError: vLLM is unreachable at http://127.0.0.1:8000: ConnectionRefusedError(111)\n"
    )
    failure = remote_error(unreachable)
    assert (failure.status, failure.message) == (
        502,
        "The model's backend failed: The remote task failed (RuntimeError).",
    )
    assert "127.0.0.1:8000" not in failure.message, "internal host names stay out of the client's answer"
    assert failure.detail == "vLLM is unreachable at http://127.0.0.1:8000: ConnectionRefusedError(111)"


async def test_jobs_from_the_existing_qstat_function(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Its private batch lists are spelled with hyphens; a running model whose Compute endpoint
    lost its managers is disconnected."""
    config = compute_config(
        tmp_path, backend, compute, globus, free_port(),
        timeouts={"jobs_cache_seconds": 0}, chat_config={"status_cache_seconds": 0},
    )  # fmt: skip
    runner, gateway = await start_gateway(config)
    try:
        async with http.get(f"{gateway.url}/hpc/jobs", headers=auth()) as response:
            assert response.status == 200
            report = await response.json()
        assert [job["Job ID"] for job in report["private_batch_running"]] == ["3"]
        assert [job["Job ID"] for job in report["private_batch_queued"]] == ["4"]
        assert report["running"][0]["Model Status"] == "running"
        assert report["cluster_status"] == {"free_nodes": 3}
        compute.set_endpoint(ENDPOINT, managers=0)
        async with http.get(f"{gateway.url}/hpc/jobs", headers=auth()) as response:
            report = await response.json()
        assert report["running"][0]["Model Status"] == "disconnected"
        assert report["private_batch_running"][0]["Model Status"] == "running", "as the existing gateway does"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["responses", "messages"])
async def test_named_event_streams_need_our_function(
    gateway: Server, http: aiohttp.ClientSession, compute: FakeCompute, path: str
) -> None:
    """The existing function would cut these streams short (it flushes only on [DONE]): a 400 that
    names the fix, in the route's own error shape, and no task is submitted."""
    body: dict[str, Any] = {"model": LEGACY_MODEL, "stream": True}
    if path == "responses":
        body["input"] = "Hello"
    else:
        body |= {"max_tokens": 50, "messages": [{"role": "user", "content": "Hello"}]}
    async with http.post(url(gateway, path), json=body, headers=auth()) as response:
        status, document = response.status, await response.json()
    assert status == 400
    if path == "messages":
        assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error"
        message = document["error"]["message"]
    else:
        message = assert_openai_error(document)["message"]
    assert "compute-functions/vllm_inference.py" in message and "callback_protocol: gateway" in message
    assert not compute.tasks
    body["stream"] = False
    async with http.post(url(gateway, path), json=body, headers=auth()) as response:
        assert response.status == 200, "not streamed, the existing function serves these APIs"


def test_fixture_endpoints_speak_the_existing_protocol(tmp_path: Path) -> None:
    """A fixture of the existing gateway has no callback_protocol; a wrong one stops start-up."""
    cluster = {
        "cluster_name": "sophia",
        "cluster_adapter": "resource_server_async.clusters.direct_api.DirectAPICluster",
        "frameworks": ["vllm"],
        "openai_endpoints": ["chat/completions", "responses"],
        "config": {"status_url": "http://127.0.0.1:9/jobs"},
    }
    config = {
        "api_port": 8000,
        "endpoint_uuid": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a",
        "function_uuid": "11111111-aaaa-4bbb-8ccc-000000000003",
        "client_id": "service-id",
        "client_secret": "service-secret",
    }
    endpoint = {
        "cluster": "sophia",
        "framework": "vllm",
        "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "endpoint_adapter": "resource_server_async.endpoints.globus_compute.GlobusComputeEndpoint",
        "config": config,
    }

    def load(config: dict[str, Any]) -> Any:
        records = [
            {"model": "resource_server_async.endpoint", "pk": 1, "fields": {**endpoint, "config": config}}
        ]
        (tmp_path / "endpoints.json").write_text(json.dumps(records))
        cluster_records = [{"model": "resource_server_async.cluster", "pk": 1, "fields": cluster}]
        (tmp_path / "clusters.json").write_text(json.dumps(cluster_records))
        return load_registry(tmp_path / "endpoints.json", tmp_path / "clusters.json")

    (loaded,) = load(config).endpoints.values()
    assert loaded.config.callback_protocol == "existing"
    (loaded,) = load({**config, "callback_protocol": "gateway"}).endpoints.values()
    assert loaded.config.callback_protocol == "gateway"
    with pytest.raises(ConfigError, match=r"endpoints\.json, entry 1 .*config\.callback_protocol"):
        load({**config, "callback_protocol": "ours"})


OLD_ENDPOINT = "3d8b6e1a-9f5c-4a4d-9e0f-7b8c9d0e1f2a"
"""A Compute endpoint older than `result_serializers`: it answers in dill whatever was asked."""


@pytest.mark.parametrize("accept", [False, True])
async def test_results_of_an_older_compute_endpoint(
    backend: Server,
    compute: FakeCompute,
    globus: FakeGlobus,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    accept: bool,
) -> None:
    """Refused by default with the cause and the fix; read (as plain data) when the site opts in."""
    compute.add_endpoint(OLD_ENDPOINT, honours_result_serializers=False)
    config = compute_config(tmp_path, backend, compute, globus, free_port())
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    legacy = next(entry for entry in endpoints if entry["model"] == LEGACY_MODEL)
    legacy["config"] |= {"endpoint_uuid": OLD_ENDPOINT, "accept_dill_results": accept}
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    clusters = yaml.safe_load((tmp_path / "clusters.yaml").read_text())
    hpc = next(entry for entry in clusters if entry["cluster_name"] == "hpc")
    hpc["config"] |= {"qstat_endpoint_uuid": OLD_ENDPOINT, "accept_dill_results": accept}
    (tmp_path / "clusters.yaml").write_text(yaml.safe_dump(clusters))
    runner, gateway = await start_gateway(config)
    try:
        async with http.post(url(gateway), json=chat(model=LEGACY_MODEL), headers=auth()) as response:
            status, document = response.status, await response.json()
        async with http.get(f"{gateway.url}/hpc/jobs", headers=auth()) as response:
            jobs_status, jobs = response.status, await response.json()
    finally:
        await runner.cleanup()
    assert all(task.result and task.result.startswith("00\n") for task in compute.tasks.values())
    if accept:
        assert status == 200 and document["choices"][0]["message"]["content"]
        assert jobs_status == 200 and jobs["running"]
        return
    for code, answer in ((status, document), (jobs_status, jobs)):
        message = assert_openai_error(answer)["message"]
        assert code == 502 and "serialized with dill" in message
        assert "Upgrade globus-compute-endpoint" in message and "accept_dill_results: true" in message


def test_only_plain_data_is_read_from_a_dill_result() -> None:
    """Even from a trusted endpoint: a pickle that names a class or function is not loaded."""
    serializer = ComputeSerializer()
    assert (
        read_result(serializer, serializer.serialize('{"a": [1, 2.5, null]}'), True)
        == '{"a": [1, 2.5, null]}'
    )
    assert read_result(serializer, serializer.serialize({"n": (1, "x")}), True) == {"n": (1, "x")}
    with pytest.raises(UnreadableResult, match="not plain data"):
        read_result(serializer, serializer.serialize(Path("/etc")), True)
    with pytest.raises(UnreadableResult, match="does not read"):  # a function, pickled as code
        read_result(serializer, serializer.serialize(print), True)
    with pytest.raises(UnreadableResult, match="serialized with dill"):
        read_result(serializer, serializer.serialize("{}"), False)


async def test_a_stream_the_existing_function_cut_short_ends_with_an_error(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Misconfigured as `gateway`, the existing function streams a Responses answer: its last batch
    never leaves (no [DONE]), and its result says so; the client gets an error, not a clean end."""
    config = compute_config(tmp_path, backend, compute, globus, free_port())
    endpoints = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    next(e for e in endpoints if e["model"] == LEGACY_MODEL)["config"]["callback_protocol"] = "gateway"
    (tmp_path / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
    runner, gateway = await start_gateway(config)
    try:
        body = {"model": LEGACY_MODEL, "stream": True, "input": "[[chunks=30]]"}
        status, events = await sse(http, url(gateway, "responses"), body)
    finally:
        await runner.cleanup()
    assert status == 200 and events[0].startswith("event: response.created")
    assert not any("response.completed" in event for event in events)
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert re.fullmatch(
        r"The stream is incomplete: the compute function relayed \d+ of 76 lines and never sent the rest "
        r"\(the existing function sends its last lines only on 'data: \[DONE\]'\)\.",
        error["message"],
    )
