"""The fake Compute service must speak what the real SDKs send and expect.

Everything goes through the real, blocking SDKs in threads (the fakes run on the test's event loop): the
client-credentials authorizer against FakeGlobus, globus-sdk's ComputeClientV2/V3 against FakeCompute,
payloads built by globus-compute-sdk's ``Batch``, and results read back both by hand (as the gateway will)
and by the compute SDK's own readers (``Client``, ``Executor._load_tasks_status``), so a drift between the
fake and the SDKs shows up here.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import globus_sdk
import pytest
from globus_compute_sdk import Client
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.sdk.asynchronous.compute_future import ComputeFuture
from globus_compute_sdk.sdk.batch import Batch
from globus_compute_sdk.sdk.executor import Executor
from globus_compute_sdk.serialize import AllowlistWildcard, ComputeSerializer, JSONData
from globus_sdk.transport import RetryConfig

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_globus.compute_tasks import FAILED, RUNNING, SUCCESS, WAITING
from testing.fake_globus.identities import COMPUTE_RESOURCE_SERVER, COMPUTE_SCOPE

T = TypeVar("T")

SERVICE_ID = "5e7d1f4c-2b3a-4c5d-8e9f-0a1b2c3d4e5f"
SERVICE_SECRET = "service-account-secret"
ENDPOINT = "1b6f4c9e-7d3a-4e2b-9c8d-5f6e7a8b9c0d"
OLD_ENDPOINT = "2c7a5d0f-8e4b-4f3c-8d9e-6a7b8c9d0e1f"
OTHER_ENDPOINT = "2c7a5d0f-8e4b-4f3c-ad9e-6a7b8c9d0e1f"
GENERATE = "3d8b6e1a-9f5c-4a4d-be0f-7b8c9d0e1f2a"
BROKEN = "4e9c7f2b-0a6d-4b5e-8f1a-8c9d0e1f2a3b"
JSON_RESULTS = ["globus_compute_sdk.serialize.JSONData"]
# How the gateway should read results: JSON data only, never dill from a remote site.
RESULT_READER = ComputeSerializer(allowed_deserializer_types=[JSONData, AllowlistWildcard.CODE])
MODEL_PARAMS = {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "prompt": "Hello", "max_tokens": 8}


async def blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """The SDKs are synchronous: keep the loop (and so the fakes) running while they wait."""
    return await asyncio.to_thread(call, *args, **kwargs)


def generate(payload: dict[str, Any]) -> str:
    """Like the deployed inference functions: one dict argument, a JSON string back."""
    params = payload["model_params"]
    return json.dumps({"model": params["model"], "choices": [{"text": params["prompt"][::-1]}]})


def broken(payload: dict[str, Any]) -> str:
    raise ValueError('API request failed with status code: 400 {"error": "max_tokens too large"}')


@dataclass
class Clients:
    v2: globus_sdk.ComputeClientV2
    v3: globus_sdk.ComputeClientV3
    authorizer: globus_sdk.ClientCredentialsAuthorizer


@pytest.fixture
async def globus() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        running.add_client(SERVICE_ID, SERVICE_SECRET)
        yield running


@pytest.fixture
async def compute(globus: FakeGlobus) -> AsyncIterator[FakeCompute]:
    async with FakeCompute(accepted_tokens=lambda token: token in globus.issued_tokens) as running:
        running.add_endpoint(ENDPOINT, managers=2)
        running.register_function(GENERATE, generate)
        running.register_function(BROKEN, broken)
        yield running


def confidential(globus: FakeGlobus, secret: str = SERVICE_SECRET) -> globus_sdk.ConfidentialAppAuthClient:
    return globus_sdk.ConfidentialAppAuthClient(
        SERVICE_ID, secret, base_url=globus.auth_url, retry_config=RetryConfig(max_retries=0)
    )


def build_clients(globus: FakeGlobus, compute: FakeCompute) -> Clients:
    """As the gateway's adaptor will: a service account's authorizer, no token on disk."""
    authorizer = globus_sdk.ClientCredentialsAuthorizer(
        confidential(globus), scopes=globus_sdk.ComputeClientV2.scopes.all
    )
    options: dict[str, Any] = {
        "base_url": compute.url,
        "authorizer": authorizer,
        "retry_config": RetryConfig(max_retries=0),
    }
    return Clients(globus_sdk.ComputeClientV2(**options), globus_sdk.ComputeClientV3(**options), authorizer)


@pytest.fixture
async def clients(globus: FakeGlobus, compute: FakeCompute) -> Clients:
    return await blocking(build_clients, globus, compute)


def gateway_batch(function_id: str = GENERATE, *payloads: dict[str, Any]) -> Batch:
    """The gateway's submission: JSON arguments, JSON results, one dict as the only positional argument."""
    batch = Batch(
        task_group_id=None,
        serializer=ComputeSerializer(strategy_data=JSONData),
        result_serializers=JSON_RESULTS,
    )
    for payload in payloads or ({"model_params": MODEL_PARAMS},):
        batch.add(function_id, args=(payload,))
    return batch


async def submit(clients: Clients, batch: Batch, endpoint: str = ENDPOINT) -> list[str]:
    answer = await blocking(clients.v3.submit, endpoint, batch.prepare())
    return [task_id for task_ids in answer["tasks"].values() for task_id in task_ids]


async def poll(clients: Clients, task_ids: list[str], timeout: float = 3.0) -> dict[str, dict[str, Any]]:
    """Raw task documents once all are finished, polling as the gateway's single poller will."""
    deadline = time.monotonic() + timeout
    while True:
        results = (await blocking(clients.v2.get_task_batch, task_ids))["results"]
        if all(results[t]["status"] in (SUCCESS, FAILED) for t in task_ids):
            return dict(results)
        assert time.monotonic() < deadline, results
        await asyncio.sleep(0.02)


async def status_of(clients: Clients, task_id: str) -> str:
    return str((await blocking(clients.v2.get_task, task_id))["status"])


async def wait_status(clients: Clients, task_id: str, wanted: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := await status_of(clients, task_id)) != wanted:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.02)


def sdk_client(clients: Clients, compute: FakeCompute) -> Client:
    """The compute SDK's own Client, its web client re-pointed at the fake (it ignores base URLs)."""
    client = Client(do_version_check=False, authorizer=clients.authorizer)
    client._compute_web_client.v2 = clients.v2
    client._compute_web_client.v3 = clients.v3
    return client


# -- client credentials (FakeGlobus) ---------------------------------------------------------------------


async def test_client_credentials_grant_gives_a_compute_token(globus: FakeGlobus) -> None:
    tokens = await blocking(confidential(globus).oauth2_client_credentials_tokens, COMPUTE_SCOPE)

    assert str(globus_sdk.ComputeClientV2.scopes.all) == COMPUTE_SCOPE
    assert globus_sdk.ComputeClientV2.resource_server == COMPUTE_RESOURCE_SERVER
    compute_token = tokens.by_resource_server[COMPUTE_RESOURCE_SERVER]
    assert compute_token["scope"] == COMPUTE_SCOPE and compute_token["token_type"] == "Bearer"
    assert compute_token["expires_at_seconds"] > time.time() + 3600
    assert globus.issued_tokens == {compute_token["access_token"]: SERVICE_ID}
    sent = globus.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/auth/v2/oauth2/token")
    assert sent.form == {"grant_type": "client_credentials", "scope": COMPUTE_SCOPE}
    assert sent.basic_credentials == (SERVICE_ID, SERVICE_SECRET)


async def test_client_credentials_errors(globus: FakeGlobus) -> None:
    with pytest.raises(globus_sdk.AuthAPIError) as wrong_secret:
        await blocking(confidential(globus, "wrong").oauth2_client_credentials_tokens, COMPUTE_SCOPE)
    assert wrong_secret.value.http_status == 401
    with pytest.raises(globus_sdk.AuthAPIError) as unknown_scope:
        await blocking(confidential(globus).oauth2_client_credentials_tokens, "urn:nope:scope")
    assert unknown_scope.value.http_status == 400
    assert globus.issued_tokens == {}


async def test_client_credentials_token_introspects_as_the_service(globus: FakeGlobus) -> None:
    tokens = await blocking(confidential(globus).oauth2_client_credentials_tokens, COMPUTE_SCOPE)
    gateway = globus_sdk.ConfidentialAppAuthClient(
        globus.client_id, globus.client_secret, base_url=globus.auth_url
    )
    token = tokens.by_resource_server[COMPUTE_RESOURCE_SERVER]["access_token"]

    answer = await blocking(gateway.oauth2_token_introspect, token, include="session_info")

    assert answer["active"] is True and answer["client_id"] == SERVICE_ID
    assert answer["username"] == f"{SERVICE_ID}@clients.auth.globus.org"
    assert answer["session_info"]["authentications"] == {}


# -- submit and results ----------------------------------------------------------------------------------


async def test_submit_runs_the_function_and_the_result_reads_back(
    compute: FakeCompute, clients: Clients, globus: FakeGlobus
) -> None:
    batch = gateway_batch()

    answer = await blocking(clients.v3.submit, ENDPOINT, batch.prepare())

    assert set(answer.data) == {"request_id", "task_group_id", "endpoint_id", "tasks"}
    assert answer["endpoint_id"] == ENDPOINT and list(answer["tasks"]) == [GENERATE]
    [task_id] = answer["tasks"][GENERATE]
    sent = compute.requests[-1]
    assert (sent.method, sent.path) == ("POST", f"/v3/endpoints/{ENDPOINT}/submit")
    assert sent.json == batch.prepare() and sent.json["result_serializers"] == JSON_RESULTS
    assert (
        sent.authorization is not None and sent.authorization.removeprefix("Bearer ") in globus.issued_tokens
    )
    assert (
        compute.task(task_id).args == [{"model_params": MODEL_PARAMS}] and compute.task(task_id).kwargs == {}
    )

    document = (await poll(clients, [task_id]))[task_id]

    assert document["task_id"] == task_id and document["status"] == SUCCESS
    assert "exception" not in document and float(document["completion_t"]) <= time.time()
    assert document["details"]["endpoint_id"] == ENDPOINT
    assert document["result"].startswith("11\n")  # JSONData's header: JSON on the wire, not dill
    value = RESULT_READER.deserialize(document["result"])
    assert json.loads(value) == {"model": MODEL_PARAMS["model"], "choices": [{"text": "olleH"}]}
    assert compute.task(task_id).value == value
    assert compute.count("/v2/batch_status") >= 1


async def test_default_result_serializer_is_dill(compute: FakeCompute, clients: Clients) -> None:
    batch = Batch(task_group_id=None)  # the SDK's defaults throughout
    batch.add(GENERATE, args=({"model_params": MODEL_PARAMS},))
    [task_id] = await submit(clients, batch)

    document = (await poll(clients, [task_id]))[task_id]

    assert document["result"].startswith("00\n")  # DillDataBase64
    assert json.loads(ComputeSerializer().deserialize(document["result"]))["choices"][0]["text"] == "olleH"
    with pytest.raises(Exception, match="disabled"):
        RESULT_READER.deserialize(document["result"])


async def test_an_older_endpoint_ignores_the_requested_result_serializer(
    compute: FakeCompute, clients: Clients
) -> None:
    """The gateway asks for JSON; an endpoint older than `result_serializers` answers dill anyway."""
    compute.add_endpoint(OLD_ENDPOINT, honours_result_serializers=False)
    [task_id] = await submit(clients, gateway_batch(), OLD_ENDPOINT)

    document = (await poll(clients, [task_id]))[task_id]

    assert compute.task(task_id).result_serializers == JSON_RESULTS
    assert document["result"].startswith("00\n")  # DillDataBase64, as if nothing had been asked
    assert json.loads(ComputeSerializer().deserialize(document["result"]))["choices"][0]["text"] == "olleH"


async def test_the_compute_sdks_own_readers_accept_the_documents(
    compute: FakeCompute, clients: Clients
) -> None:
    client = await blocking(sdk_client, clients, compute)
    batch = client.create_batch(result_serializers=JSON_RESULTS)
    batch.add(GENERATE, args=({"model_params": MODEL_PARAMS},))
    batch.add(BROKEN, args=({"model_params": MODEL_PARAMS},))
    submitted = await blocking(client.batch_run, ENDPOINT, batch)
    good, bad = submitted["tasks"][GENERATE][0], submitted["tasks"][BROKEN][0]
    await compute.settled(good)
    await compute.settled(bad)

    results = await blocking(client.get_batch_result, [good, bad])
    futures = {good: ComputeFuture(good), bad: ComputeFuture(bad)}
    pending = await blocking(Executor._load_tasks_status, futures, client=client)

    assert results[good]["pending"] is False and json.loads(results[good]["result"])["model"]
    assert bad not in results  # Client.get_batch_result silently drops failed tasks
    assert pending == [] and futures[good].result() == results[good]["result"]
    assert isinstance(futures[bad].exception(), TaskExecutionFailed)
    assert "max_tokens too large" in str(futures[bad].exception())
    with pytest.raises(TaskExecutionFailed, match="API request failed with status code: 400"):
        await blocking(client.get_result, bad)


async def test_a_raising_function_fails_with_the_remote_traceback(
    compute: FakeCompute, clients: Clients
) -> None:
    [task_id] = await submit(clients, gateway_batch(BROKEN))

    document = (await poll(clients, [task_id]))[task_id]

    assert document["status"] == FAILED and "result" not in document and document["completion_t"]
    text = document["exception"]
    assert isinstance(text, str) and text.startswith("Traceback (most recent call last):")
    assert 'ValueError: API request failed with status code: 400 {"error": "max_tokens too large"}' in text
    assert "in broken" in text and "_execute" not in text  # the fake's own frame is cut, as a worker's
    assert "API request failed with status code: 400" in str(
        TaskExecutionFailed(text, document["completion_t"])
    )
    assert isinstance(compute.task(task_id).error, ValueError)


async def test_unserializable_results_and_bad_payloads_fail_on_the_endpoint(
    compute: FakeCompute, clients: Clients
) -> None:
    compute.register_function(GENERATE, lambda payload: {1, 2})  # a set is not JSON
    [unserializable] = await submit(clients, gateway_batch())
    batch = gateway_batch()
    batch.tasks[next(iter(batch.tasks))] = ["not a packed payload"]
    [garbage] = await submit(clients, batch)

    documents = await poll(clients, [unserializable, garbage])

    assert documents[unserializable]["status"] == FAILED
    unserializable_text = documents[unserializable]["exception"]
    assert "SerializationError: Serialization failed: All strategies failed." in unserializable_text
    assert "TypeError: Object of type set is not JSON serializable" in unserializable_text
    assert documents[garbage]["status"] == FAILED
    assert "ValueError: Missing newline delimiter" in documents[garbage]["exception"]


async def test_a_batch_of_several_tasks_runs_concurrently(compute: FakeCompute, clients: Clients) -> None:
    release = threading.Event()
    arrived = threading.Semaphore(0)

    def gated(payload: dict[str, Any]) -> str:
        arrived.release()
        release.wait(2)
        return str(payload["model_params"]["prompt"])

    compute.register_function(GENERATE, gated)
    prompts = [{"model_params": {"prompt": f"p{i}"}} for i in range(3)]
    task_ids = await submit(clients, gateway_batch(GENERATE, *prompts))
    for _ in prompts:  # all three are inside the function at once
        assert await blocking(arrived.acquire, timeout=2)
    release.set()

    documents = await poll(clients, task_ids)

    assert [RESULT_READER.deserialize(documents[t]["result"]) for t in task_ids] == ["p0", "p1", "p2"]
    assert len({compute.task(t).task_group_id for t in task_ids}) == 1


# -- task lifecycle and endpoints ------------------------------------------------------------------------


async def test_status_goes_waiting_then_running_then_success(compute: FakeCompute, clients: Clients) -> None:
    release = threading.Event()
    compute.register_function(GENERATE, lambda payload: "done" if release.wait(2) else "timeout")
    compute.queue_delay = 0.3
    [task_id] = await submit(clients, gateway_batch())

    assert await status_of(clients, task_id) == WAITING
    waiting = (await blocking(clients.v2.get_task, task_id)).data
    assert waiting == {"task_id": task_id, "status": WAITING, "completion_t": None}
    await wait_status(clients, task_id, RUNNING)
    release.set()
    await wait_status(clients, task_id, SUCCESS)

    task = compute.task(task_id)
    assert task.started_at is not None and task.started_at - task.submitted_at >= 0.3
    assert RESULT_READER.deserialize(task.result or "") == "done"


async def test_endpoint_status_online_and_offline(compute: FakeCompute, clients: Clients) -> None:
    online = await blocking(clients.v2.get_endpoint_status, ENDPOINT)
    compute.set_endpoint(ENDPOINT, status="offline", managers=0)
    offline = await blocking(clients.v2.get_endpoint_status, ENDPOINT)

    assert online["status"] == "online" and online["details"]["managers"] == 2
    assert set(online["details"]) == {
        "total_workers",
        "idle_workers",
        "pending_tasks",
        "outstanding_tasks",
        "managers",
    }
    assert offline["status"] == "offline" and offline["details"]["managers"] == 0
    assert compute.requests[-1].path == f"/v2/endpoints/{ENDPOINT}/status"
    with pytest.raises(globus_sdk.ComputeAPIError) as unknown:
        await blocking(clients.v2.get_endpoint_status, OTHER_ENDPOINT)
    assert unknown.value.http_status == 404 and unknown.value.code == "ENDPOINT_NOT_FOUND"


async def test_offline_endpoint_holds_tasks_until_it_is_back(compute: FakeCompute, clients: Clients) -> None:
    compute.set_endpoint(ENDPOINT, status="offline")
    [task_id] = await submit(clients, gateway_batch())
    await asyncio.sleep(0.2)

    assert await status_of(clients, task_id) == WAITING
    status = await blocking(clients.v2.get_endpoint_status, ENDPOINT)
    assert status["details"]["pending_tasks"] == 1
    compute.set_endpoint(ENDPOINT, status="online")

    document = (await poll(clients, [task_id]))[task_id]
    assert document["status"] == SUCCESS


async def test_results_of_a_running_task_wait_for_the_endpoint(
    compute: FakeCompute, clients: Clients
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(payload: dict[str, Any]) -> str:
        started.set()
        release.wait(2)
        return "late"

    compute.register_function(GENERATE, slow)
    [task_id] = await submit(clients, gateway_batch())
    assert await blocking(started.wait, 2)
    compute.set_endpoint(ENDPOINT, status="offline")
    release.set()
    await asyncio.sleep(0.1)

    assert await status_of(clients, task_id) == RUNNING
    compute.set_endpoint(ENDPOINT, status="online")
    assert (await compute.settled(task_id)).status == SUCCESS


# -- errors ----------------------------------------------------------------------------------------------


async def test_unknown_endpoint_function_and_task_are_404(compute: FakeCompute, clients: Clients) -> None:
    unknown_function = gateway_batch(OTHER_ENDPOINT)  # any UUID that is not a registered function
    with pytest.raises(globus_sdk.ComputeAPIError) as no_endpoint:
        await submit(clients, gateway_batch(), endpoint=OTHER_ENDPOINT)
    with pytest.raises(globus_sdk.ComputeAPIError) as no_function:
        await submit(clients, unknown_function)
    with pytest.raises(globus_sdk.ComputeAPIError) as no_task:
        await blocking(clients.v2.get_task, OTHER_ENDPOINT)

    assert (no_endpoint.value.http_status, no_endpoint.value.code) == (404, "ENDPOINT_NOT_FOUND")
    assert (no_function.value.http_status, no_function.value.code) == (404, "FUNCTION_NOT_FOUND")
    assert OTHER_ENDPOINT in (no_function.value.message or "")
    assert (no_task.value.http_status, no_task.value.code) == (404, "TASK_NOT_FOUND")
    assert compute.tasks == {}
    unknown = (await blocking(clients.v2.get_task_batch, [OTHER_ENDPOINT]))["results"]
    assert unknown == {OTHER_ENDPOINT: {"status": "Failed", "reason": "Unknown task id"}}


async def test_fail_status_answers_every_request(compute: FakeCompute, clients: Clients) -> None:
    compute.fail_status = 503

    with pytest.raises(globus_sdk.GlobusAPIError) as failed:
        await submit(clients, gateway_batch())

    assert failed.value.http_status == 503 and failed.value.code == "SERVICE_UNAVAILABLE"
    assert compute.tasks == {} and compute.count("/submit") == 1


async def test_unknown_bearer_token_is_401(compute: FakeCompute) -> None:
    stranger = globus_sdk.ComputeClientV2(
        base_url=compute.url,
        authorizer=globus_sdk.AccessTokenAuthorizer("not-issued-by-globus"),
        retry_config=RetryConfig(max_retries=0),
    )

    with pytest.raises(globus_sdk.ComputeAPIError) as refused:
        await blocking(stranger.get_endpoint_status, ENDPOINT)

    assert refused.value.http_status == 401
    assert compute.requests[-1].authorization == "Bearer not-issued-by-globus"


async def test_delay_slows_every_answer(compute: FakeCompute, clients: Clients) -> None:
    compute.delay = 0.2
    started = time.monotonic()

    await blocking(clients.v2.get_endpoint_status, ENDPOINT)

    assert time.monotonic() - started >= 0.2


async def test_clients_without_base_url_never_reach_production() -> None:
    """conftest's autouse fixture points the SDK's service URLs at a closed port."""
    assert globus_sdk.ComputeClientV2().base_url.startswith("http://127.0.0.1:9")
    assert globus_sdk.ConfidentialAppAuthClient("id", "secret").base_url.startswith("http://127.0.0.1:9")
