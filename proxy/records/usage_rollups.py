"""Hourly and daily sums of the request records (the rollup tables of migration 5), for the dashboard.

A year of records is millions of rows: summing them for every page view would take seconds. Complete
hours are summed once into small tables, and a page adds the few records newer than the last
summed hour (the "tail"), read raw with the same SELECT. So the tables and the raw tail always answer
with the same columns:

- ``usage_hourly`` (hour, cluster, model): requests, errors, tokens, and histograms of latency and time
  to first token (``LATENCY_BOUNDS_MS``) from which percentiles are interpolated;
- ``usage_models_daily`` (day, cluster, model): the same per day, for periods of days (a year of hours
  is still too many rows to sum 45 columns of at every page view);
- ``usage_users_daily`` (day, username, cluster, model): requests, errors and tokens per user;
- ``usage_users_hourly`` (hour): distinct users, which no sum of the other tables gives.

The daily tables are summed an hour at a time too: each hour adds to its day's rows.

Records are stored when their request ends, so an hour is summed only ``delay`` seconds after it ended
(streams last up to an hour); a record arriving later than that (its database was away longer) is not
in the sums. The watermark ``usage_rollup_state.summed_until`` is advanced under a lock, so several
gateway processes never sum an hour twice.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from proxy.records.database import Database, DatabaseTimeout
from proxy.records.usage_rollup_tables import HOUR, ROLLUPS, raw_users_hourly_sql

log = logging.getLogger(__name__)

CHUNK_SECONDS: Final = 86400
"""A catch-up sums at most a day per transaction: progress is kept, and SQLite's one writer is
never held for long. A day too busy to sum within the statement timeout is summed in halves, down
to an hour."""
_LOCK: Final = "usage_rollups"


async def summed_until(database: Database) -> float:
    """Where the sums end and the raw tail begins (0: nothing summed yet)."""
    row = await database.fetchone("SELECT summed_until FROM usage_rollup_state WHERE name = ?", _LOCK)
    return float(row["summed_until"]) if row is not None else 0.0


async def roll_up(database: Database, delay: float, now: float | None = None) -> float:
    """Sum every complete hour that ended at least ``delay`` seconds ago and is not summed yet, a day
    per transaction (less if that times out); the new watermark. The first run starts at the oldest
    record."""
    now = time.time() if now is None else now
    target = (now - delay) // HOUR * HOUR
    done = await summed_until(database)
    if done == 0.0:
        oldest = await database.fetchone("SELECT MIN(started_at) AS oldest FROM requests")
        if oldest is None or oldest["oldest"] is None:
            return done
        done = float(oldest["oldest"]) // HOUR * HOUR
    chunk = CHUNK_SECONDS
    while done < target:
        end = min(target, (done // chunk + 1) * chunk)
        try:
            done = await _sum(database, done, end)
        except DatabaseTimeout:
            if chunk <= HOUR:
                raise
            chunk = chunk // 2 if chunk // 2 % HOUR == 0 else HOUR  # whole hours: 24, 12, 6, 3, 1
            log.warning("summing request records: %d s at once took too long; now %d s", chunk * 2, chunk)
    return done


async def _sum(database: Database, done: float, end: float) -> float:
    """Sum [done, end) in one transaction, unless another process already did: the new watermark."""
    dialect = database.dialect
    async with database.transaction() as tx:
        await tx.lock(_LOCK)
        row = await tx.fetchone("SELECT summed_until FROM usage_rollup_state WHERE name = ?", _LOCK)
        if row is not None and float(row["summed_until"]) > done:  # another process got here first
            return float(row["summed_until"])
        for rollup in ROLLUPS:
            await tx.execute(rollup.add_sql(dialect), done, end)
        # whole hours, each summed once: distinct counts need no adding up
        await tx.execute(
            f"INSERT INTO usage_users_hourly (hour, users) {raw_users_hourly_sql(dialect)}", done, end
        )
        if row is None:
            await tx.execute("INSERT INTO usage_rollup_state (name, summed_until) VALUES (?, ?)", _LOCK, end)
        else:
            await tx.execute("UPDATE usage_rollup_state SET summed_until = ? WHERE name = ?", end, _LOCK)
    return end
