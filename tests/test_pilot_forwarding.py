"""The pilot's forwarding, in process over real mutual TLS, to a model server that echoes what it
received: the path and query as the client encoded them, end-to-end headers only, and request
bodies refused when too large or stalled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mtls.contexts import server_context
from pilot import forward
from pilot.metrics import PilotMetrics
from pilot.models import ModelServer
from pilot.protocol import Heartbeat, ModelConfig, ModelState
from pilot.server import PilotServer, Serving
from tests.pilot_support import Site, make_site
from tests.support import start

NAME = "echo"


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"path": request.raw_path, "headers": dict(request.headers), "body_bytes": len(body)}
    )


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[tuple[Site, str]]:
    site = make_site(tmp_path / "site")
    backend = web.Application()
    backend.router.add_route("*", "/{tail:.*}", _echo)
    runner, url = await start(backend)
    server = ModelServer(ModelConfig(name=NAME, command=("unused",), port=0), lambda: None)
    server.port = int(url.rsplit(":", 1)[1])
    server.state = ModelState.ready
    models = {NAME: server}
    serving = Serving(
        models=models,
        gateway_subjects=frozenset({"CN=gateway,O=Test Lab"}),
        metrics_subjects=frozenset(),
        metrics=PilotMetrics(models),
        status=lambda: Heartbeat(replica_id="r", models=()),
        stop=lambda reason: None,
    )
    certificate, key = site.pair("pilot")
    pilot = PilotServer(serving, server_context(certificate, key, site.ca))
    await pilot.start("127.0.0.1", 0)
    yield site, f"https://127.0.0.1:{pilot.port}/deployments/{NAME}"
    await pilot.stop()
    await runner.cleanup()


async def test_path_query_and_end_to_end_headers_pass_as_sent(pilot: tuple[Site, str]) -> None:
    site, url = pilot
    headers = {"Connection": "X-Hop", "X-Hop": "1", "Authorization": "Bearer backend-key", "X-Trace": "a"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/files/a%2Fb?q=1%202&q=3", data=b"x" * 1000, headers=headers, ssl=site.client("gateway")
        ) as answer,
    ):
        echoed = await answer.json()
    assert echoed["path"] == "/v1/files/a%2Fb?q=1%202&q=3"
    assert echoed["body_bytes"] == 1000
    assert echoed["headers"]["Authorization"] == "Bearer backend-key"
    assert echoed["headers"]["X-Trace"] == "a"
    assert "X-Hop" not in echoed["headers"]


async def test_a_request_body_too_large_or_stalled_is_refused(
    pilot: tuple[Site, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, url = pilot
    monkeypatch.setattr(forward, "MAX_BODY_BYTES", 4096)
    monkeypatch.setattr(forward, "BODY_STALL_SECONDS", 0.5)

    async def chunks(count: int, pause: float) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"x" * 1024
            await asyncio.sleep(pause)

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/x", data=b"x" * 5000, ssl=site.client("gateway")) as answer:
            assert answer.status == 413
        async with session.post(f"{url}/v1/x", data=chunks(8, 0), ssl=site.client("gateway")) as answer:
            assert answer.status == 413
            assert "limited to 4096 bytes" in (await answer.json())["error"]["message"]
        async with session.post(f"{url}/v1/x", data=chunks(2, 2), ssl=site.client("gateway")) as answer:
            assert answer.status == 408
        async with session.post(f"{url}/v1/x", data=chunks(3, 0.1), ssl=site.client("gateway")) as answer:
            assert (await answer.json())["body_bytes"] == 3072


async def test_small_bodies_pass_whole_and_streams_part_by_part(
    pilot: tuple[Site, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body and an answer of a declared length up to WHOLE_BYTES go on in one piece with their
    length; a larger body goes on as it arrives, its length still true; no Content-Type is added
    where the client sent none."""
    site, url = pilot
    monkeypatch.setattr(forward, "WHOLE_BYTES", 2048)
    async with aiohttp.ClientSession() as session:
        for size in (1000, 3000):
            async with session.post(
                f"{url}/v1/x",
                data=b"x" * size,
                ssl=site.client("gateway"),
                skip_auto_headers=("Content-Type",),
            ) as answer:
                text = await answer.read()
                assert answer.headers["Content-Length"] == str(len(text))
                echoed = await answer.json()
            assert echoed["body_bytes"] == size
            assert echoed["headers"]["Content-Length"] == str(size)
            assert "Content-Type" not in echoed["headers"]
            assert "Transfer-Encoding" not in echoed["headers"]
