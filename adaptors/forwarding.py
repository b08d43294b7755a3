"""The base of adaptors that send the client's request on to a backend speaking the OpenAI API over
HTTP: a direct API (adaptors/direct_api.py) at one fixed URL, an on-demand deployment
(adaptors/deployment.py) at whichever replica is ready. It posts the body, reads the answer within
the gateway's limits, relays a stream, and maps every failure to what the client is told; where
the request goes is the subclass's.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

from pydantic import Field

from adaptors.backend_answers import answer_text, is_redirect, redirected, refusal_of, too_large
from adaptors.configured import AdaptorConfig, ConfiguredEndpoint
from adaptors.context import AdaptorContext, AnswerLimits
from adaptors.endpoint import CLIENT_JSON, StreamError, SubmitTaskResponse
from adaptors.http_client import HTTPClient
from adaptors.http_wire import ConnectFailed, ConnectTimeout, HTTPFailure, json_body
from adaptors.telemetry import NoTelemetry, Telemetry
from adaptors.transport import transport_failure


class ForwardingConfig(AdaptorConfig):
    api_request_timeout: float = Field(default=120, gt=0)
    max_connections: int = Field(default=4096, ge=0, description="0: no limit")
    keepalive_seconds: float = Field(
        default=15, gt=0, description="a stream waiting for its first chunk sends a comment this often"
    )


Forwarding = TypeVar("Forwarding", bound=ForwardingConfig)


class Unreachable(Exception):
    """No connection could be opened to the backend (refused, or not opened in time): nothing was
    sent, so another replica may take the request. Raised only when the caller asks for it."""


def unreachable(exc: BaseException) -> bool:
    """A connection that was never opened; a TLS failure is not one (the peer answered, and is not
    who it should be)."""
    return isinstance(exc, ConnectFailed | ConnectTimeout)


class ForwardingEndpoint(ConfiguredEndpoint[Forwarding]):
    """Posts the client's fields (or bytes) to a URL its subclass chooses and passes the answer back."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass may change the fields before they are sent (`MetisEndpoint` sets `stream`):
        it forwards the client's bytes only when it says so itself."""
        super().__init_subclass__(**kwargs)
        if "forwards_client_json" not in cls.__dict__:
            cls.forwards_client_json = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers = {"Content-Type": "application/json"}
        self._http: HTTPClient | None = None
        self._telemetry: Telemetry = NoTelemetry()
        self._limits = AnswerLimits()

    def client_ssl(self, context: AdaptorContext) -> ssl.SSLContext | None:
        """The TLS client context for the backend; None: the default verification."""
        return None

    async def startup(self, context: AdaptorContext) -> None:
        self._http = HTTPClient(self.config.max_connections, self.client_ssl(context), self._headers)
        self._telemetry = context.telemetry
        self._limits = context.limits

    async def shutdown(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def forward(self, url: str, body: bytes, *, or_unreachable: bool = False) -> SubmitTaskResponse:
        """The backend's whole answer. `or_unreachable`: raise `Unreachable` instead of answering
        when no connection could be opened."""
        timeout = self.config.api_request_timeout
        try:
            answer = await self._client().fetch(
                "POST", url, body, timeout=timeout, limit=self._limits.for_status
            )
        except (TimeoutError, HTTPFailure) as exc:
            if or_unreachable and unreachable(exc):
                raise Unreachable from exc
            failure = transport_failure(exc, timeout=timeout)
            self._telemetry.upstream_error(self.endpoint_slug, failure.kind)
            return SubmitTaskResponse(error_code=failure.status, error_message=failure.message)
        status = answer.status
        if is_redirect(status):
            self._refused(502)
            return SubmitTaskResponse(error_code=502, error_message=redirected(status))
        text = answer_text(answer.head, answer.body)
        if status >= 400:
            self._refused(status)
            return SubmitTaskResponse(**refusal_of(answer.head, text, self._limits))
        if text is None:
            self._refused(502)
            return SubmitTaskResponse(error_code=502, error_message=too_large(self._limits.answer_bytes))
        return SubmitTaskResponse(result=text)

    async def forward_stream(
        self, url: str, body: bytes, *, or_unreachable: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """The backend's stream, its request sent as it is first read: a stream never read holds
        no connection. The answer's head and first chunk are read in one go, so that nothing the
        backend sent waits between the two. Closing it early (client gone) drops the upstream
        connection. `or_unreachable` as in `forward`, raised before anything is yielded."""
        silence = self.config.api_request_timeout
        try:
            response = await self._client().stream("POST", url, body, timeout=silence)
        except (TimeoutError, HTTPFailure) as exc:
            if or_unreachable and unreachable(exc):
                raise Unreachable from exc
            failure = transport_failure(exc, timeout=silence)
            self._telemetry.upstream_error(self.endpoint_slug, failure.kind)
            raise StreamError(failure.message, failure.status) from None
        if is_redirect(response.status):
            self._refused(502)
            response.close()
            raise StreamError(redirected(response.status), 502)
        if response.status >= 400:
            self._refused(response.status)
            try:
                text = answer_text(response.head, await response.read(self._limits.error_bytes))
            except HTTPFailure as exc:
                text = f"the error answer was cut off ({exc.shown})"
            refusal = refusal_of(response.head, text, self._limits)
            raise StreamError(
                refusal["error_message"],
                refusal["error_code"],
                retryable=refusal["retryable"],
                retry_after=refusal["retry_after"],
                detail=refusal["error_detail"],
            )
        try:
            while (chunk := await response.next_piece()) is not None:
                yield chunk
        except (TimeoutError, HTTPFailure) as exc:
            failure = transport_failure(exc, timeout=silence, started=True)
            raise StreamError(failure.message, failure.status) from None
        finally:
            response.close()

    def _refused(self, status: int) -> None:
        self._telemetry.upstream_error(self.endpoint_slug, "5xx" if status >= 500 else "4xx")

    def body_of(self, data: dict[str, Any]) -> bytes:
        """The client's own bytes when the gateway changed nothing in them, else its fields encoded."""
        client_json = data.get(CLIENT_JSON)
        if isinstance(client_json, bytes):
            return client_json
        params = data["model_params"]
        return json_body({key: value for key, value in params.items() if key != "openai_endpoint"})

    def _client(self) -> HTTPClient:
        if self._http is None:
            raise RuntimeError(f"{type(self).__name__} used before startup()")
        return self._http
