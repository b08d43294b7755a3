"""The pilot as a real process: it registers, loads the fake backend, serves it over mutual TLS to
the gateway's identity only, and heartbeats until the gateway tells it to stop."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from mtls.certificates import expires_at
from pilot.forward import end_to_end
from pilot.protocol import Heartbeat, ModelState, PilotOrders
from testing.processes import children
from tests.pilot_support import (
    MODEL,
    REPLICA,
    FakeGateway,
    PilotProcess,
    Site,
    alive,
    make_site,
    until,
    write_config,
)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gateway = await FakeGateway().start()
    yield gateway
    await gateway.stop()


async def _ready(gateway: FakeGateway, pilot: PilotProcess) -> int:
    """The pilot's port, once it has reported its model ready."""
    await until(lambda: ModelState.ready in gateway.states() or pilot.process.poll() is not None, 30, "ready")
    assert pilot.process.poll() is None, pilot.output()
    return gateway.registrations[0].port


def _client(site: Site, port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{port}/deployments/{MODEL}/v1",
        api_key="not-checked-by-the-backend",
        http_client=openai.DefaultAsyncHttpxClient(verify=site.client("gateway")),
        max_retries=0,
    )


async def test_registers_loads_serves_and_stops_when_told(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    """The file says 10 s between heartbeats (the default); the gateway's orders make it 1 s."""
    config = write_config(tmp_path, site, gateway, load_seconds=2)
    config.write_text(json.dumps({**json.loads(config.read_text()), "heartbeat_seconds": 10}))
    gateway.orders = PilotOrders(heartbeat_seconds=1)
    pilot = PilotProcess(config)
    try:
        await until(lambda: bool(gateway.registrations), 30, "registered")
        registration = gateway.registrations[0]
        assert registration.replica_id == REPLICA
        assert registration.address == "127.0.0.1"
        assert registration.models[0].state is ModelState.loading
        assert abs(registration.walltime_end - (time.time() + 3600)) < 30
        assert registration.certificate_not_after == expires_at(site.pair("pilot")[0]).timestamp()
        url = f"https://127.0.0.1:{registration.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{url}/deployments/{MODEL}/v1/models", ssl=site.client("gateway")
            ) as answer:
                assert answer.status == 503
                assert int(answer.headers["Retry-After"]) > 0
                assert (await answer.json())["error"]["type"] == "model_loading"
            port = await _ready(gateway, pilot)
            assert gateway.states()[-1] is ModelState.ready
            async with session.get(f"{url}/pilot/status", ssl=site.client("gateway")) as answer:
                status = Heartbeat.model_validate_json(await answer.read())
                assert status.models[0].state is ModelState.ready
            async with session.get(
                f"{url}/deployments/other/v1/models", ssl=site.client("gateway")
            ) as answer:
                assert answer.status == 404
                assert "other" in (await answer.json())["error"]["message"]

        client = _client(site, port)
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}]
        )
        assert completion.choices[0].message.content
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[[chunks=4]] hello"}], stream=True
        )
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
        assert len([piece for piece in pieces if piece]) == 4
        await client.close()

        servers = children(pilot.process.pid)
        assert servers and all(alive(pid) for pid in servers)
        gateway.orders = PilotOrders(stop=True)
        assert await pilot.exit_code(30) == 0, pilot.output()
        assert not any(alive(pid) for pid in servers)
        assert "the gateway says so" in pilot.output()
    finally:
        await pilot.stop()


async def test_each_identity_may_do_its_own_part_only(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        url = f"https://127.0.0.1:{await _ready(gateway, pilot)}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics", ssl=site.client("metrics")) as answer:
                assert answer.status == 200
                text = await answer.text()
                assert f'pilot_model_state{{model="{MODEL}",pilot_model_state="ready"}} 1.0' in text
            for who, path in [
                ("metrics", f"/deployments/{MODEL}/v1/models"),
                ("metrics", "/pilot/status"),
                ("gateway", "/metrics"),
                ("gateway", "/"),
            ]:
                async with session.get(f"{url}{path}", ssl=site.client(who)) as answer:
                    assert answer.status == 403, (who, path)
                    assert (await answer.json())["error"]["type"] == "forbidden"
            async with session.get(
                f"{url}/deployments/{MODEL}/v1/models", ssl=site.client("gateway")
            ) as answer:
                assert answer.status == 200
                assert (await answer.json())["data"][0]["id"] == MODEL
            broken = {
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "[[die_after=2]]"}],
            }
            async with session.post(
                f"{url}/deployments/{MODEL}/v1/chat/completions",
                json=broken,
                ssl=site.client("gateway"),
            ) as answer:
                assert answer.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):  # broken off as the server's was, not ended
                    await answer.read()
            for who in ("stranger", "pilot"):  # another CA; a certificate for serving only
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"{url}/metrics", ssl=site.client(who)) as answer:
                        await answer.read()
            bare = ssl.create_default_context(cafile=str(site.ca))
            bare.check_hostname = False
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"{url}/metrics", ssl=bare) as answer:
                    await answer.read()
        log = pilot.output()
        assert "GET /metrics from CN=metrics,O=Test Lab: 200" in log
        assert "refused GET /metrics from CN=gateway,O=Test Lab: 403" in log
        assert "refused GET /pilot/status from CN=metrics,O=Test Lab: 403" in log
        assert f"[{MODEL}]" in log  # the model server's own output, under its name
        assert "replica-token" not in log
    finally:
        await pilot.stop()


def test_hop_by_hop_headers_stay_on_their_hop() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Authorization", "Bearer backend-key"),
            ("Accept", "text/event-stream"),
            ("Host", "pilot"),
        ]
    )
    kept = end_to_end(CIMultiDictProxy(headers), frozenset({"host"}))
    assert list(kept.items()) == [("Authorization", "Bearer backend-key"), ("Accept", "text/event-stream")]
