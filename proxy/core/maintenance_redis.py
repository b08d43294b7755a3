"""The maintenance status that the existing gateway's cron job writes to Redis, read here too.

`cron_jobs/check_maintenances.py` there asks the facility's status API every few minutes and
stores, through Django's cache (django-redis: key prefix `inference_gateway`, version 1, values
pickled and zstd-compressed), `cluster_status:<cluster>` = `{"status", "cluster", "message"}` for
30 minutes. A cluster whose status is `down` is under maintenance with that message, as there.
The job keeps running unchanged beside this gateway; with `redis_url` set, every gateway process
reads the keys of its clusters every `POLL_SECONDS`.

The values are pickles written by another program: they are read with an unpickler that refuses
every class and function, so only plain dicts, lists, strings and numbers come out, and they are
bounded in size before and after decompression.
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
from collections.abc import AsyncIterator, Callable
from typing import Any

import pyzstd
import redis.asyncio
from aiohttp import web
from redis.exceptions import RedisError

from proxy.core.state import STATE

KEY = "inference_gateway:1:cluster_status:{cluster}"
POLL_SECONDS = 5.0
MAX_VALUE_BYTES = 64 * 1024
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

log = logging.getLogger("proxy.core.maintenance")


class _PlainData(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def decode_status(raw: bytes) -> dict[str, Any] | None:
    """django-redis's encoding of a cluster status; None for anything else."""
    if len(raw) > MAX_VALUE_BYTES:
        return None
    if raw.startswith(_ZSTD_MAGIC):
        try:
            raw = pyzstd.ZstdDecompressor().decompress(raw, max_length=MAX_VALUE_BYTES)
        except pyzstd.ZstdError:
            return None
    try:
        value = _PlainData(io.BytesIO(raw)).load()
    except Exception:  # any malformed pickle: pickle raises many kinds
        return None
    return value if isinstance(value, dict) else None


def down_message(cluster: str, status: dict[str, Any]) -> str | None:
    if status.get("status") != "down":
        return None
    message = status.get("message")
    return message if isinstance(message, str) and message else f"Cluster {cluster} is currently down."


def maintenance_from_redis(
    redis_url: str, interval: float = POLL_SECONDS
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        task = asyncio.create_task(_poll(app, client, interval))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    return lifecycle


async def _poll(app: web.Application, client: redis.asyncio.Redis, interval: float) -> None:
    failing = False
    while True:
        names = list(app[STATE].registry.clusters)
        try:
            values = await client.mget([KEY.format(cluster=name) for name in names]) if names else []
            failing = False
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("cannot read the clusters' maintenance status from Redis: %s", exc)
            failing, values = True, [None] * len(names)
        reported = {}
        for name, raw in zip(names, values, strict=True):
            status = decode_status(raw) if isinstance(raw, bytes) else None
            message = down_message(name, status) if status is not None else None
            if message is not None:
                reported[name] = message
        app[STATE].maintenance.reported = reported
        await asyncio.sleep(interval)
