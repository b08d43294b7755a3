"""Adaptors for a backend that speaks the OpenAI API itself over HTTP, such as vLLM."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field, field_validator

from adaptors.backend_answers import answer_text, is_redirect, redirected, refusal_of, too_large
from adaptors.cluster import GetJobsResponse, Jobs
from adaptors.configured import AdaptorConfig, ConfiguredCluster
from adaptors.context import AdaptorContext, AnswerLimits
from adaptors.endpoint import SubmitStreamingTaskResponse, SubmitTaskResponse
from adaptors.forwarding import ForwardingConfig, ForwardingEndpoint
from adaptors.http_client import HTTPClient
from adaptors.http_wire import HTTPFailure
from adaptors.transport import transport_failure

_HTTP_URL = r"^https?://\S+$"


class DirectAPIEndpointConfig(ForwardingConfig):
    api_url: str = Field(pattern=_HTTP_URL, description="base URL, e.g. http://host:8000/v1")
    api_key_env_name: str | None = None

    @field_validator("api_key_env_name")
    @classmethod
    def _key_is_set(cls, env_name: str | None) -> str | None:
        """Checked at start-up: a key missing from the environment would fail every request."""
        if env_name and not os.environ.get(env_name):
            raise ValueError(f"environment variable {env_name} is not set")
        return env_name


class DirectAPIClusterConfig(AdaptorConfig):
    status_url: str = Field(pattern=_HTTP_URL)
    api_request_timeout: float = Field(default=10, gt=0)


class DirectAPIEndpoint(ForwardingEndpoint[DirectAPIEndpointConfig]):
    """Forwards the client's fields to `{api_url}/{openai path}` and passes the answer back."""

    forwards_client_json = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._base_url = self.config.api_url.rstrip("/")
        if self.config.api_key_env_name:
            self._headers["Authorization"] = f"Bearer {os.environ[self.config.api_key_env_name]}"

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        url, body = self._request(data)
        return await self.forward(url, body)

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        """The request is sent as the client's stream starts: while the backend has sent nothing,
        the client gets comments every `keepalive_seconds`. A backend that refuses before that
        still gets a plain error status to the client (which the route without a cluster may fail
        over); after it, the stream's error event."""
        url, body = self._request(data)
        return SubmitStreamingTaskResponse(
            response=self.forward_stream(url, body), keepalive_seconds=self.config.keepalive_seconds
        )

    def _request(self, data: dict[str, Any]) -> tuple[str, bytes]:
        return f"{self._base_url}/{data['model_params']['openai_endpoint']}", self.body_of(data)


class DirectAPICluster(ConfiguredCluster[DirectAPIClusterConfig]):
    """Reads a jobs document (the shape of `Jobs`) from a status URL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: HTTPClient | None = None
        self._limits = AnswerLimits()

    async def startup(self, context: AdaptorContext) -> None:
        self._http = HTTPClient(max_connections=8)
        self._limits = context.limits

    async def shutdown(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def get_jobs(self) -> GetJobsResponse:
        if self._http is None:
            raise RuntimeError("DirectAPICluster used before startup()")
        timeout = self.config.api_request_timeout
        try:
            answer = await self._http.fetch(
                "GET", self.config.status_url, None, timeout=timeout, limit=self._limits.for_status
            )
        except (TimeoutError, HTTPFailure) as exc:
            failure = transport_failure(exc, timeout=timeout)
            return GetJobsResponse(error_code=failure.status, error_message=failure.message)
        text = answer_text(answer.head, answer.body)
        if is_redirect(answer.status):
            return GetJobsResponse(error_code=502, error_message=redirected(answer.status))
        if answer.status >= 400:
            refusal = refusal_of(answer.head, text, self._limits)
            return GetJobsResponse(
                error_code=refusal["error_code"],
                error_message=refusal["error_message"],
                error_detail=refusal["error_detail"],
            )
        if text is None:
            return GetJobsResponse(error_code=502, error_message=too_large(self._limits.answer_bytes))
        try:
            return GetJobsResponse(jobs=self.jobs_from(json.loads(text)))
        except (ValueError, RecursionError):
            return GetJobsResponse(
                error_code=502, error_message="The cluster's status document is not a jobs report."
            )

    def jobs_from(self, document: Any) -> Jobs:
        """Here the status document is a jobs report already; subclasses map their own formats."""
        return Jobs.model_validate(document)
