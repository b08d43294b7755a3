"""Federated routing (`/v1/...` without a cluster): ranking by job reports and requests in flight,
failover before the first byte, and its errors, against real gateways and three fake backends."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.core.slug import endpoint_slug
from proxy.settings import load_settings
from proxy.settings.files import ConfigError
from testing.fake_vllm import REQUESTS, create_backend_app, error_response
from tests.support import (
    CHAT_MODEL,
    EMBED_MODEL,
    TOKENS,
    USERS,
    Server,
    auth,
    chat,
    closed_port_url,
    endpoint,
    start,
    start_gateway,
    stdout_lines,
    value,
    write_yaml,
)

CLUSTERS = ("c1", "c2", "c3")
SECRET_MODEL = "secret/model"
FEDERATED_ROUTE = "/resource_server/v1/{openai_path}"
JOB_LISTS = ("running", "queued", "stopped", "others", "private_batch_running", "private_batch_queued")


@dataclass
class Backend:
    """A fake vLLM whose faults are its own, unlike prompt directives, which every backend obeys."""

    url: str
    app: web.Application
    refuse_with: int | None = None
    delay: float = 0.0
    posts: int = 0

    @property
    def served(self) -> int:
        return len(self.app[REQUESTS])


def with_faults(backend: Backend) -> Middleware:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST":
            backend.posts += 1
            await asyncio.sleep(backend.delay)
            if backend.refuse_with is not None:
                return error_response(backend.refuse_with, "The model is still loading.")
        return await handler(request)

    return faults


@dataclass
class JobsBoard:
    """Status documents for several clusters: each reports the test models in the state set for it
    ("running", "queued", "stopped", or "fail" for a failing status server)."""

    states: dict[str, str] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    concurrent: int = 0
    most_concurrent: int = 0
    url: str = ""

    async def jobs(self, request: web.Request) -> web.Response:
        cluster = request.match_info["cluster"]
        self.calls[cluster] += 1
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.delays.get(cluster, 0.0))
            state = self.states.get(cluster, "stopped")
            if state == "fail":
                return web.json_response({"error": "qstat failed"}, status=500)
            document: dict[str, Any] = {name: [] for name in JOB_LISTS}
            job = {"Models": f"{CHAT_MODEL}, {EMBED_MODEL}", "Framework": "vllm", "Cluster": cluster}
            document[state].append(job)
            return web.json_response(document)
        finally:
            self.concurrent -= 1


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started, runners = [], []
    for _ in CLUSTERS:
        app = create_backend_app(models=[CHAT_MODEL, EMBED_MODEL])
        backend = Backend(url="", app=app)
        app.middlewares.append(with_faults(backend))
        runner, backend.url = await start(app)
        started.append(backend)
        runners.append(runner)
    yield started
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def board() -> AsyncIterator[JobsBoard]:
    board = JobsBoard()
    app = web.Application()
    app.router.add_get("/jobs/{cluster}", board.jobs)
    runner, board.url = await start(app)
    yield board
    await runner.cleanup()


async def federated_gateway(
    tmp_path: Path,
    backends: list[Backend],
    board: JobsBoard,
    *,
    configs: dict[str, dict[str, Any]] | None = None,
    jobs_cache_seconds: float = 60,
    **settings: Any,
) -> tuple[web.AppRunner, Server]:
    """Clusters c1, c2, c3 each serve the chat model with their own backend (c2 also the embedding
    model); `private`, open to uni.edu only and to chat only, serves SECRET_MODEL."""
    everything = ["chat/completions", "completions", "embeddings", "responses", "messages"]
    clusters: list[dict[str, Any]] = [
        {
            "cluster_name": name,
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm"],
            "openai_endpoints": everything,
            "config": {"status_url": f"{board.url}/jobs/{name}"},
        }
        for name in CLUSTERS
    ]
    clusters.append(
        {
            **clusters[0],
            "cluster_name": "private",
            "openai_endpoints": ["chat/completions"],
            "allowed_domains": ["uni.edu"],
            "config": {"status_url": f"{board.url}/jobs/private"},
        }
    )
    configs = configs or {}
    endpoints = [
        endpoint(name, CHAT_MODEL, f"{backend.url}/v1", config=configs.get(name, {}))
        for name, backend in zip(CLUSTERS, backends, strict=True)
    ]
    endpoints.append(endpoint("c2", EMBED_MODEL, f"{backends[1].url}/v1"))
    endpoints.append(endpoint("private", SECRET_MODEL, f"{backends[0].url}/v1"))
    tokens = {"tokens": [{"token": TOKENS[name], "user": USERS[name]} for name in TOKENS]}
    write_yaml(tmp_path / "clusters.yaml", clusters)
    write_yaml(tmp_path / "endpoints.yaml", endpoints)
    write_yaml(tmp_path / "tokens.yaml", tokens)
    config = write_yaml(
        tmp_path / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "timeouts": {"jobs_cache_seconds": jobs_cache_seconds},
            "limits": {"requests_per_second": 0, "concurrent_per_user": 0},
            "auth": {"provider": "static", "static": {"tokens_file": "tokens.yaml"}},
            "endpoints_file": "endpoints.yaml",
            "clusters_file": "clusters.yaml",
            **settings,
        },
    )
    return await start_gateway(config)


@pytest.fixture
async def gateway_of(tmp_path: Path, backends: list[Backend], board: JobsBoard) -> AsyncIterator[Any]:
    """Starts a gateway with the given settings (once per test); stopped at the end."""
    runners = []

    async def make(**settings: Any) -> Server:
        runner, server = await federated_gateway(tmp_path, backends, board, **settings)
        runners.append(runner)
        return server

    yield make
    for runner in runners:
        await runner.cleanup()


def slug(cluster: str, model: str = CHAT_MODEL) -> str:
    return endpoint_slug(cluster, "vllm", model)


async def post(
    http: aiohttp.ClientSession,
    gateway: Server,
    body: dict[str, Any],
    user: str = "alice",
    path: str = "chat/completions",
) -> tuple[int, Any, str | None]:
    """Status, the JSON answer (or the raw text of a stream) and the endpoint the gateway names."""
    async with http.post(f"{gateway.url}/v1/{path}", json=body, headers=auth(user)) as response:
        text = await response.text()
        answer = text if response.content_type == "text/event-stream" else json.loads(text)
        return response.status, answer, response.headers.get("X-Gateway-Endpoint")


def served_by(backends: list[Backend]) -> list[int]:
    return [backend.served for backend in backends]


@pytest.mark.parametrize(
    "states, expected",
    [
        (("stopped", "queued", "running"), "c3"),
        (("stopped", "queued", "stopped"), "c2"),
        (("fail", "stopped", "queued"), "c3"),
        (("fail", "running", "running"), "c2"),
        (("fail", "stopped", "stopped"), "c1"),
    ],
)
async def test_running_then_queued_then_the_rest(
    gateway_of: Any,
    board: JobsBoard,
    backends: list[Backend],
    http: aiohttp.ClientSession,
    states: tuple[str, ...],
    expected: str,
) -> None:
    board.states = dict(zip(CLUSTERS, states, strict=True))
    gateway = await gateway_of()
    status, answer, named = await post(http, gateway, chat())
    assert status == 200 and answer["model"] == CHAT_MODEL
    assert named == slug(expected)
    assert served_by(backends) == [int(name == expected) for name in CLUSTERS]


async def test_fewest_requests_in_flight_among_equals(
    gateway_of: Any, board: JobsBoard, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    board.states = {"c1": "running", "c2": "running", "c3": "queued"}
    gateway = await gateway_of()
    held = chat("[[chunks=4]][[chunk_delay=0.25]]", stream=True)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=held, headers=auth()) as stream:
        assert stream.headers["X-Gateway-Endpoint"] == slug("c1")
        await stream.content.readline()
        assert (await post(http, gateway, chat()))[2] == slug("c2"), "c1 has a stream in flight"
        assert (await post(http, gateway, chat(stream=True)))[2] == slug("c2"), "c2 has none left"
        rest = await stream.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert (await post(http, gateway, chat()))[2] == slug("c1"), "the stream has ended"
    assert backends[2].served == 0


async def test_refused_connection_fails_over_and_records_the_endpoint_used(
    gateway_of: Any,
    backends: list[Backend],
    http: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    gateway = await gateway_of(configs={"c1": {"api_url": closed_port_url()}})
    metrics_url = gateway.url.removesuffix("/resource_server") + "/metrics"
    for body in (chat(), chat("[[chunks=3]]", stream=True)):
        status, answer, named = await post(http, gateway, body)
        assert status == 200 and named == slug("c2")
        assert "data: [DONE]" in answer if body.get("stream") else answer["choices"]
    assert served_by(backends) == [0, 2, 0]
    async with http.get(metrics_url) as response:
        metrics = await response.text()
    assert (
        value(metrics, "gateway_requests_total", route=FEDERATED_ROUTE, cluster="c2", status_class="2xx") == 2
    )
    assert value(metrics, "gateway_requests_total", route=FEDERATED_ROUTE, cluster="c1") == 0
    failed = {"cluster": "c1", "outcome": "backend_error"}
    assert value(metrics, "gateway_adaptor_duration_seconds_count", **failed) == 2

    def federated(lines: list[str]) -> list[dict[str, Any]]:
        records = (json.loads(line) for line in lines if line.startswith("{"))
        return [record for record in records if record["route"] == FEDERATED_ROUTE]

    chats = federated(await stdout_lines(capfd, until=lambda lines: len(federated(lines)) >= 2))
    assert [(r["cluster"], r["endpoint_slug"], r["stream"]) for r in chats] == [
        ("c2", slug("c2"), False),
        ("c2", slug("c2"), True),
    ]


async def test_timeout_before_headers_fails_over(
    gateway_of: Any, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    backends[0].delay = 3.0
    gateway = await gateway_of(configs={"c1": {"api_request_timeout": 0.3}})
    for body in (chat(), chat(stream=True)):
        started = time.monotonic()
        status, _, named = await post(http, gateway, body)
        assert (status, named) == (200, slug("c2"))
        assert time.monotonic() - started < 2.5
    assert backends[0].posts == 2 and served_by(backends) == [0, 2, 0]


async def test_cold_start_503_fails_over_but_a_client_error_does_not(
    gateway_of: Any, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    backends[0].refuse_with = 503
    gateway = await gateway_of()
    status, _, named = await post(http, gateway, chat())
    assert (status, named) == (200, slug("c2"))
    backends[0].refuse_with = None
    status, answer, named = await post(http, gateway, chat("[[status=400]]"))
    assert (status, named) == (400, slug("c1"))
    assert answer["error"]["message"] == "fake backend error 400"
    assert [b.posts for b in backends] == [2, 1, 0]


async def test_all_down_is_503_with_a_reason_per_endpoint_tried(
    gateway_of: Any, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    for backend in backends:
        backend.refuse_with = 503
    backends[1].refuse_with = 502
    gateway = await gateway_of(federation={"max_attempts": 2}, maintenance={"c3": "Upgrading."})
    status, answer, named = await post(http, gateway, chat())
    assert status == 503 and named is None
    error = answer["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "model_unavailable")
    message = error["message"]
    assert CHAT_MODEL in message
    assert "c3/vllm: Upgrading." in message
    assert "c1/vllm: The model is still loading." in message
    assert "c2/vllm: The model is still loading." in message
    assert "private" not in message
    assert [b.posts for b in backends] == [1, 1, 0]


async def test_unknown_model_is_404(gateway_of: Any, http: aiohttp.ClientSession) -> None:
    gateway = await gateway_of()
    status, answer, named = await post(http, gateway, chat(model="no/such-model"))
    assert status == 404 and named is None
    assert answer["error"] == {
        "message": "Model 'no/such-model' is not served on any cluster you may use.",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_a_model_only_where_the_caller_may_not_go_is_the_same_404(
    gateway_of: Any, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_of()
    status, answer, _ = await post(http, gateway, chat(model=SECRET_MODEL), user="bob")
    assert status == 404
    assert answer["error"]["message"] == f"Model '{SECRET_MODEL}' is not served on any cluster you may use."
    status, answer, named = await post(http, gateway, chat(model=SECRET_MODEL), user="alice")
    assert (status, named) == (200, endpoint_slug("private", "vllm", SECRET_MODEL))
    embeddings = {"model": SECRET_MODEL, "input": "x"}
    status, answer, _ = await post(http, gateway, embeddings, user="alice", path="embeddings")
    assert (status, answer["error"]["code"]) == (400, "unsupported_endpoint")


async def test_embeddings_and_completions_are_federated(gateway_of: Any, http: aiohttp.ClientSession) -> None:
    gateway = await gateway_of()
    status, answer, named = await post(http, gateway, {"model": EMBED_MODEL, "input": "x"}, path="embeddings")
    assert (status, named) == (200, slug("c2", EMBED_MODEL)) and answer["data"]
    status, answer, named = await post(
        http, gateway, {"model": CHAT_MODEL, "prompt": "x"}, path="completions"
    )
    assert (status, named) == (200, slug("c1")) and answer["choices"]


async def test_a_started_stream_never_switches(
    gateway_of: Any, board: JobsBoard, backends: list[Backend], http: aiohttp.ClientSession
) -> None:
    board.states = dict.fromkeys(CLUSTERS, "running")
    gateway = await gateway_of()
    status, text, named = await post(http, gateway, chat("[[chunks=5]][[die_after=2]]", stream=True))
    assert (status, named) == (200, slug("c1"))
    events = [event for event in text.split("\n\n") if event]
    assert len(events) == 3
    assert json.loads(events[-1].removeprefix("data: "))["error"]["message"]
    assert [b.posts for b in backends] == [1, 0, 0]


@pytest.mark.alone("the second request must come within the 0.3 s the job reports are cached")
async def test_the_choice_follows_job_reports_within_the_cache_time(
    gateway_of: Any, board: JobsBoard, http: aiohttp.ClientSession
) -> None:
    board.states = {"c1": "stopped", "c2": "queued", "c3": "running"}
    gateway = await gateway_of(jobs_cache_seconds=0.3)
    assert (await post(http, gateway, chat()))[2] == slug("c3")
    board.states = {"c1": "running", "c2": "queued", "c3": "stopped"}
    assert (await post(http, gateway, chat()))[2] == slug("c3"), "still the cached reports"
    await asyncio.sleep(0.4)
    assert (await post(http, gateway, chat()))[2] == slug("c1")


async def test_job_reports_are_fetched_together_then_cached(
    gateway_of: Any, board: JobsBoard, http: aiohttp.ClientSession
) -> None:
    board.delays = dict.fromkeys(CLUSTERS, 0.3)
    board.states = {"c1": "fail", "c2": "queued", "c3": "stopped"}
    gateway = await gateway_of()
    for _ in range(10):
        assert (await post(http, gateway, chat()))[2] == slug("c2")
    assert board.most_concurrent == 3
    assert board.calls == dict.fromkeys(CLUSTERS, 1), "the private cluster does not serve the model"


@pytest.mark.alone("answered within 0.7 s while a job report takes 0.8 s")
async def test_a_late_job_report_does_not_hold_the_request(
    gateway_of: Any, board: JobsBoard, http: aiohttp.ClientSession
) -> None:
    board.delays = {"c1": 0.8}
    board.states = {"c1": "running", "c2": "queued"}
    gateway = await gateway_of(federation={"jobs_wait_seconds": 0.1})
    started = time.monotonic()
    assert (await post(http, gateway, chat()))[2] == slug("c2")
    assert time.monotonic() - started < 0.7
    await asyncio.sleep(1.0)
    assert (await post(http, gateway, chat()))[2] == slug("c1"), "the late report was cached"
    assert board.calls["c1"] == 1


async def test_the_openai_client_without_a_cluster(gateway_of: Any, board: JobsBoard) -> None:
    board.states = {"c2": "running"}
    gateway = await gateway_of()
    base_url = f"{gateway.url}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKENS["alice"], max_retries=0) as api:
        raw = await api.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}]
        )
        assert raw.headers["X-Gateway-Endpoint"] == slug("c2")
        assert raw.parse().choices[0].message.content
        stream = await api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "[[chunks=4]]"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        models = await api.models.list()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    card = next(model for model in models.data if model.id == CHAT_MODEL)
    assert card.model_extra == {"clusters": list(CLUSTERS)}


async def test_responses_and_messages_are_federated(
    gateway_of: Any, board: JobsBoard, backends: list[Backend]
) -> None:
    board.states = {"c3": "running"}
    gateway = await gateway_of()
    base_url = f"{gateway.url}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKENS["alice"], max_retries=0) as api:
        raw = await api.responses.with_raw_response.create(model=CHAT_MODEL, input="Hello")
    assert raw.headers["X-Gateway-Endpoint"] == slug("c3") and raw.parse().output_text
    messages = [{"role": "user", "content": "Hello"}]
    async with anthropic.AsyncAnthropic(
        base_url=gateway.url, auth_token=TOKENS["alice"], max_retries=0
    ) as claude:
        answer = await claude.messages.with_raw_response.create(
            model=CHAT_MODEL,
            max_tokens=16,
            messages=messages,
        )
        assert answer.headers["X-Gateway-Endpoint"] == slug("c3") and (await answer.parse()).content
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await claude.messages.create(model="no/such-model", max_tokens=16, messages=messages)
    assert unknown.value.type == "not_found_error"
    assert served_by(backends) == [0, 0, 2]


def test_max_attempts_is_checked(tmp_path: Path) -> None:
    write_yaml(tmp_path / "tokens.yaml", {"tokens": []})
    config = write_yaml(
        tmp_path / "gateway.yaml",
        {
            "auth": {"provider": "static", "static": {"tokens_file": "tokens.yaml"}},
            "endpoints_file": "endpoints.yaml",
            "clusters_file": "clusters.yaml",
            "federation": {"max_attempts": 0},
        },
    )
    with pytest.raises(ConfigError, match=r"field 'federation.max_attempts': Input should be greater"):
        load_settings(config)
