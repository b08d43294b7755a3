"""Request bodies as JSON, with the errors every JSON route answers."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from aiohttp import hdrs, web

from proxy.errors import ApiError


async def read_json(request: web.Request) -> Any:
    """Missing Content-Type is read as JSON (raw clients); any other type is refused."""
    if hdrs.CONTENT_TYPE in request.headers and not _is_json(request.content_type):
        raise ApiError(
            415,
            f"Content-Type '{request.content_type}' is not supported; send 'application/json'.",
            code="unsupported_media_type",
        )
    try:
        raw = await request.read()
    except web.RequestPayloadError:
        # aiohttp decodes Content-Encoding as it reads: a body that is not what its header says.
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity")[:20]
        message = f"The request body could not be decoded as Content-Encoding '{encoding}'."
        raise ApiError(400, message, code="invalid_body") from None
    if not raw:
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = (
            exc.msg if isinstance(exc, json.JSONDecodeError) else "it is not UTF-8 JSON or nests too deeply"
        )
        raise ApiError(400, f"The request body is not valid JSON: {reason}.", code="invalid_json") from None


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")
