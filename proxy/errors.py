"""The error envelopes: every failure the gateway answers is OpenAI-shaped JSON, except on the
Anthropic Messages route, whose clients understand only Anthropic's shape."""

from __future__ import annotations

import json
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


class ApiError(Exception):
    """Raised anywhere on the request path; the error middleware renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        """`close`: the connection ends after this answer (a request body was left unread)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.close = close

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


def adaptor_failed(code: int | None, message: str) -> NoReturn:
    """An adaptor's error code becomes the status, if it is an error status at all."""
    status = code if code is not None and 400 <= code <= 599 else 502
    raise ApiError(status, message, code="backend_error" if status >= 500 else None)
