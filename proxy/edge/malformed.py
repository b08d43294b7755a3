"""The answer to a request aiohttp cannot parse: OpenAI-shaped JSON, with nothing of the request in it.

aiohttp answers such a request itself, before any application, middleware or signal sees it, with
a plain-text 400 that quotes the offending bytes: up to ~100 bytes of a header line, a bearer token
included. aiohttp offers no hook for that answer, so the one method that builds it,
`RequestHandler.handle_error`, is wrapped once per process: aiohttp still logs (proxy/process/logs.py keeps
the log free of the request's bytes) and still checks that nothing was sent yet; only the response
it returns is replaced.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.errors import error_body

_MESSAGES = {
    400: ("The request is not valid HTTP/1.1 (request line, header or body framing).", "malformed_request"),
    413: ("The request line or a header is too large.", "request_too_large"),
    500: ("The gateway failed to handle this request.", "internal_error"),
}


def _answer(status: int) -> web.Response:
    message, code = _MESSAGES.get(status) or _MESSAGES[500 if status >= 500 else 400]
    response = web.Response(
        status=status,
        text=json.dumps(error_body(status, message, code=code)),
        content_type="application/json",
    )
    response.force_close()
    return response


_ANSWERS_IN_JSON = "_gateway_answers_in_json"


def answer_malformed_requests_in_json() -> None:
    """Idempotent: every server of this process answers unparsable requests in JSON from now on."""
    if getattr(RequestHandler, _ANSWERS_IN_JSON, False):
        return
    original = RequestHandler.handle_error

    def handle_error(self: RequestHandler, request: Any, status: int = 500, *args: Any, **kwargs: Any) -> Any:
        original(self, request, status, *args, **kwargs)
        return _answer(status)

    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]
    setattr(RequestHandler, _ANSWERS_IN_JSON, True)
