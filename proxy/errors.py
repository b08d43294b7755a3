"""The error envelopes: every failure the gateway answers is OpenAI-shaped JSON, except on the
Anthropic Messages route, whose clients understand only Anthropic's shape."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal, NoReturn

from aiohttp import web

Envelope = Literal["openai", "anthropic"]

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


_ANTHROPIC_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    if status in _ANTHROPIC_TYPE_BY_STATUS:
        return _ANTHROPIC_TYPE_BY_STATUS[status]
    return "invalid_request_error" if status < 500 else "api_error"


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's envelope has no `param` or `code`: the message names the field instead."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def envelope_of(request: web.Request) -> Envelope:
    """The route decides, not a header, so that every error on the Messages route (a refused token
    as much as a failed backend) has the shape that lets Anthropic clients raise their typed
    exceptions."""
    return "anthropic" if request.match_info.get("openai_path") == "messages" else "openai"


SHOULD_RETRY = "x-should-retry"
"""Not a standard header, but the one the openai and anthropic SDKs obey before their own rules
(which retry 408, 409, 429 and every 5xx, twice by default)."""
UNAVAILABLE_RETRY_AFTER_SECONDS = 10
"""A 503 or 429 without an estimate of its own: the SDKs wait this long before trying again,
instead of half a second, which would only find the same endpoint down or busy."""


def retry_advice(
    status: int, retryable: bool | None = None, retry_after: float | None = None
) -> dict[str, str]:
    """What a client's retry logic needs to know about an error.

    A 504 is never worth retrying: the gateway's timeouts are long, the work may still be running
    (a Globus Compute task cannot be called back) and a retry would queue it again. `retryable`
    False says the same of other failures (a task that failed, a configuration the backend refused).
    A 503 or 429 says when to come back."""
    advice = {}
    if retryable is False or (retryable is None and status == 504):
        advice[SHOULD_RETRY] = "false"
    if retry_after is None and status in (429, 503):
        retry_after = UNAVAILABLE_RETRY_AFTER_SECONDS
    if retry_after is not None:
        advice["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return advice


class ApiError(Exception):
    """Raised anywhere on the request path; the error middleware renders it. Its headers include
    the retry advice for its status (`retry_advice`); `headers` given here take precedence."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
        close: bool = False,
    ) -> None:
        """`close`: the connection ends after this answer (a request body was left unread)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        """What the request's record keeps instead of `message`: a backend's own text, never shown."""
        self.param = param
        self.code = code
        self.headers = {**retry_advice(status, retryable, retry_after), **(headers or {})}
        self.close = close

    @property
    def retryable(self) -> bool:
        """False when the client was told not to retry."""
        return self.headers.get(SHOULD_RETRY) != "false"

    def response(self, envelope: Envelope = "openai") -> web.Response:
        if envelope == "anthropic":
            body = anthropic_error_body(self.status, self.message)
        else:
            body = error_body(self.status, self.message, self.param, self.code)
        response = web.Response(
            status=self.status,
            text=json.dumps(body),
            content_type="application/json",
            headers=self.headers,
        )
        if self.close:
            response.force_close()
        return response


def adaptor_failed(
    code: int | None,
    message: str,
    retryable: bool | None = None,
    retry_after: float | None = None,
    detail: str | None = None,
) -> NoReturn:
    """An adaptor's error code becomes the status, if it is an error status at all; its retry
    hints become the answer's retry advice."""
    status = code if code is not None and 400 <= code <= 599 else 502
    raise ApiError(
        status,
        message,
        code="backend_error" if status >= 500 else None,
        retryable=retryable,
        retry_after=retry_after,
        detail=detail,
    )
