"""Backends' redirects are never followed: a backend (or whatever answers at its address) answering
3xx could otherwise send the prompt, re-POSTed, to any URL, loopback services included, and its
answer came back to the client as a 200. A 3xx is a 502, and nothing reaches the redirect's target."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Server, auth, chat, start, start_gateway, write_gateway_config
from tests.test_routes import assert_openai_error, call

REDIRECTS = [301, 302, 303, 307, 308]
HITS = web.AppKey("hits", list)


@pytest.fixture
async def internal() -> AsyncIterator[Server]:
    """A loopback service that must never be reached through the gateway."""
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(f"{request.method} {request.path}")
        return web.json_response({"object": "chat.completion", "secret": "internal"})

    app = web.Application()
    app[HITS] = hits
    app.router.add_route("*", "/{tail:.*}", anything)
    runner, url = await start(app)
    yield Server(url=url, app=app)
    await runner.cleanup()


@pytest.fixture
async def gateway(internal: Server, tmp_path: Path) -> AsyncIterator[Server]:
    """Every endpoint and cluster status of the usual test configuration on a redirecting backend,
    which redirects with the status named in the request's `user` field (302 without one)."""

    async def redirect(request: web.Request) -> web.Response:
        status = int((await request.json()).get("user", 302)) if request.method == "POST" else 302
        return web.Response(status=status, headers={"Location": f"{internal.url}/admin{request.path}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    backend_runner, backend_url = await start(app)
    runner, server = await start_gateway(write_gateway_config(tmp_path, backend_url))
    yield server
    await runner.cleanup()
    await backend_runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_redirect_from_the_backend_is_502_and_not_followed(
    gateway: Server, internal: Server, http: aiohttp.ClientSession, status: int, stream: bool
) -> None:
    url = f"{gateway.url}/local/vllm/v1/chat/completions"
    body = chat(user=str(status), stream=stream)
    answer_status, document, _ = await call(http, "POST", url, json=body, headers=auth())
    assert answer_status == 502, document
    error = assert_openai_error(document)
    assert f"redirect (HTTP {status})" in error["message"]
    assert internal.app[HITS] == []


async def test_a_redirect_from_a_cluster_status_url_is_502_and_not_followed(
    gateway: Server, internal: Server, http: aiohttp.ClientSession
) -> None:
    status, document, _ = await call(http, "GET", f"{gateway.url}/local/jobs", headers=auth())
    assert status == 502, document
    assert "redirect (HTTP 302)" in assert_openai_error(document)["message"]
    assert internal.app[HITS] == []
