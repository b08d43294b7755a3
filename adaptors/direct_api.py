"""Adaptors for a backend that speaks the OpenAI API itself over HTTP, such as vLLM."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, Field

from adaptors.cluster import BaseCluster, GetJobsResponse, Jobs
from adaptors.context import AdaptorContext, AnswerLimits
from adaptors.endpoint import (
    BaseEndpoint,
    StreamError,
    SubmitStreamingTaskResponse,
    SubmitTaskResponse,
)
from adaptors.telemetry import ErrorKind, NoTelemetry, Telemetry

_HTTP_URL = r"^https?://\S+$"


def _encoded(params: dict[str, Any]) -> bytes:
    """orjson is about five times faster, which matters on the event loop for a 20 MB body; what it
    cannot encode (nesting beyond 254 levels, integers beyond 64 bits, lone surrogates) the
    standard library does."""
    try:
        return orjson.dumps(params)
    except TypeError:
        return json.dumps(params).encode()


class DirectAPIEndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_url: str = Field(pattern=_HTTP_URL, description="base URL, e.g. http://host:8000/v1")
    api_key_env_name: str | None = None
    api_request_timeout: float = Field(default=120, gt=0)
    max_connections: int = Field(default=4096, ge=0, description="0: no limit")


class DirectAPIClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status_url: str = Field(pattern=_HTTP_URL)
    api_request_timeout: float = Field(default=10, gt=0)


class DirectAPIEndpoint(BaseEndpoint):
    """Forwards the client's fields to `{api_url}/{openai path}` and passes the answer back."""

    def __init__(
        self,
        id: str,
        endpoint_slug: str,
        cluster: str,
        framework: str,
        model: str,
        endpoint_adapter: str,
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id, endpoint_slug, cluster, framework, model, endpoint_adapter,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self.config = DirectAPIEndpointConfig.model_validate(config or {})
        self._base_url = self.config.api_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if self.config.api_key_env_name:
            self._headers["Authorization"] = f"Bearer {_api_key(self.config.api_key_env_name)}"
        self._session: aiohttp.ClientSession | None = None
        self._telemetry: Telemetry = NoTelemetry()
        self._limits = AnswerLimits()

    async def startup(self, context: AdaptorContext) -> None:
        self._session = _new_session(self.config.max_connections)
        self._telemetry = context.telemetry
        self._limits = context.limits

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        url, body = self._request(data)
        timeout = aiohttp.ClientTimeout(total=self.config.api_request_timeout)
        try:
            async with self._client().post(
                url, data=body, headers=self._headers, timeout=timeout, allow_redirects=False
            ) as response:
                failed = response.status >= 300
                limit = self._limits.error_bytes if failed else self._limits.answer_bytes
                text = await _text(response, limit)
        except (TimeoutError, aiohttp.ClientError) as exc:
            code, message = self._failed(exc, self.config.api_request_timeout)
            return SubmitTaskResponse(error_code=code, error_message=message)
        if _is_redirect(response.status):
            self._refused(502)
            return SubmitTaskResponse(error_code=502, error_message=_redirected(response.status))
        if response.status >= 400:
            self._refused(response.status)
            return SubmitTaskResponse(error_code=_status(response.status), error_message=self._message(text))
        if text is None:
            self._refused(502)
            return SubmitTaskResponse(error_code=502, error_message=_too_large(self._limits.answer_bytes))
        return SubmitTaskResponse(result=text)

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        url, body = self._request(data)
        silence = self.config.api_request_timeout
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=silence, sock_read=silence)
        try:
            response = await self._client().post(
                url, data=body, headers=self._headers, timeout=timeout, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            code, message = self._failed(exc, silence)
            return SubmitStreamingTaskResponse(error_code=code, error_message=message)
        if _is_redirect(response.status):
            self._refused(502)
            response.close()
            return SubmitStreamingTaskResponse(error_code=502, error_message=_redirected(response.status))
        if response.status >= 400:
            self._refused(response.status)
            try:
                async with response:
                    text = await _text(response, self._limits.error_bytes)
            except (TimeoutError, aiohttp.ClientError) as exc:
                text = f"the error answer was cut off ({type(exc).__name__})"
            return SubmitStreamingTaskResponse(
                error_code=_status(response.status), error_message=self._message(text)
            )
        return SubmitStreamingTaskResponse(response=_chunks(response, silence))

    def _message(self, text: str | None) -> str:
        if text is None:
            return f"The backend failed with an error answer over {self._limits.error_bytes} bytes."
        return _upstream_message(text)[: self._limits.error_message_chars]

    def _failed(self, exc: BaseException, timeout: float) -> tuple[int, str]:
        kind: ErrorKind = "timeout" if isinstance(exc, TimeoutError) else "connect"
        self._telemetry.upstream_error(self.endpoint_slug, kind)
        return _transport_failure(exc, timeout)

    def _refused(self, status: int) -> None:
        self._telemetry.upstream_error(self.endpoint_slug, "5xx" if status >= 500 else "4xx")

    def _request(self, data: dict[str, Any]) -> tuple[str, bytes]:
        params = dict(data["model_params"])
        openai_path = params.pop("openai_endpoint")
        return f"{self._base_url}/{openai_path}", _encoded(params)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("DirectAPIEndpoint used before startup()")
        return self._session


class DirectAPICluster(BaseCluster):
    """Reads a jobs document (the shape of `Jobs`) from a status URL."""

    def __init__(
        self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: Iterable[str],
        openai_endpoints: Iterable[str],
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id, cluster_name, cluster_adapter, frameworks, openai_endpoints,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self.config = DirectAPIClusterConfig.model_validate(config or {})
        self._session: aiohttp.ClientSession | None = None
        self._limits = AnswerLimits()

    async def startup(self, context: AdaptorContext) -> None:
        self._session = _new_session(max_connections=8)
        self._limits = context.limits

    async def shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get_jobs(self) -> GetJobsResponse:
        if self._session is None:
            raise RuntimeError("DirectAPICluster used before startup()")
        timeout = aiohttp.ClientTimeout(total=self.config.api_request_timeout)
        try:
            async with self._session.get(
                self.config.status_url, timeout=timeout, allow_redirects=False
            ) as response:
                failed = response.status >= 300
                text = await _text(
                    response, self._limits.error_bytes if failed else self._limits.answer_bytes
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            code, message = _transport_failure(exc, self.config.api_request_timeout)
            return GetJobsResponse(error_code=code, error_message=message)
        if _is_redirect(response.status):
            return GetJobsResponse(error_code=502, error_message=_redirected(response.status))
        if response.status >= 400:
            message = _upstream_message(text or "")[: self._limits.error_message_chars]
            return GetJobsResponse(error_code=_status(response.status), error_message=message)
        if text is None:
            return GetJobsResponse(error_code=502, error_message=_too_large(self._limits.answer_bytes))
        try:
            return GetJobsResponse(jobs=self.jobs_from(json.loads(text)))
        except ValueError:
            return GetJobsResponse(
                error_code=502, error_message="The cluster's status document is not a jobs report."
            )

    def jobs_from(self, document: Any) -> Jobs:
        """Here the status document is a jobs report already; subclasses map their own formats."""
        return Jobs.model_validate(document)


async def _chunks(response: aiohttp.ClientResponse, silence: float) -> AsyncIterator[bytes]:
    """Yields bytes as they arrive; closing early (client gone) drops the upstream connection."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except TimeoutError:
        raise StreamError(f"The backend sent nothing for {silence:g} seconds.", 504) from None
    except aiohttp.ClientError:
        raise StreamError("The backend closed the stream before it finished.", 502) from None
    except BaseException:
        response.close()
        raise
    finally:
        response.release()


def _new_session(max_connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, auto_decompress=True)


def _api_key(env_name: str) -> str:
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"api_key_env_name: environment variable {env_name} is not set")
    return key


def _transport_failure(exc: BaseException, timeout: float) -> tuple[int, str]:
    if isinstance(exc, asyncio.TimeoutError):
        return 504, f"The backend did not answer within {timeout:g} seconds."
    return 502, f"Cannot reach the backend ({type(exc).__name__})."


async def _text(response: aiohttp.ClientResponse, limit: int) -> str | None:
    """The answer as text, or None once it exceeds `limit` bytes. Counted as read, after
    decompression, so neither a huge answer nor a small compressed one that unpacks to a huge one
    is ever held whole. An uncompressed answer of a known length within the limit (the usual one)
    is read in one go."""
    length = response.content_length
    if length is not None and length <= limit and not response.headers.get("Content-Encoding"):
        return (await response.read()).decode(_charset(response), errors="replace")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body.extend(chunk)
        if len(body) > limit:
            return None
    return body.decode(_charset(response), errors="replace")


def _charset(response: aiohttp.ClientResponse) -> str:
    """The declared charset if Python knows it, else UTF-8 (what JSON is)."""
    if response.charset:
        with contextlib.suppress(LookupError):
            return codecs.lookup(response.charset).name
    return "utf-8"


def _too_large(limit: int) -> str:
    return f"The backend's answer is larger than the gateway's limit of {limit} bytes."


def _is_redirect(status: int) -> bool:
    return 300 <= status < 400


def _redirected(status: int) -> str:
    """Redirects are never followed: a backend (or whoever answers in its place) could send the
    prompt and the gateway's credentials to any URL, loopback services included."""
    return f"The backend answered with a redirect (HTTP {status}), which the gateway does not follow."


def _status(upstream_status: int) -> int:
    """A client error stays the client's; a backend failure is a bad gateway, unless it says busy."""
    if upstream_status < 500 or upstream_status in (503, 504):
        return upstream_status
    return 502


def _upstream_message(text: str) -> str:
    try:
        document = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "The backend failed without a message."
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if isinstance(document.get(key), str):
                return str(document[key])
    return text.strip()[:500]
