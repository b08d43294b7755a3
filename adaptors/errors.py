"""Failures an adaptor may raise instead of returning an `error_code`.

The existing gateway's current adaptors raise exceptions that carry their HTTP status
(`resource_server_async.errors.EndpointError(..., status_code=503)`); those are subclasses of
`AdaptorError` here, so the gateway answers with that status and the OpenAI envelope.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class AdaptorError(Exception):
    """`status_code` is the HTTP status for the client; `code` a short machine-readable name."""

    status_code: int = HTTPStatus.BAD_GATEWAY
    code: str = "backend_error"

    def __init__(
        self, *args: Any, status_code: int | None = None, info: dict[str, Any] | None = None
    ) -> None:
        super().__init__(*args)
        if status_code is not None:
            self.status_code = HTTPStatus(status_code)
        self.info = info or {}

    @property
    def message(self) -> str:
        return str(self) or HTTPStatus(self.status_code).phrase
