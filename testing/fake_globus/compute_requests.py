"""The fake Globus Compute service's HTTP plumbing: how requests are recorded, read and refused.

The error body's shape is assumed (the modern service is closed source): ``{"code", "message",
"request_id"}``, which globus-sdk parses into ``ComputeAPIError.code`` / ``.message``, and 422 for
malformed requests, as a FastAPI application answers them.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class RecordedRequest:
    """One request as it arrived, for asserting the wire format."""

    method: str
    path: str
    json: Any  # the decoded JSON body, None without one (or when it was not JSON)
    authorization: str | None
    time: float  # time.monotonic() on arrival
    user_agent: str | None = None  # which client called: the SDK's `requests` or the gateway's own


class RequestError(Exception):
    """Raised by request parsing to answer an error document."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def compute_error(status: int, code: str, message: str) -> web.Response:
    """An error body globus-sdk parses into ``ComputeAPIError.code`` / ``.message`` (shape assumed)."""
    body = {"code": code, "message": message, "request_id": secrets.token_hex(8)}
    return web.json_response(body, status=status)


def canonical_uuid(value: str, what: str) -> str:
    """The canonical form of a UUID; a 422 like FastAPI's path validation otherwise."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise RequestError(422, "REQUEST_MALFORMED", f"{what} is not a valid UUID: {value!r}") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(422, "REQUEST_MALFORMED", "body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError(422, "REQUEST_MALFORMED", "body must be a JSON object")
    return body


def submission(body: dict[str, Any]) -> tuple[dict[str, list[str]], list[str], bool]:
    """A V3 submit's tasks (function id → payloads), result serializers and `create_queue`."""
    batches = body.get("tasks")
    if not isinstance(batches, dict) or not all(_strings(payloads) for payloads in batches.values()):
        raise RequestError(422, "REQUEST_MALFORMED", "tasks must map function ids to lists of payloads")
    serializers = body.get("result_serializers") or []
    if not _strings(serializers):
        raise RequestError(422, "REQUEST_MALFORMED", "result_serializers must be a list of strings")
    create_queue = body.get("create_queue") or False
    if not isinstance(create_queue, bool):
        raise RequestError(422, "REQUEST_MALFORMED", "create_queue must be a boolean")
    return batches, serializers, create_queue


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
