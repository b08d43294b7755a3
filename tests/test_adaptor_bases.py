"""What the adaptor bases carry: `config` validated once against the adaptor's declared model (and a
mistake named by file, entry and field), the one map from transport failures to what the client is
told, the one batch status type, and what adaptors share living in their context, not the process."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import globus_sdk
import pytest
import requests
from pydantic import Field

from adaptors import (
    AdaptorConfig,
    AdaptorContext,
    BatchStatusEnum,
    ConfiguredEndpoint,
    SharedResources,
    SubmitStreamingTaskResponse,
    SubmitTaskResponse,
    transport_failure,
)
from adaptors.compute_service import ComputeService
from adaptors.globus_compute import GlobusComputeCluster, GlobusComputeEndpoint
from adaptors.status_url import MetisCluster
from proxy.core.registry import load_registry
from proxy.records import batch_store
from proxy.settings import ConfigError
from resource_server_async.schemas.batch import BatchStatus
from tests.support import write_yaml

CLUSTER = {
    "cluster_name": "c",
    "cluster_adapter": "examples.site_adaptors.echo.EchoCluster",
    "frameworks": ["f"],
    "openai_endpoints": ["chat/completions"],
}


class GreetingConfig(AdaptorConfig):
    greeting: str
    repeat: int = Field(default=1, ge=1)


class Greeter(ConfiguredEndpoint[GreetingConfig]):
    """A site adaptor on the base: its behaviour and its config model, nothing else."""

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        return SubmitTaskResponse(result=f'"{self.config.greeting * self.config.repeat}"')

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        return SubmitStreamingTaskResponse(error_code=400, error_message="no streams")


class Undeclared(ConfiguredEndpoint):  # type: ignore[type-arg]
    submit_task = Greeter.submit_task
    submit_streaming_task = Greeter.submit_streaming_task


def load(tmp_path: Path, adaptor: str, config: Any) -> Any:
    endpoint = {"cluster": "c", "framework": "f", "model": "m", "endpoint_adapter": adaptor, "config": config}
    write_yaml(tmp_path / "clusters.yaml", [CLUSTER])
    write_yaml(tmp_path / "endpoints.yaml", [endpoint])
    return load_registry(tmp_path / "endpoints.yaml", tmp_path / "clusters.yaml")


def load_error(tmp_path: Path, adaptor: str, config: Any) -> str:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, adaptor, config)
    return str(error.value)


def test_config_is_validated_into_the_declared_model(tmp_path: Path) -> None:
    (endpoint,) = load(tmp_path, f"{__name__}.Greeter", {"greeting": "hi", "repeat": 2}).endpoints.values()
    assert isinstance(endpoint.config, GreetingConfig) and Greeter.config_model is GreetingConfig
    assert (endpoint.model, endpoint.cluster, endpoint.endpoint_slug) == ("m", "c", "c-f-m")
    answer = asyncio.run(endpoint.submit_task({"model_params": {}}))
    assert answer.result == '"hihi"'


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, "field 'config.greeting': Field required"),
        ({"greeting": "hi", "repeat": 0}, "field 'config.repeat': Input should be greater than or equal"),
        ({"greeting": "hi", "greting": "typo"}, "field 'config.greting': Extra inputs are not permitted"),
    ],
)
def test_a_config_mistake_names_file_entry_and_field(tmp_path: Path, config: Any, expected: str) -> None:
    message = load_error(tmp_path, f"{__name__}.Greeter", config)
    assert message.startswith(f"{tmp_path / 'endpoints.yaml'}, entry 1 (m): ")
    assert expected in message


def test_an_adaptor_without_a_config_model_cannot_be_built(tmp_path: Path) -> None:
    message = load_error(tmp_path, f"{__name__}.Undeclared", {})
    assert "field 'endpoint_adapter'" in message and "Undeclared declares no config model" in message


def test_a_subclass_may_declare_a_narrower_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METIS_STATUS_URL", "http://metis.example/status")
    cluster = MetisCluster("1", "metis", "adaptors.status_url.MetisCluster", ["api"], [], config={})
    assert cluster.config.status_url == "http://metis.example/status"


def test_old_style_adaptors_parse_config_themselves(tmp_path: Path) -> None:
    """The existing gateway's guide: eight positional parameters, `self.config` a plain dict."""
    registry = load(tmp_path, "tests.site.custom_adaptors.CustomEndpoint", {"prefix": "said: "})
    (endpoint,) = registry.endpoints.values()
    assert endpoint.config == {"prefix": "said: "}


def api_error(status: int) -> globus_sdk.GlobusAPIError:
    response = requests.Response()
    response.status_code = status
    response._content = b"{}"
    response.headers["Content-Type"] = "application/json"
    response.request = requests.Request("POST", "https://compute.internal.example/v3/submit").prepare()
    return globus_sdk.GlobusAPIError(response)


REFUSED = aiohttp.ClientConnectorError(None, ConnectionRefusedError(111, "10.0.0.7:8000"))  # type: ignore[arg-type]
BACKEND, GLOBUS = "the backend", "Globus Compute"


@pytest.mark.parametrize(
    "exc, service, status, retryable, kind, message",
    [
        (TimeoutError(), BACKEND, 504, None, "timeout", "The backend did not answer within 30 seconds."),
        (aiohttp.ServerTimeoutError(), BACKEND, 504, None, "timeout", "did not answer within 30"),
        (requests.ReadTimeout(), BACKEND, 504, None, "timeout", "did not answer within 30"),
        (REFUSED, BACKEND, 502, None, "connect", "Cannot reach the backend (ClientConnectorError)."),
        (
            requests.ConnectionError(),
            BACKEND,
            502,
            None,
            "connect",
            "Cannot reach the backend (ConnectionError).",
        ),
        (ConnectionResetError(), BACKEND, 502, None, "connect", "(ConnectionResetError)"),
        (ValueError("unknown"), BACKEND, 502, None, "connect", "(ValueError)"),
        (api_error(403), GLOBUS, 502, False, "4xx", "Globus Compute refused the request (HTTP 403)"),
        (api_error(429), GLOBUS, 503, None, "4xx", "Globus Compute is unavailable (HTTP 429)"),
        (api_error(500), GLOBUS, 503, None, "5xx", "is unavailable (HTTP 500); try again shortly."),
        (
            globus_sdk.GlobusConnectionError("x", ConnectionError()),
            GLOBUS,
            503,
            None,
            "connect",
            "not answer;",
        ),
        (globus_sdk.GlobusTimeoutError("x", TimeoutError()), GLOBUS, 503, None, "timeout", "not answer;"),
    ],
)
def test_one_map_from_transport_failures(
    exc: BaseException, service: str, status: int, retryable: bool | None, kind: str, message: str
) -> None:
    failure = transport_failure(exc, service, timeout=30)
    assert (failure.status, failure.retryable, failure.kind) == (status, retryable, kind)
    assert message in failure.message
    assert "internal" not in failure.message and "10.0.0.7" not in failure.message


def test_a_failure_once_the_answer_started_says_so() -> None:
    assert transport_failure(TimeoutError(), timeout=2.5, started=True).message == (
        "The backend sent nothing for 2.5 seconds."
    )
    broken = transport_failure(aiohttp.ClientPayloadError(), started=True)
    assert (broken.status, broken.message) == (502, "The backend closed the stream before it finished.")
    assert transport_failure(TimeoutError()).message == "The backend did not answer in time."


def test_one_batch_status_type() -> None:
    assert BatchStatus is BatchStatusEnum
    assert batch_store.ACTIVE == ("pending", "running")
    assert set(batch_store.FINISHED) == {"completed", "failed"}
    assert [status for status in BatchStatusEnum if status.finished] == [
        BatchStatusEnum.failed,
        BatchStatusEnum.completed,
    ]


def test_shared_resources_are_counted_by_user() -> None:
    shared = SharedResources()
    made: list[list[str]] = []

    def make() -> list[str]:
        made.append([])
        return made[-1]

    first, second = shared.acquire(list, "k", make), shared.acquire(list, "k", make)
    other = shared.acquire(list, "other", make)
    assert first is second and first is not other and len(made) == 2
    assert shared.release(list, "k") is None
    assert shared.release(list, "k") is first
    assert shared.acquire(list, "k", make) is not first


COMPUTE = {
    "client_id": "gateway",
    "client_secret": "secret",
    "compute_url": "http://127.0.0.1:9/",
    "auth_url": "http://127.0.0.1:9/",
}


def compute_endpoint(model: str) -> GlobusComputeEndpoint:
    config = {
        **COMPUTE,
        "api_port": 8000,
        "endpoint_uuid": "0b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d",
        "function_uuid": "1b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d",
    }
    return GlobusComputeEndpoint("1", f"hpc-vllm-{model}", "hpc", "vllm", model, "x", config=config)


async def test_each_context_has_its_own_compute_services() -> None:
    """Adaptors of one gateway (one context) share a service and its poller per credentials;
    another gateway in the same process gets its own, and the last adaptor to leave closes it."""
    cluster_config = {
        **COMPUTE,
        "qstat_endpoint_uuid": "2b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d",
        "qstat_function_uuid": "3b3a2d1c-6f5e-4a7b-9c8d-1e2f3a4b5c6d",
    }
    with ThreadPoolExecutor(max_workers=1) as executor:
        one = AdaptorContext(executor=executor, relay=None)  # type: ignore[arg-type]
        two = AdaptorContext(executor=executor, relay=None)  # type: ignore[arg-type]
        first, second, elsewhere = compute_endpoint("a"), compute_endpoint("b"), compute_endpoint("a")
        cluster = GlobusComputeCluster("1", "hpc", "x", ["vllm"], [], config=cluster_config)
        for adaptor, context in ((first, one), (second, one), (cluster, one), (elsewhere, two)):
            await adaptor.startup(context)
        assert first._service is second._service is cluster._service
        assert elsewhere._service is not first._service
        service = first._service
        assert isinstance(service, ComputeService)
        service._poller = asyncio.create_task(asyncio.sleep(60))
        for adaptor in (first, second):
            await adaptor.shutdown()
        assert not service._poller.cancelled(), "the cluster still uses it"
        await cluster.shutdown()
        await asyncio.sleep(0)
        assert service._poller.cancelled()
        fresh = object()
        assert one.shared.acquire(ComputeService, service.key, lambda: fresh) is fresh, "it was let go"
        await elsewhere.shutdown()
