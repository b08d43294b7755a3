"""The error middleware, inside the observe middleware: whatever goes wrong below it leaves as an
error in the route's envelope (OpenAI's, or Anthropic's on the Messages route), and the message it
renders is noted on the request's exchange for its record."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.core.exchange import EXCHANGE
from proxy.errors import ApiError, envelope_of

log = logging.getLogger(__name__)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        failure = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        failure = _from_http_exception(request, exc)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        failure = ApiError(500, "The gateway failed to handle this request.", code="internal_error")
    request[EXCHANGE].error = failure.detail or failure.message
    return failure.response(envelope_of(request))


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ApiError:
    """Errors aiohttp raises itself: no route, wrong method, body over the limit."""
    route = f"{request.method} {request.path[:200]}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(
            405,
            f"{route} is not allowed; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, f"{route} does not exist.", code="not_found")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(
            413,
            f"The request body is larger than the gateway's limit of {request.client_max_size} bytes.",
            code="request_too_large",
        )
    return ApiError(exc.status, exc.reason)
