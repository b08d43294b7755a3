"""Authentication: who is calling. Deny by default: every route needs a valid bearer token
unless it is explicitly listed as public."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.core.identity import AUTH_SECONDS, USER, Authenticator, unauthorized


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise unauthorized("Missing 'Authorization: Bearer <token>' header.")
    if scheme.lower() != "bearer":
        raise unauthorized("The Authorization header must use the Bearer scheme.")
    token = token.strip()
    if not token:
        raise unauthorized("The bearer token is empty.")
    if not token.isascii():  # aiohttp keeps bytes that are not UTF-8 as surrogates, which hashing refuses
        raise unauthorized("Invalid or expired access token.")
    return token


def auth_middleware(
    authenticator: Authenticator,
    public_routes: Collection[str],
    client_of: Callable[[web.Request], str | None],
) -> Middleware:
    """`client_of` names the client's address (the nearest untrusted hop, behind nginx)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        match_info = request.match_info
        if match_info.http_exception is None and match_info.route.name not in public_routes:
            started = time.monotonic()
            token = bearer_token(request)
            request[USER] = await authenticator.authenticate(token, lambda: client_of(request))
            request[AUTH_SECONDS] = time.monotonic() - started
        return await handler(request)

    return authenticate
