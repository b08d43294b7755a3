"""Requests whose headers are ambiguous are refused before anything reads them."""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.errors import ApiError


@web.middleware
async def single_authorization(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Two `Authorization` headers: the gateway would read the first, a proxy or backend in front
    of or behind it perhaps the last, so whose request this is would depend on who reads it."""
    if len(request.headers.getall(hdrs.AUTHORIZATION, ())) > 1:
        raise ApiError(400, "Send one Authorization header, not several.", code="duplicate_authorization")
    return await handler(request)
