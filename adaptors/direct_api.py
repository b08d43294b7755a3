"""Adaptors for a backend that speaks the OpenAI API itself over HTTP, such as vLLM."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from pydantic import Field, field_validator

from adaptors.cluster import GetJobsResponse, Jobs
from adaptors.configured import AdaptorConfig, ConfiguredCluster, ConfiguredEndpoint
from adaptors.context import AdaptorContext, AnswerLimits
from adaptors.endpoint import CLIENT_JSON, StreamError, SubmitStreamingTaskResponse, SubmitTaskResponse
from adaptors.keepalive import until_first_chunk
from adaptors.telemetry import NoTelemetry, Telemetry
from adaptors.transport import transport_failure

_HTTP_URL = r"^https?://\S+$"


def _encoded(params: dict[str, Any]) -> bytes:
    """orjson is about five times faster, which matters on the event loop for a 20 MB body; what it
    cannot encode (nesting beyond 254 levels, integers beyond 64 bits, lone surrogates) the
    standard library does."""
    try:
        return orjson.dumps(params)
    except TypeError:
        return json.dumps(params).encode()


class DirectAPIEndpointConfig(AdaptorConfig):
    api_url: str = Field(pattern=_HTTP_URL, description="base URL, e.g. http://host:8000/v1")
    api_key_env_name: str | None = None
    api_request_timeout: float = Field(default=120, gt=0)
    max_connections: int = Field(default=4096, ge=0, description="0: no limit")
    keepalive_seconds: float = Field(
        default=15, gt=0, description="a stream waiting for its first chunk sends a comment this often"
    )

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


class DirectAPIEndpoint(ConfiguredEndpoint[DirectAPIEndpointConfig]):
    """Forwards the client's fields to `{api_url}/{openai path}` and passes the answer back."""

    forwards_client_json = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass may change the fields before they are sent (`MetisEndpoint` sets `stream`):
        it forwards the client's bytes only when it says so itself."""
        super().__init_subclass__(**kwargs)
        if "forwards_client_json" not in cls.__dict__:
            cls.forwards_client_json = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._base_url = self.config.api_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if self.config.api_key_env_name:
            self._headers["Authorization"] = f"Bearer {os.environ[self.config.api_key_env_name]}"
        timeout = self.config.api_request_timeout
        self._task_timeout = aiohttp.ClientTimeout(total=timeout)  # built once: not free per request
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
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
        try:
            async with self._client().post(
                url, data=body, headers=self._headers, timeout=self._task_timeout, allow_redirects=False
            ) as response:
                failed = response.status >= 300
                limit = self._limits.error_bytes if failed else self._limits.answer_bytes
                text = await _text(response, limit)
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = transport_failure(exc, timeout=self.config.api_request_timeout)
            self._telemetry.upstream_error(self.endpoint_slug, failure.kind)
            return SubmitTaskResponse(error_code=failure.status, error_message=failure.message)
        if _is_redirect(response.status):
            self._refused(502)
            return SubmitTaskResponse(error_code=502, error_message=_redirected(response.status))
        if response.status >= 400:
            self._refused(response.status)
            return SubmitTaskResponse(**_refusal(response, text, self._limits))
        if text is None:
            self._refused(502)
            return SubmitTaskResponse(error_code=502, error_message=_too_large(self._limits.answer_bytes))
        return SubmitTaskResponse(result=text)

    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        """The request is sent as the client's stream starts: while the backend has sent nothing,
        the client gets comments every `keepalive_seconds`. A backend that refuses before that
        still gets a plain error status to the client (which the route without a cluster may fail
        over); after it, the stream's error event."""
        url, body = self._request(data)
        stream = self._stream(url, body, self.config.api_request_timeout)
        return SubmitStreamingTaskResponse(response=until_first_chunk(stream, self.config.keepalive_seconds))

    async def _stream(self, url: str, body: bytes, silence: float) -> AsyncIterator[bytes]:
        """Opens the request and reads its first chunk in one go, so that nothing the backend sent
        waits between the two; closing it early (client gone) drops the upstream connection."""
        try:
            response = await self._client().post(
                url, data=body, headers=self._headers, timeout=self._stream_timeout, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = transport_failure(exc, timeout=silence)
            self._telemetry.upstream_error(self.endpoint_slug, failure.kind)
            raise StreamError(failure.message, failure.status) from None
        if _is_redirect(response.status):
            self._refused(502)
            response.close()
            raise StreamError(_redirected(response.status), 502)
        if response.status >= 400:
            self._refused(response.status)
            try:
                async with response:
                    text = await _text(response, self._limits.error_bytes)
            except (TimeoutError, aiohttp.ClientError) as exc:
                text = f"the error answer was cut off ({type(exc).__name__})"
            refusal = _refusal(response, text, self._limits)
            raise StreamError(
                refusal["error_message"],
                refusal["error_code"],
                retryable=refusal["retryable"],
                retry_after=refusal["retry_after"],
                detail=refusal["error_detail"],
            )
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = transport_failure(exc, timeout=silence, started=True)
            raise StreamError(failure.message, failure.status) from None
        except BaseException:
            response.close()
            raise
        finally:
            response.release()

    def _refused(self, status: int) -> None:
        self._telemetry.upstream_error(self.endpoint_slug, "5xx" if status >= 500 else "4xx")

    def _request(self, data: dict[str, Any]) -> tuple[str, bytes]:
        """The client's own bytes when the gateway changed nothing in them, else its fields encoded."""
        params = data["model_params"]
        url = f"{self._base_url}/{params['openai_endpoint']}"
        client_json = data.get(CLIENT_JSON)
        if isinstance(client_json, bytes):
            return url, client_json
        return url, _encoded({key: value for key, value in params.items() if key != "openai_endpoint"})

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("DirectAPIEndpoint used before startup()")
        return self._session


class DirectAPICluster(ConfiguredCluster[DirectAPIClusterConfig]):
    """Reads a jobs document (the shape of `Jobs`) from a status URL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
            failure = transport_failure(exc, timeout=self.config.api_request_timeout)
            return GetJobsResponse(error_code=failure.status, error_message=failure.message)
        if _is_redirect(response.status):
            return GetJobsResponse(error_code=502, error_message=_redirected(response.status))
        if response.status >= 400:
            refusal = _refusal(response, text, self._limits)
            return GetJobsResponse(
                error_code=refusal["error_code"],
                error_message=refusal["error_message"],
                error_detail=refusal["error_detail"],
            )
        if text is None:
            return GetJobsResponse(error_code=502, error_message=_too_large(self._limits.answer_bytes))
        try:
            return GetJobsResponse(jobs=self.jobs_from(json.loads(text)))
        except (ValueError, RecursionError):
            return GetJobsResponse(
                error_code=502, error_message="The cluster's status document is not a jobs report."
            )

    def jobs_from(self, document: Any) -> Jobs:
        """Here the status document is a jobs report already; subclasses map their own formats."""
        return Jobs.model_validate(document)


def _new_session(max_connections: int) -> aiohttp.ClientSession:
    """One session serves every user of the endpoint, so it keeps no cookies: a cookie a backend (or
    the load balancer in front of it) set in one user's answer would go out with everyone's requests."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar()
    )


def _refusal(response: aiohttp.ClientResponse, text: str | None, limits: AnswerLimits) -> dict[str, Any]:
    """The error fields of an answer for the backend's error status. A backend that failed the
    request (a 5xx other than busy) would fail it again or repeat its work: not retryable. A busy
    backend's own `Retry-After` (in seconds) is passed on. `text` is None when the error answer
    exceeded `limits.error_bytes`."""
    status = _status(response.status)
    retry_after = None
    if status in (429, 503):
        try:
            retry_after = float(response.headers.get("Retry-After", ""))
        except ValueError:
            retry_after = None
    if text is None:
        message: str = f"The backend failed with an error answer over {limits.error_bytes} bytes."
        detail = None
    else:
        message, detail = _upstream_message(response.status, text)
    return {
        "error_code": status,
        "error_message": message[: limits.error_message_chars],
        "error_detail": detail,
        "retryable": False if status == 502 else None,
        "retry_after": retry_after if retry_after is not None and 0 < retry_after < 86400 else None,
    }


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


def _upstream_message(status: int, text: str) -> tuple[str, str | None]:
    """(message, detail): a backend's own structured message (vLLM's `{"error": {"message"}}`, or a
    `message` or `detail` string) reaches the client; any other text (an HTML error page, a proxy's
    or a traceback, naming internal hosts) is the detail, kept in the record and replaced by a
    generic message."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_LONGEST_MESSAGE], None
        for key in ("message", "detail", "error"):
            if isinstance(document.get(key), str):
                return str(document[key])[:_LONGEST_MESSAGE], None
    detail = text.strip()[:_LONGEST_DETAIL] or None
    return f"The backend failed with HTTP status {status} and no error message to pass on.", detail


_LONGEST_MESSAGE = 2000
_LONGEST_DETAIL = 4000
