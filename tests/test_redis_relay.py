"""The Redis transport of the stream relay, through a real redis-server, with the deployed defaults:
blocking reads that outlive their block time, bounded Redis streams, few connections for many
waiting streams, and a Redis that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from proxy.callbacks import RELAY
from tests.conftest import Server, start_gateway
from tests.test_relay import collect, post, relay_config, sse


async def test_a_stream_silent_longer_than_the_keepalive_completes(
    backend: Server, tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """An HPC job silent for more than the deployed keep-alive (15 s, so more than redis-py's
    default socket timeout of 5 s) still reaches its client once it speaks."""
    runner, gateway = await start_gateway(relay_config(tmp_path, backend, redis_url))
    try:
        stream = await gateway.app[RELAY].open()
        client = asyncio.ensure_future(collect(stream))
        started = time.monotonic()
        await asyncio.sleep(16.5)
        assert not client.done(), client.result()
        body = {"task_id": stream.stream_id}
        assert (await post(http, gateway, "data", {**body, "data": sse("late")}, stream.token))[0] == 200
        assert (await post(http, gateway, "done", body, stream.token))[0] == 200
        received, error = await asyncio.wait_for(client, 10)
        assert error is None
        assert received[-1] == b"data: late\n\n"
        assert received[0] == b": waiting for the model\n\n"
        assert time.monotonic() - started > 16
    finally:
        await runner.cleanup()
