"""The one error envelope: every failure the gateway answers is OpenAI-shaped JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NoReturn

from aiohttp import web

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(error_body(self.status, self.message, self.param, self.code)),
            content_type="application/json",
            headers=self.headers,
        )


def adaptor_failed(code: int | None, message: str) -> NoReturn:
    """An adaptor's error code becomes the status, if it is an error status at all."""
    status = code if code is not None and 400 <= code <= 599 else 502
    raise ApiError(status, message, code="backend_error" if status >= 500 else None)
