"""The `config` of Globus Compute endpoints and clusters, validated once when the adaptor is built.

Credentials come from the entry, else from the existing gateway's per-endpoint overrides
(adaptors/compute_credentials.py), else from SERVICE_ACCOUNT_ID / SERVICE_ACCOUNT_SECRET; an entry
left without any stops start-up, naming the variables to set.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from adaptors.compute_credentials import with_endpoint_credentials
from adaptors.compute_streams import CallbackProtocol
from adaptors.configured import AdaptorConfig

UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
HTTP_URL = r"^https?://\S+$"


class ComputeAccess(AdaptorConfig):
    """Who the gateway is to Globus Compute, and where the services are.

    Credentials default to the existing gateway's SERVICE_ACCOUNT_ID / SERVICE_ACCOUNT_SECRET;
    URLs default to globus-sdk's (GLOBUS_SDK_SERVICE_URL_COMPUTE / _AUTH, or production).
    """

    endpoint_field: ClassVar[str]
    """The field naming the Compute endpoint whose per-endpoint credentials apply."""

    client_id: str | None = None
    client_secret: str | None = None
    compute_url: str | None = Field(default=None, pattern=HTTP_URL)
    auth_url: str | None = Field(default=None, pattern=HTTP_URL)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    http_timeout_seconds: float = Field(default=10, gt=0)
    result_queue: bool = True
    """Results pushed by the service over AMQP as well as polled (adaptors/compute_result_queue.py):
    off where the site lets no AMQP out, to spare the gateway trying."""
    result_queue_port: int | None = Field(default=None, ge=1, le=65535)
    """Instead of the port in the service's URL (5671), like the SDK Executor's `amqp_port`."""

    @model_validator(mode="before")
    @classmethod
    def _endpoint_credentials(cls, config: Any) -> Any:
        if not isinstance(config, dict):
            return config
        try:
            return with_endpoint_credentials(config, cls.endpoint_field)
        except ValueError as exc:
            raise PydanticCustomError("credentials_overrides", str(exc)) from None

    @model_validator(mode="after")
    def _has_credentials(self) -> ComputeAccess:
        try:
            self.credentials()
        except ValueError as exc:
            raise PydanticCustomError("credentials", str(exc)) from None
        return self

    def credentials(self) -> tuple[str, str]:
        client_id = self.client_id or os.environ.get("SERVICE_ACCOUNT_ID")
        secret = self.client_secret or os.environ.get("SERVICE_ACCOUNT_SECRET")
        if not client_id or not secret:
            raise ValueError(
                "client_id and client_secret: not configured, and SERVICE_ACCOUNT_ID / "
                "SERVICE_ACCOUNT_SECRET are not set"
            )
        return client_id, secret

    def service_key(self) -> tuple[str | bool | int | None, ...]:
        """Adaptors with the same credentials and URLs share one client and result poller."""
        queue = (self.result_queue, self.result_queue_port)
        return (*self.credentials(), self.compute_url, self.auth_url, *queue)


class GlobusComputeEndpointConfig(ComputeAccess):
    endpoint_field = "endpoint_uuid"

    api_port: int = Field(ge=1, le=65535)
    endpoint_uuid: str = Field(pattern=UUID)
    function_uuid: str = Field(pattern=UUID)
    batch_endpoint_uuid: str | None = Field(default=None, pattern=UUID)
    batch_function_uuid: str | None = Field(default=None, pattern=UUID)
    task_timeout_seconds: float = Field(default=600, gt=0)
    status_cache_seconds: float = Field(default=60, ge=0)
    cold_start_seconds: float = Field(default=1800, ge=0)
    endpoint_config_fields: dict[str, str] = Field(
        default_factory=dict,
        description="asynchronous tasks: body field → user_endpoint_config key it moves to",
    )
    loading_estimate_seconds: float = Field(default=300, gt=0)
    callback_protocol: CallbackProtocol = "existing"
    push_results: bool | None = None
    """Non-streamed requests get the callback details, so that the function can POST its answer
    (adaptors/compute_push.py). Default: on for `callback_protocol: gateway` (our function pushes
    only when given them, and an older copy of it ignores them), off for the existing function,
    which would forward them to vLLM and so cannot have it on."""
    accept_dill_results: bool = False
    """Trust the site's own Compute endpoint with results in dill (older endpoints ignore JSON)."""

    @model_validator(mode="after")
    def _push_needs_our_function(self) -> GlobusComputeEndpointConfig:
        if self.push_results and self.callback_protocol == "existing":
            raise PydanticCustomError(
                "push_results",
                "push_results needs callback_protocol: gateway (compute-functions/vllm_inference.py); "
                "the existing gateway's function would forward the callback details to vLLM",
            )
        return self

    @property
    def pushes(self) -> bool:
        """Whether non-streamed requests are given the callback details to push their answer."""
        return self.callback_protocol == "gateway" if self.push_results is None else self.push_results


class GlobusComputeClusterConfig(ComputeAccess):
    endpoint_field = "qstat_endpoint_uuid"

    qstat_endpoint_uuid: str = Field(pattern=UUID)
    qstat_function_uuid: str = Field(pattern=UUID)
    task_timeout_seconds: float = Field(default=60, gt=0)
    accept_dill_results: bool = False
