"""The existing gateway's maintenance cron job keeps working: what it writes to Redis (through
Django's cache and django-redis) puts a cluster under maintenance here too."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pyzstd
import redis.asyncio
import yaml

from proxy.core.maintenance_redis import POLL_SECONDS, decode_status
from tests.conftest import Server, auth, chat, start_gateway, write_gateway_config

KEY = "inference_gateway:1:cluster_status:{cluster}"
"""Django's cache key for `cluster_status:<cluster>`: KEY_PREFIX "inference_gateway", version 1."""
CRON_TTL_SECONDS = 1800


def as_django_redis_stores(value: Any) -> bytes:
    """django-redis's DefaultClient with PickleSerializer and ZStdCompressor: pickled, then
    compressed when longer than 15 bytes."""
    pickled = pickle.dumps(value, protocol=pickle.DEFAULT_PROTOCOL)
    return pyzstd.compress(pickled) if len(pickled) > 15 else pickled


async def cron_job_writes(client: redis.asyncio.Redis, cluster: str, status: str, message: str) -> None:
    """What cron_jobs/check_maintenances.py stores for one cluster."""
    value = {"status": status, "cluster": cluster, "message": message}
    await client.set(KEY.format(cluster=cluster), as_django_redis_stores(value), ex=CRON_TTL_SECONDS)


@pytest.fixture
async def gateway_with_redis(
    tmp_path: Path, backend: Server, redis_url: str
) -> AsyncIterator[tuple[Server, redis.asyncio.Redis]]:
    config = write_gateway_config(tmp_path, backend.url)
    document = yaml.safe_load(config.read_text())
    document["redis_url"] = redis_url
    config.write_text(yaml.safe_dump(document))
    client = redis.asyncio.Redis.from_url(redis_url)
    for cluster in ("local", "chatonly"):
        await cron_job_writes(client, cluster, "down", f"{cluster} is under maintenance")
    runner, gateway = await start_gateway(config)
    yield gateway, client
    await runner.cleanup()
    await client.aclose()


async def answer(http: aiohttp.ClientSession, gateway: Server, cluster: str = "local") -> tuple[int, Any]:
    url = f"{gateway.url}/{cluster}/vllm/v1/chat/completions"
    async with http.post(url, json=chat(max_tokens=1), headers=auth()) as response:
        return response.status, await response.json()


async def test_a_cluster_the_cron_job_reports_down_is_under_maintenance(
    gateway_with_redis: tuple[Server, redis.asyncio.Redis], http: aiohttp.ClientSession
) -> None:
    """Both clusters start down; then the job finds one up and cannot reach the status API for the
    other ("error"): neither is under maintenance once the gateway has read the keys again."""
    gateway, client = gateway_with_redis
    for cluster in ("local", "chatonly"):
        status, body = await answer(http, gateway, cluster)
        assert status == 503
        assert body["error"]["message"] == f"{cluster} is under maintenance"
    async with http.get(f"{gateway.url}/status") as response:
        statuses = await response.json()
    assert statuses["local"] is False and statuses["chatonly"] is False

    await cron_job_writes(client, "local", "up", "local is online")
    await cron_job_writes(client, "chatonly", "error", "HTTPSConnectionPool: Read timed out.")
    await polled_since(client, await polls(client))
    assert (await answer(http, gateway, "local"))[0] == 200
    assert (await answer(http, gateway, "chatonly"))[0] == 200


async def polls(client: redis.asyncio.Redis) -> int:
    """How many MGETs (the gateway's poll of its clusters' keys) Redis has executed so far."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def polled_since(client: redis.asyncio.Redis, before: int) -> None:
    """Until the gateway has read its keys again, and has had a moment to apply what it read: Redis
    runs commands in order, so a read counted after `before` saw what was written before it."""
    deadline = time.monotonic() + POLL_SECONDS + 2
    while await polls(client) <= before:
        assert time.monotonic() < deadline, "the gateway did not read the keys again"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)


def test_only_plain_data_is_unpickled(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    assert decode_status(as_django_redis_stores({"status": "down", "message": Exploit()})) is None
    assert decode_status(pickle.dumps(Exploit())) is None
    assert not (tmp_path / "pwned").exists()
    assert decode_status(b"garbage") is None
    assert decode_status(pyzstd.compress(b"\0" * 10_000_000)) is None
    assert decode_status(as_django_redis_stores({"status": "down"})) == {"status": "down"}
