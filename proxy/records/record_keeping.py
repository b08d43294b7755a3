"""How many request records the database keeps, and for how long.

A request without a user (a wrong token, an unknown path, a probe) costs its sender nothing, so a
flood of them would fill the database: only ``unauthenticated_per_minute`` of them per process are
stored, in bursts of as many, and the rest are counted (they stay in the request rates and on
stdout). Every record, a user's or not, is deleted once older than ``retention_days``: by the
gateway, hourly, or by ``inference-gateway usage prune``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Final

from proxy.records.database import Database, DatabaseUnavailable
from proxy.records.record import RequestRecord

log = logging.getLogger(__name__)

DAY: Final = 86400.0
PRUNE_EVERY_SECONDS: Final = 3600.0
PRUNE_RETRY_SECONDS: Final = 60.0
PRUNE_CHUNK: Final = 10_000
"""Rows deleted per statement: a SQLite write keeps every other writer waiting until it commits."""
_PRUNE_SQL: Final = (
    "DELETE FROM requests WHERE (request_id, started_at) IN"
    " (SELECT request_id, started_at FROM requests WHERE started_at < ? ORDER BY started_at LIMIT ?)"
)


class UnauthenticatedSampler:
    """A token bucket of ``per_minute`` records without a user, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self._capacity = float(per_minute)
        self._per_second = per_minute / 60.0
        self._allowance = self._capacity
        self._last = time.monotonic()
        self.sampled_out = 0

    def kept(self, records: Sequence[RequestRecord]) -> Sequence[RequestRecord]:
        """``records`` less the ones without a user beyond the rate; the same list when all stay."""
        now = time.monotonic()
        self._allowance = min(self._capacity, self._allowance + (now - self._last) * self._per_second)
        self._last = now
        kept: list[RequestRecord] = []
        for record in records:
            if record.user_id is None:
                if self._allowance < 1:
                    self.sampled_out += 1
                    continue
                self._allowance -= 1
            kept.append(record)
        return kept if len(kept) < len(records) else records


async def prune(database: Database, before: float) -> int:
    """Delete the records that started before ``before`` (epoch seconds); how many were deleted.
    In chunks, each its own transaction, so neither database is locked for long."""
    deleted = 0
    while True:
        count = await database.execute(_PRUNE_SQL, before, PRUNE_CHUNK)
        deleted += count
        if count < PRUNE_CHUNK:
            return deleted
        await asyncio.sleep(0)


async def prune_forever(database: Database, retention_days: float) -> None:
    """At start and then hourly, or a minute after the database was unavailable. Several workers
    or hosts may prune at once: deleting is idempotent."""
    while True:
        pause = PRUNE_EVERY_SECONDS
        try:
            deleted = await prune(database, time.time() - retention_days * DAY)
        except DatabaseUnavailable as exc:
            log.warning("request records not pruned, the database is unavailable: %s", exc)
            pause = PRUNE_RETRY_SECONDS
        except Exception:
            log.exception("request records not pruned")
        else:
            if deleted:
                log.info("request records: %d older than %g days deleted", deleted, retention_days)
        await asyncio.sleep(pause)
