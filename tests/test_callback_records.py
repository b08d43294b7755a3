"""Callback chunks are counted, not recorded: each accepted one belongs to a stream whose own request
has its record, while a refused one (the wrong token, a stream gone) keeps a record beside its metric."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from proxy.core.state import STATE
from tests.support import Server, start_gateway
from tests.test_relay import post, relay_config, sse


async def test_accepted_callbacks_leave_no_record_but_refused_ones_do(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, None))
    try:
        stream = await gateway.app[STATE].relay.open()
        chunks = stream.events()
        body = {"task_id": stream.stream_id, "data": sse('{"n": 1}')}
        for _ in range(3):
            assert (await post(http, gateway, "data", body, stream.token))[0] == 200
        assert (await post(http, gateway, "data", body, "not-the-token"))[0] == 403
        assert (await anext(chunks)).startswith(b"data: ")
        await chunks.aclose()
        assert (await post(http, gateway, "done", {"task_id": stream.stream_id}, stream.token))[0] == 410
        await asyncio.sleep(0.3)  # records leave in batches (RECORD_DELAY_SECONDS)
        exposition = gateway.app[STATE].metrics.exposition().decode()
    finally:
        await runner.cleanup()
    records = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    callbacks = [record for record in records if "/api/streaming/" in record["route"]]
    assert [(record["route"].rsplit("/", 2)[-2], record["status"]) for record in callbacks] == [
        ("data", 403),
        ("done", 410),
    ]
    assert all(record["error"] for record in callbacks)
    counted = {
        line.split('status_class="')[1][:3]: line.rsplit(" ", 1)[1]
        for line in exposition.splitlines()
        if line.startswith("gateway_requests_total") and "/api/streaming/data/" in line
    }
    assert counted == {"2xx": "3.0", "4xx": "1.0"}
