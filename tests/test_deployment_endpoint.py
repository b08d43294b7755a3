"""The on-demand deployment endpoint in a real gateway: requests forwarded to a replica over real
mTLS on loopback, held while none is ready (with progress comments for streams), refused with
Retry-After when the wait would be too long, bounded in count; driven through a scripted
controller (tests/deployment_endpoint_setup.py), the interface the gateway's controller implements."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from adaptors.deployments import Phase, Progress, Replica
from proxy.core.federation import ENDPOINT_HEADER
from testing.fake_vllm import REQUESTS
from testing.ports import free_port
from tests.deployment_endpoint_setup import (
    COMMAND,
    LLAMA,
    TIGHT,
    TIGHT_MODEL,
    ScriptedDeployments,
    Site,
    attach,
    make_site,
    replica_server,
    write_config,
)
from tests.support import CHAT_MODEL, PRIVATE_MODEL, TOKENS, Server, auth, chat, start_gateway, stdout_lines
from tests.test_routes import assert_openai_error, call


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


def url(gateway: Server, path: str = "chat/completions") -> str:
    return f"{gateway.url}/hpc/vllm/v1/{path}"


def client(gateway: Server, **options: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/hpc/vllm/v1", api_key=TOKENS["alice"], **options)


async def test_the_endpoint_declares_its_deployment_and_withdraws_it(
    backend: Server, tmp_path: Path, deployments: ScriptedDeployments
) -> None:
    runner, server = await start_gateway(write_config(tmp_path, backend.url))
    executor = await attach(server, deployments)
    spec = deployments.specs[LLAMA]
    assert (spec.cluster, spec.model, spec.scheduler) == ("hpc", CHAT_MODEL, "local")
    assert spec.model_command == tuple(COMMAND)
    assert (spec.max_replicas, spec.idle_timeout_seconds, spec.expected_start_seconds) == (1, 900, 900)
    assert "mixed-vllm-mixedmodel" in deployments.specs, "named by the endpoint's slug by default"
    await runner.cleanup()
    executor.shutdown()
    assert LLAMA in deployments.withdrawn and not deployments.specs


async def test_a_ready_replica_answers_through_mtls_with_the_openai_client(
    gateway: Server, site: Site, deployments: ScriptedDeployments
) -> None:
    async with replica_server(site, LLAMA) as pilot:
        deployments.ready(LLAMA, pilot.replica(LLAMA))
        answer = await client(gateway).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}]
        )
        assert answer.choices[0].message.content
        stream = await client(gateway).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text
        requests = list(pilot.backends[LLAMA][REQUESTS])
        assert [r["path"] for r in requests] == [f"/deployments/{LLAMA}/v1/chat/completions"] * 2
        assert "Authorization" not in requests[0]["headers"], "the pilot trusts the certificate, not a token"
    assert deployments.served["r1"] == 2 and deployments.in_flight_now[LLAMA] == 0
    assert deployments.wants[LLAMA] == 0, "a ready replica asks for nothing"


async def test_a_held_stream_gets_progress_comments_then_the_answer(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    async with replica_server(site, LLAMA) as pilot:
        async with http.post(url(gateway), json=chat("Hi", stream=True), headers=auth()) as response:
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert (
                first == f": deployment {LLAMA} is queued in the scheduler, ready in about 900 s\n\n".encode()
            )
            assert deployments.wants[LLAMA] == 1
            deployments.set(LLAMA, Progress(Phase.loading, 42.4, detail="node x1\n\u2028evil: data"))
            second = await response.content.readuntil(b"\n\n")
            assert (
                second
                == (
                    f": deployment {LLAMA} is loading the model, ready in about 43 s (node x1 evil: data)\n\n"
                ).encode()
            )
            deployments.ready(LLAMA, pilot.replica(LLAMA))
            rest = (await response.read()).decode()
        events = [line for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"

        deployments.ready(LLAMA)
        deployments.set(LLAMA, Progress(Phase.starting, 1))
        asyncio.get_running_loop().call_later(0.5, deployments.ready, LLAMA, pilot.replica(LLAMA))
        stream = await client(gateway).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text, "the openai client skips the comments and reads the replica's stream"


@pytest.mark.alone("four comments 0.2 s apart must arrive within 0.5 to 2 s")
async def test_held_streams_get_a_comment_every_interval(
    gateway: Server, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    deployments.set(TIGHT, Progress(Phase.loading, 2))
    started = time.monotonic()
    async with http.post(
        url(gateway), json=chat("Hi", model=TIGHT_MODEL, stream=True), headers=auth()
    ) as response:
        comments = [await response.content.readuntil(b"\n\n") for _ in range(4)]
    assert all(c.startswith(f": deployment {TIGHT} is loading the model".encode()) for c in comments)
    assert 0.5 < time.monotonic() - started < 2, "progress_seconds is 0.2 on this endpoint"


@pytest.mark.alone("refused within 1 s")
async def test_a_request_that_would_wait_past_its_limit_gets_503_with_retry_after(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    status, document, response = await call(http, "POST", url(gateway), json=chat("Hi"), headers=auth())
    assert (status, response.headers["Retry-After"]) == (503, "900")
    assert "x-should-retry" not in response.headers, "it will pass: the client may come back"
    error = assert_openai_error(document)
    assert error["message"] == (
        f"deployment {LLAMA} is queued in the scheduler, ready in about 900 s, past the request's wait "
        "of 300 s. Try again then."
    )
    assert time.monotonic() - started < 1, "refused at once, not after waiting"
    assert deployments.wants[LLAMA] == 1, "the replica is asked for all the same"

    deployments.set(LLAMA, Progress(Phase.loading, 30))
    waiting = asyncio.ensure_future(call(http, "POST", url(gateway), json=chat("Hi"), headers=auth()))
    await asyncio.sleep(0.3)
    assert not waiting.done(), "an ETA within the wait: held"
    deployments.set(LLAMA, Progress(Phase.queued, 2000))
    status, document, response = await waiting
    assert (status, response.headers["Retry-After"]) == (503, "2000"), "the ETA grew past the wait"

    async with replica_server(site, LLAMA) as pilot:
        deployments.set(LLAMA, Progress(Phase.loading, 30))
        asyncio.get_running_loop().call_later(0.3, deployments.ready, LLAMA, pilot.replica(LLAMA))
        answer = await client(gateway).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}]
        )
        assert answer.choices[0].message.content, "held, then answered"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_deployment_that_backs_off_or_is_not_deployed_is_refused_at_once(
    gateway: Server, deployments: ScriptedDeployments, http: aiohttp.ClientSession, stream: bool
) -> None:
    deployments.set(LLAMA, Progress(Phase.backing_off, 120, detail="3 starts failed"))
    status, document, response = await call(
        http, "POST", url(gateway), json=chat("Hi", stream=stream), headers=auth()
    )
    assert (status, response.headers["Retry-After"]) == (503, "120")
    assert "backing off" in assert_openai_error(document)["message"]

    deployments.specs.pop(LLAMA)
    status, document, response = await call(
        http, "POST", url(gateway), json=chat("Hi", stream=stream), headers=auth()
    )
    assert (status, response.headers["x-should-retry"]) == (503, "false")
    assert (
        assert_openai_error(document)["message"]
        == f"deployment {LLAMA} is unavailable ({LLAMA} is not declared)."
    )


async def test_held_requests_are_bounded_and_a_client_that_leaves_is_not_counted(
    gateway: Server, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    deployments.set(TIGHT, Progress(Phase.loading, 2))
    body = chat("Hi", model=TIGHT_MODEL, stream=True)
    held = await http.post(url(gateway), json=body, headers=auth())
    assert held.status == 200
    await held.content.readuntil(b"\n\n")
    for second in (body, chat("Hi", model=TIGHT_MODEL)):
        status, document, response = await call(http, "POST", url(gateway), json=second, headers=auth())
        assert (status, response.headers["Retry-After"]) == (503, "2")
        assert assert_openai_error(document)["message"].startswith(
            f"Too many requests wait for deployment {TIGHT} already"
        )
    held.close()  # the client goes away while held

    async def admitted() -> bool:
        """Held (its first comment read), then let go; refused while the place is taken."""
        async with http.post(url(gateway), json=body, headers=auth()) as response:
            return response.status == 200

    assert await _eventually(admitted)
    with pytest.raises(TimeoutError):
        await call(
            http, "POST", url(gateway), json=chat("Hi", model=TIGHT_MODEL), headers=auth(),
            timeout=aiohttp.ClientTimeout(total=0.5),
        )  # fmt: skip
    assert await _eventually(admitted), "a request given up while held leaves its place"


async def test_a_replica_that_refuses_the_connection_is_reported_and_the_request_looks_again(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    dead = Replica("dead", f"https://127.0.0.1:{free_port()}/deployments/{LLAMA}")
    async with replica_server(site, LLAMA) as pilot:
        for stream in (False, True):
            deployments.ready(LLAMA, dead, pilot.replica(LLAMA, "live"))
            async with http.post(url(gateway), json=chat("Hi", stream=stream), headers=auth()) as response:
                assert response.status == 200
                await response.read()
        assert deployments.served == {"dead": 2, "live": 2}
        assert deployments.unreachable_seen == ["dead", "dead"], "the controller is told at once"


async def test_a_replica_with_a_certificate_from_another_ca_is_refused(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    async with replica_server(site, LLAMA, stranger=True) as impostor:
        deployments.ready(LLAMA, impostor.replica(LLAMA))
        for stream in (False, True):
            status, document, _ = await call(
                http, "POST", url(gateway), json=chat("Hi", stream=stream), headers=auth()
            )
            assert status == 502
            assert assert_openai_error(document)["message"] == (
                "Cannot reach the backend (ClientConnectorCertificateError)."
            )
        assert not impostor.backends[LLAMA][REQUESTS], "no prompt reached it"


async def test_it_is_an_endpoint_like_the_others(
    gateway: Server,
    site: Site,
    deployments: ScriptedDeployments,
    http: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    status, _, _ = await call(http, "POST", url(gateway), json=chat("Hi"))
    assert status == 401
    status, _, _ = await call(
        http, "POST", url(gateway), json=chat("Hi", model=PRIVATE_MODEL), headers=auth("bob")
    )
    assert status == 404 and deployments.wants["private-g"] == 0, "bob may not start alice's model"
    async with replica_server(site, LLAMA, "private-g") as pilot:
        deployments.ready(LLAMA, pilot.replica(LLAMA))
        deployments.ready("private-g", pilot.replica("private-g"))
        status, _, _ = await call(http, "POST", url(gateway), json=chat("Hi"), headers=auth())
        assert status == 200
        federated = f"{gateway.url}/v1/chat/completions"
        async with http.post(federated, json=chat("Hi", model=PRIVATE_MODEL), headers=auth()) as response:
            assert response.status == 200, "served on the route without a cluster too"

    def served(lines: list[str]) -> list[dict[str, object]]:
        records = (json.loads(line) for line in lines if line.startswith("{"))
        return [r for r in records if r.get("status") == 200 and r.get("cluster") == "hpc"]

    records = served(await stdout_lines(capfd, until=lambda lines: len(served(lines)) >= 2))
    assert {(r["endpoint_slug"], r["model"]) for r in records} == {
        ("hpc-vllm-meta-llamameta-llama-31-8b-instruct", CHAT_MODEL),
        ("hpc-vllm-privatemodel-g", PRIVATE_MODEL),
    }
    assert all(isinstance(r["total_tokens"], int) and r["total_tokens"] > 0 for r in records)


async def test_a_held_request_counts_against_the_users_requests_in_flight(
    backend: Server, tmp_path: Path, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await start_gateway(write_config(tmp_path, backend.url, concurrent_per_user=1))
    executor = await attach(gateway, deployments)
    try:
        deployments.set(LLAMA, Progress(Phase.loading, 30))
        async with http.post(url(gateway), json=chat("Hi", stream=True), headers=auth()) as held:
            await held.content.readuntil(b"\n\n")
            status, _, _ = await call(http, "POST", url(gateway), json=chat("Hi"), headers=auth())
            assert status == 429
    finally:
        await runner.cleanup()
        executor.shutdown()


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_route_without_a_cluster_ranks_a_deployment_by_its_phase(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    """`mixed`'s report says the model runs there; `hpc`'s deployment comes first in the
    configuration: idle, it ranks below the running one (and starts nothing), ready, beside it."""
    federated = f"{gateway.url}/v1/chat/completions"
    async with http.post(federated, json=chat("Hi"), headers=auth()) as response:
        assert (response.status, response.headers[ENDPOINT_HEADER]) == (
            200,
            "mixed-vllm-meta-llamameta-llama-31-8b-instruct",
        )
    assert deployments.wants[LLAMA] == 0
    async with replica_server(site, LLAMA) as pilot:
        deployments.ready(LLAMA, pilot.replica(LLAMA))
        async with http.post(federated, json=chat("Hi"), headers=auth()) as response:
            assert (response.status, response.headers[ENDPOINT_HEADER]) == (
                200,
                "hpc-vllm-meta-llamameta-llama-31-8b-instruct",
            )


async def test_a_controller_whose_changed_never_waits_does_not_make_held_requests_spin(
    gateway: Server,
    deployments: ScriptedDeployments,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looks = 0

    async def at_once(name: str, timeout: float) -> None:
        nonlocal looks
        looks += 1

    monkeypatch.setattr(deployments, "changed", at_once)
    deployments.set(TIGHT, Progress(Phase.loading, 2))
    with pytest.raises(TimeoutError):
        await call(
            http, "POST", url(gateway), json=chat("Hi", model=TIGHT_MODEL), headers=auth(),
            timeout=aiohttp.ClientTimeout(total=0.5),
        )  # fmt: skip
    assert 5 < looks < 40, "about one look every 20 ms, and the gateway kept answering"


async def test_the_anthropic_client_reads_a_held_stream_too(
    gateway: Server, site: Site, deployments: ScriptedDeployments
) -> None:
    deployments.set(LLAMA, Progress(Phase.loading, 20))
    async with replica_server(site, LLAMA) as pilot:
        asyncio.get_running_loop().call_later(0.5, deployments.ready, LLAMA, pilot.replica(LLAMA))
        async with anthropic.AsyncAnthropic(
            base_url=f"{gateway.url}/hpc/vllm", auth_token=TOKENS["alice"], max_retries=0
        ) as api:
            ask = {
                "model": CHAT_MODEL,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "[[chunks=3]]"}],
            }
            stream = await api.messages.create(**ask, stream=True)
            events = [event async for event in stream]
    deltas = [event.delta.text for event in events if event.type == "content_block_delta"]
    assert "".join(deltas) == "Hello! This" and events[-1].type == "message_stop"


async def test_the_clients_bytes_reach_the_replica_as_they_came(
    gateway: Server, site: Site, deployments: ScriptedDeployments, http: aiohttp.ClientSession
) -> None:
    sent = json.dumps({"max_tokens": 4, **chat("h\u00e9llo")}, indent=1).encode()
    headers = {**auth(), "Content-Type": "application/json"}
    async with replica_server(site, LLAMA) as pilot:
        deployments.ready(LLAMA, pilot.replica(LLAMA))
        status, _, _ = await call(http, "POST", url(gateway), data=sent, headers=headers)
        assert status == 200
        assert pilot.backends[LLAMA][REQUESTS][-1]["raw"] == sent
