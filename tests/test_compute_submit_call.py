"""Submissions over the gateway's own HTTP client (adaptors/compute_submit_call.py) against the fake
Globus Compute and Auth, and against hostile services: the SDK's token, retries and errors kept;
the SDK's own path where a proxy or unverified TLS is configured."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import globus_sdk
import pytest
from aiohttp import web
from globus_sdk.transport import RequestsTransport, RetryConfig

from adaptors.compute_config import GlobusComputeClusterConfig
from adaptors.compute_service import ComputeService
from adaptors.compute_submit_call import MAX_ANSWER_BYTES, UnreadableAnswer, submit_call
from adaptors.telemetry import NoTelemetry
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.ports import free_port
from tests.compute_setup import ENDPOINT, SERVICE_ID, SERVICE_SECRET
from tests.support import self_signed_certificate

ECHO = "21111111-aaaa-4bbb-8ccc-000000000001"
GATEWAY_AGENT = "hpc-inference-gateway"


def echo(value: Any) -> Any:
    return value


@pytest.fixture
def revoked() -> set[str]:
    """Tokens the fake service refuses although Globus Auth issued them."""
    return set()


@pytest.fixture
async def compute(globus: FakeGlobus, revoked: set[str]) -> AsyncIterator[FakeCompute]:
    """Not conftest's: this one refuses the `revoked` tokens, and runs an echo function only."""
    async with FakeCompute(
        accepted_tokens=lambda token: token in globus.issued_tokens and token not in revoked
    ) as fake:
        fake.add_endpoint(ENDPOINT)
        fake.register_function(ECHO, echo)
        yield fake


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def access_to(compute: FakeCompute, globus: FakeGlobus, **settings: Any) -> GlobusComputeClusterConfig:
    return GlobusComputeClusterConfig(
        qstat_endpoint_uuid=ENDPOINT,
        qstat_function_uuid=ECHO,
        client_id=SERVICE_ID,
        client_secret=SERVICE_SECRET,
        compute_url=compute.url,
        auth_url=globus.auth_url,
        result_queue=False,
        **settings,
    )


@pytest.fixture
async def service(
    compute: FakeCompute, globus: FakeGlobus, pool: ThreadPoolExecutor
) -> AsyncIterator[ComputeService]:
    """With a short `http_timeout_seconds`; `test_a_stuck_service_times_out_as_deployed` keeps the default."""
    access = access_to(compute, globus, http_timeout_seconds=0.5)
    running = ComputeService(access, access.service_key(), pool, NoTelemetry())
    yield running
    await running.close()


async def blocking(call: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, call)


def submits(fake: FakeCompute) -> list[Any]:
    return [r for r in fake.requests if r.path.endswith("/submit")]


async def test_submissions_go_over_the_gateways_client_and_status_calls_over_the_sdk(
    compute: FakeCompute, service: ComputeService
) -> None:
    task_id = await service.submit(ENDPOINT, ECHO, "hello")
    assert await service.result(task_id, timeout=5) == "hello"
    (submit,) = submits(compute)
    assert submit.user_agent == GATEWAY_AGENT
    assert submit.json["tasks"][ECHO] and submit.json["result_serializers"]
    polls = [r for r in compute.requests if r.path.endswith("/batch_status")]
    assert polls and all(r.user_agent != GATEWAY_AGENT for r in polls)


async def test_an_outage_is_retried_as_the_sdk_retries(compute: FakeCompute, service: ComputeService) -> None:
    await service.submit(ENDPOINT, ECHO, "warm")
    compute.fail_status = 503
    submitting = asyncio.create_task(service.submit(ENDPOINT, ECHO, "after the outage"))
    while len(submits(compute)) < 2:
        await asyncio.sleep(0.005)
    compute.fail_status = None
    task_id = await submitting
    assert await service.result(task_id, timeout=5) == "after the outage"
    assert len(submits(compute)) == 3, "the refused attempt, then the one after the SDK's backoff"


async def test_an_outage_that_lasts_fails_with_the_sdks_error_after_its_retries(
    compute: FakeCompute, service: ComputeService
) -> None:
    await service.submit(ENDPOINT, ECHO, "warm")
    compute.fail_status = 503
    with pytest.raises(globus_sdk.ComputeAPIError) as raised:
        await service.submit(ENDPOINT, ECHO, "refused")
    assert raised.value.http_status == 503 and raised.value.code == "SERVICE_UNAVAILABLE"
    assert len(submits(compute)) == 1 + 3, "RetryConfig(max_retries=2): three attempts"


async def test_a_refused_token_is_renewed_once_and_the_submission_goes_through(
    compute: FakeCompute, globus: FakeGlobus, revoked: set[str], service: ComputeService
) -> None:
    await service.submit(ENDPOINT, ECHO, "warm")
    first = submits(compute)[0].authorization
    assert first is not None
    revoked.add(first.removeprefix("Bearer "))
    task_id = await service.submit(ENDPOINT, ECHO, "renewed")
    assert await service.result(task_id, timeout=5) == "renewed"
    refused, renewed = submits(compute)[1:]
    assert refused.authorization == first and renewed.authorization != first
    assert renewed.authorization is not None
    assert renewed.authorization.removeprefix("Bearer ") in globus.issued_tokens


async def test_a_service_that_does_not_answer_in_time_fails_as_a_timeout(
    compute: FakeCompute, service: ComputeService
) -> None:
    await service.submit(ENDPOINT, ECHO, "warm")
    compute.delay = 2.0
    with pytest.raises(globus_sdk.GlobusTimeoutError):
        await service.submit(ENDPOINT, ECHO, "late")
    assert len(submits(compute)) == 1 + 3


async def test_a_stuck_service_times_out_as_deployed(
    compute: FakeCompute, globus: FakeGlobus, pool: ThreadPoolExecutor
) -> None:
    """The default `http_timeout_seconds` (10) bounds each of the SDK's three attempts: a service that
    takes the submission and never answers fails it after about 31 s, never hangs it."""
    access = access_to(compute, globus)
    running = ComputeService(access, access.service_key(), pool, NoTelemetry())
    try:
        await running.submit(ENDPOINT, ECHO, "warm")
        compute.delay = 12.0
        started = time.monotonic()
        with pytest.raises(globus_sdk.GlobusTimeoutError):
            await running.submit(ENDPOINT, ECHO, "stuck")
        assert 30.0 <= time.monotonic() - started < 36.0, "three attempts of 10 s and the SDK's backoff"
        assert len(submits(compute)) == 1 + 3
    finally:
        compute.delay = 0.0
        await running.close()


async def test_a_service_that_is_gone_fails_as_a_connection_error(
    compute: FakeCompute, service: ComputeService
) -> None:
    await service.submit(ENDPOINT, ECHO, "warm")
    await compute.stop()
    with pytest.raises(globus_sdk.GlobusConnectionError):
        await service.submit(ENDPOINT, ECHO, "nobody there")


async def test_an_unknown_function_is_the_services_refusal(
    compute: FakeCompute, service: ComputeService
) -> None:
    with pytest.raises(globus_sdk.ComputeAPIError) as raised:
        await service.submit(ENDPOINT, "21111111-aaaa-4bbb-8ccc-00000000000f", "x")
    assert raised.value.http_status == 404 and raised.value.code == "FUNCTION_NOT_FOUND"
    assert len(submits(compute)) == 1, "a 404 is not retried"


def test_a_proxy_or_unverified_tls_leaves_submissions_to_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    def call(client: globus_sdk.ComputeClientV3) -> object:
        return submit_call(client, blocking, 1.0).http

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = "https://compute.example.org"
    assert call(globus_sdk.ComputeClientV3(base_url=url)) is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    assert call(globus_sdk.ComputeClientV3(base_url=url)) is None
    monkeypatch.setenv("NO_PROXY", "compute.example.org")
    assert call(globus_sdk.ComputeClientV3(base_url=url)) is not None, "NO_PROXY exempts it"
    monkeypatch.delenv("HTTPS_PROXY")
    unverified = globus_sdk.ComputeClientV3(base_url=url, transport=RequestsTransport(verify_ssl=False))
    assert call(unverified) is None


async def hostile(answer: web.Response, tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, str]:
    """A service whose every submission gets `answer`."""

    async def submit(_request: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_post("/v3/endpoints/{endpoint}/submit", submit)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    return runner, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


def client_of(url: str, verify: bool | str = True) -> globus_sdk.ComputeClientV3:
    return globus_sdk.ComputeClientV3(
        base_url=url,
        authorizer=globus_sdk.AccessTokenAuthorizer("a-token"),
        transport=RequestsTransport(verify_ssl=verify),
        retry_config=RetryConfig(max_retries=0),
    )


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(text="<html>gateway timeout</html>", content_type="text/html"),
        web.json_response(["not", "an", "object"]),
        web.Response(body=b'{"tasks": "' + b"x" * MAX_ANSWER_BYTES + b'"}', content_type="application/json"),
    ],
    ids=["not JSON", "not an object", "too large"],
)
async def test_an_unreadable_answer_is_a_globus_error_not_a_crash(answer: web.Response) -> None:
    runner, url = await hostile(answer)
    call = submit_call(client_of(url), blocking, 5.0)
    assert call.http is not None
    try:
        with pytest.raises(UnreadableAnswer) as raised:
            await call.submit(ENDPOINT, {"tasks": []})
        assert isinstance(raised.value, globus_sdk.GlobusError)
    finally:
        await call.close()
        await runner.cleanup()


async def test_tls_is_verified_against_the_configured_bundle(tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate, key)
    runner, url = await hostile(web.json_response({"task_group_id": "g", "tasks": {ECHO: ["t"]}}), tls)
    trusting = submit_call(client_of(url, str(certificate)), blocking, 5.0)
    default = submit_call(client_of(url), blocking, 5.0)
    assert trusting.http is not None and default.http is not None
    try:
        assert (await trusting.submit(ENDPOINT, {"tasks": []}))["tasks"] == {ECHO: ["t"]}
        with pytest.raises(globus_sdk.GlobusConnectionError):
            await default.submit(ENDPOINT, {"tasks": []})
    finally:
        await trusting.close()
        await default.close()
        await runner.cleanup()


async def test_a_token_that_is_no_header_value_is_refused_unsent() -> None:
    seen: list[web.Request] = []

    async def submit(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"tasks": {}})

    app = web.Application()
    app.router.add_post("/v3/endpoints/{endpoint}/submit", submit)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = globus_sdk.ComputeClientV3(
        base_url=f"http://127.0.0.1:{port}",
        authorizer=globus_sdk.AccessTokenAuthorizer("a-token\r\nX-Injected: yes"),
        retry_config=RetryConfig(max_retries=0),
    )
    call = submit_call(client, blocking, 5.0)
    try:
        with pytest.raises(UnreadableAnswer) as raised:
            await call.submit(ENDPOINT, {"tasks": []})
        assert "a-token" not in str(raised.value)
        assert seen == []
    finally:
        await call.close()
        await runner.cleanup()
