"""A client's retry joins the work still running for its earlier attempt (proxy/core/retry_join.py): the
real openai client, with a timeout shorter than the work, against the fakes of Globus Compute and
vLLM, whose counts show how much work was submitted."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp.test_utils import make_mocked_request

from adaptors import SubmitTaskResponse
from proxy.core.retry_join import Joining, JoinKey, RetryJoins, joining_of
from proxy.settings.traffic import RetrySettings
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_vllm import REQUESTS
from tests.compute_setup import compute_config
from tests.conftest import CHAT_MODEL, TOKENS, Server, auth, chat, free_port, start_gateway


@pytest.fixture
async def hpc_gateway(
    backend: Server, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await start_gateway(compute_config(tmp_path, backend, compute, globus, free_port()))
    yield server
    await runner.cleanup()


def impatient_client(base_url: str, timeout: float) -> openai.AsyncOpenAI:
    """A client timeout shorter than the work, with the SDK's default two retries."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=TOKENS["alice"], timeout=timeout)


async def test_a_call_and_its_retries_run_one_compute_task(hpc_gateway: Server, compute: FakeCompute) -> None:
    async with impatient_client(f"{hpc_gateway.url}/hpc/vllm/v1", timeout=1.0) as api:
        response = await api.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "[[delay=2]]"}]
        )
    assert response.retries_taken >= 1, "the client did time out and retry"
    assert response.parse().choices[0].message.content
    assert len(compute.tasks) == 1, "one task for the call and its retries"


async def test_a_direct_api_retry_joins_the_request_still_running(gateway: Server, backend: Server) -> None:
    async with impatient_client(f"{gateway.url}/local/vllm/v1", timeout=0.6) as api:
        response = await api.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "[[delay=1.2]]"}]
        )
    assert response.retries_taken >= 1 and response.parse().choices[0].message.content
    assert len(backend.app[REQUESTS]) == 1


async def test_only_the_same_users_retries_join(
    hpc_gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    url = f"{hpc_gateway.url}/hpc/vllm/v1/chat/completions"
    body = chat("[[delay=1]]")

    async def post(user: str, retry_count: str) -> str:
        headers = {**auth(user), "x-stainless-retry-count": retry_count}
        async with http.post(url, json=body, headers=headers) as response:
            assert response.status == 200
            answer: str = (await response.json())["id"]
            return answer

    first = asyncio.ensure_future(post("alice", "0"))
    await asyncio.sleep(0.3)
    sampled_again = asyncio.ensure_future(post("alice", "0"))
    await asyncio.sleep(0.3)
    bobs = asyncio.ensure_future(post("bob", "1"))
    alices_retry = asyncio.ensure_future(post("alice", "1"))
    ids = await asyncio.gather(first, sampled_again, bobs, alices_retry)
    assert len(compute.tasks) == 3, "a second first attempt and another user's request run their own tasks"
    assert ids[3] == ids[1] and len(set(ids)) == 3
    body = chat()
    for count in ("\u00b2", "9" * 5000, "-1", ""):
        await post("alice", count)
    assert len(compute.tasks) == 7, "a count that is not a number is a first attempt"


async def test_one_idempotency_key_runs_once(
    hpc_gateway: Server, compute: FakeCompute, http: aiohttp.ClientSession
) -> None:
    url = f"{hpc_gateway.url}/hpc/vllm/v1/chat/completions"
    headers = {**auth(), "Idempotency-Key": "run-42"}

    async def post() -> int:
        async with http.post(url, json=chat("[[delay=0.5]]"), headers=headers) as response:
            return response.status

    assert await asyncio.gather(post(), post()) == [200, 200]
    assert len(compute.tasks) == 1


def answer(text: str) -> SubmitTaskResponse:
    return SubmitTaskResponse(result=text)


async def test_memory_is_bounded_and_abandoned_work_is_cancelled() -> None:
    joins = RetryJoins(RetrySettings(join_seconds=0.2, keep_seconds=0.3, max_entries=2, max_kept_bytes=10))
    cancelled = []

    async def slow(text: str, seconds: float) -> SubmitTaskResponse:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            cancelled.append(text)
            raise
        return answer(text)

    def key(n: int, may_join: bool = False) -> Joining:
        return Joining(("user", "endpoint", str(n)), may_join)

    # A client leaves: its work goes on for join_seconds, then is cancelled when no retry came.
    leaving = asyncio.ensure_future(joins.run(key(1), lambda: slow("one", 5)))
    await asyncio.sleep(0.05)
    leaving.cancel()
    await asyncio.sleep(0.1)
    assert len(joins) == 1 and not cancelled
    await asyncio.sleep(0.2)
    assert cancelled == ["one"] and len(joins) == 0

    # A result that finished with nobody waiting is kept for keep_seconds, within max_kept_bytes.
    for n, text in enumerate(["12345678", "abcdefgh"], start=2):
        gone = asyncio.ensure_future(joins.run(key(n), functools.partial(slow, text, 0.05)))
        await asyncio.sleep(0.01)
        gone.cancel()
    await asyncio.sleep(0.1)
    assert len(joins) == 1 and joins.kept_bytes == 8, "the older result made room for the newer"
    retried, joined = await joins.run(key(3, may_join=True), lambda: slow("again", 0.01))
    assert (retried.result, joined) == ("abcdefgh", True)
    await asyncio.sleep(0.35)
    assert len(joins) == 0 and joins.kept_bytes == 0

    # Entries beyond max_entries push the oldest out; the work itself goes on for its waiter.
    runs = [
        asyncio.ensure_future(joins.run(key(n), functools.partial(slow, str(n), 0.1))) for n in range(4, 7)
    ]
    await asyncio.sleep(0.01)
    assert len(joins) == 2
    assert [run[0].result for run in await asyncio.gather(*runs)] == ["4", "5", "6"]
    assert len(joins) == 0, "results delivered to their waiters are not kept"


def test_a_body_has_one_key_whatever_its_order_or_spelling() -> None:
    """The key digests the fields, not their order; a body that orjson cannot encode (an integer
    beyond 64 bits, a lone surrogate, which the standard library's parser reads) still gets one."""

    def key(params: dict[str, object], headers: dict[str, str] | None = None) -> JoinKey:
        request = make_mocked_request("POST", "/", headers=headers or {"x-stainless-retry-count": "1"})
        joining = joining_of(request, "alice", "local-vllm-model", params)
        assert joining is not None and joining.may_join
        return joining.key

    chat_body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    reordered = {"temperature": 0.5, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert key(chat_body) == key(reordered)
    assert key(chat_body) != key({**chat_body, "temperature": 0.6})
    for odd in ({**chat_body, "seed": 2**70}, {**chat_body, "user": "\ud800"}):
        assert key(odd) == key(dict(reversed(list(odd.items()))))
        assert key(odd) != key(chat_body)
    assert key({**chat_body, "seed": 2**70}) != key({**chat_body, "seed": 2**70 + 1})
    keyed = {"x-stainless-retry-count": "0", "Idempotency-Key": "run-42"}
    assert key(chat_body, keyed) != key(chat_body), "the idempotency key is part of the key"


async def test_a_deeply_nested_body_from_an_sdk_is_answered(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    """A body nested beyond orjson's depth is digested by the standard library, and answered; one
    nested near the parser's own limit is answered or refused, never a 500."""
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    headers = {**auth(), "x-stainless-retry-count": "0", "Content-Type": "application/json"}
    for depth, expected in ((600, {200}), (900, {200, 400})):
        nested = '{"a":' * depth + '"leaf"' + "}" * depth
        tool = '{"type":"function","function":{"name":"f","parameters":' + nested + "}}"
        body = json.dumps(chat())[:-1] + ', "tools": [' + tool + "]}"
        async with http.post(url, data=body.encode(), headers=headers) as response:
            assert response.status in expected, await response.text()
