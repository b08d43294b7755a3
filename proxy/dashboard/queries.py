"""The dashboard's numbers, summed by the database from the rollup tables plus the raw records newer
than the last summed hour (proxy/records/usage_rollups.py), so a year of records answers as fast as a
day. Each page's data is a dict of series (for charts) and named tables (for the page and CSV export).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.records.database import Database, Row
from proxy.records.usage_rollup_tables import (
    DAY,
    HOUR,
    HOURLY,
    MODELS_DAILY,
    USER_VALUES,
    USERS_DAILY,
    Rollup,
    bucket_sql,
    raw_users_hourly_sql,
)

Table = dict[str, Any]
MAX_USERS = 2000
"""Rows of the users table sent at once; a search narrows it."""


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    return {"columns": list(columns), "rows": [list(row) for row in rows]}


@dataclass(frozen=True)
class Span:
    """Whole UTC days [since, until), split at the watermark into summed and raw parts."""

    since: float
    until: float
    summed_until: float

    @classmethod
    def last_days(cls, days: int, now: float, summed_until: float) -> Span:
        today = now // DAY * DAY
        return cls(today - (days - 1) * DAY, now, summed_until)

    def params(self) -> tuple[float, float, float, float]:
        """(summed since, summed until, raw since, raw until)."""
        return (
            self.since,
            min(self.until, self.summed_until),
            max(self.since, self.summed_until),
            self.until,
        )


def _day(value: Any) -> str:
    return datetime.fromtimestamp(float(value), UTC).date().isoformat()


def _hour(value: Any) -> str:
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:00")


def _ints(row: Row, names: Iterable[str]) -> dict[str, int]:
    """Plain ints whatever the driver returned (PostgreSQL sums are NUMERIC)."""
    return {name: int(row[name] or 0) for name in names}


async def grouped(
    database: Database, span: Span, rollup: Rollup, select: str, group: str, where: str = "", *params: Any
) -> list[Row]:
    """``SELECT {select} ... GROUP BY {group}`` over the rollup table and, separately, over the raw
    tail; the caller adds up the rows of a key found in both (the day of the watermark). Two plain
    queries, because a UNION ALL under an aggregate is materialized row by row (SQLite), which took
    seconds on a year of hours."""
    table, key = rollup.table, rollup.time_key
    raw = rollup.raw_sql(database.dialect, where)
    summed_since, summed_until, raw_since, raw_until = span.params()
    queries = []
    if summed_since < summed_until:
        queries.append(
            database.fetch(
                f"SELECT {select} FROM {table} WHERE {key} >= ? AND {key} < ?{where} GROUP BY {group}",
                summed_since,
                summed_until,
                *params,
            )
        )
    if raw_since < raw_until:
        queries.append(
            database.fetch(
                f"SELECT {select} FROM ({raw}) AS tail GROUP BY {group}", raw_since, raw_until, *params
            )
        )
    return [row for rows in await asyncio.gather(*queries) for row in rows]


async def distinct_users(database: Database, span: Span) -> tuple[int, dict[float, int]]:
    """Users over the span and per day, each counted once however many clusters and models they
    used. Whole summed days are counted by the database; the day the sums end in and the raw tail
    are few users, merged here as sets."""
    summed_since, summed_until, raw_since, raw_until = span.params()
    partial_day = max(summed_since, summed_until // DAY * DAY)
    per_day: dict[float, int] = {}
    pairs: set[tuple[float, str]] = set()
    named = "username IS NOT NULL AND username <> ''"
    if summed_since < partial_day:
        rows = await database.fetch(
            "SELECT day, COUNT(DISTINCT username) AS users FROM usage_users_daily"
            f" WHERE day >= ? AND day < ? AND {named} GROUP BY day",
            summed_since,
            partial_day,
        )
        per_day.update((float(row["day"]), int(row["users"])) for row in rows)
    if partial_day < summed_until:
        rows = await database.fetch(
            f"SELECT DISTINCT day, username FROM usage_users_daily WHERE day >= ? AND day < ? AND {named}",
            partial_day,
            summed_until,
        )
        pairs.update((float(row["day"]), row["username"]) for row in rows)
    if raw_since < raw_until:
        rows = await database.fetch(
            f"SELECT DISTINCT {bucket_sql('started_at', DAY, database.dialect)} AS day, username"
            f" FROM requests WHERE started_at >= ? AND started_at < ? AND {named}",
            raw_since,
            raw_until,
        )
        pairs.update((float(row["day"]), row["username"]) for row in rows)
    for day, _ in pairs:
        per_day[day] = per_day.get(day, 0) + 1
    everyone = {username for _, username in pairs}
    if summed_since < summed_until:
        rows = await database.fetch(
            f"SELECT DISTINCT username FROM usage_users_daily WHERE day >= ? AND day < ? AND {named}",
            summed_since,
            summed_until,
        )
        everyone.update(row["username"] for row in rows)
    return len(everyone), per_day


def sums_sql(names: Iterable[str]) -> str:
    return ", ".join(f"SUM({name}) AS {name}" for name in names)


COUNT_NAMES = USER_VALUES  # requests, client_errors, server_errors, prompt/completion/total tokens


async def overview(database: Database, span: Span, hours: int = 48) -> dict[str, Any]:
    """Totals; per day and per hour (the last ``hours``); by cluster and by model. The three parts
    run at once: PostgreSQL answers them on three connections of the pool (SQLite in turn)."""
    rows, (distinct, users_per_day), hourly = await asyncio.gather(
        grouped(database, span, MODELS_DAILY, f"day, cluster, model, {sums_sql(COUNT_NAMES)}", "1, 2, 3"),
        distinct_users(database, span),
        _per_hour(database, span, hours),
    )
    per_day: dict[float, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    by_cluster: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    by_model: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    totals = dict.fromkeys(COUNT_NAMES, 0)
    for row in rows:
        counts = _ints(row, COUNT_NAMES)
        for target in (
            per_day[float(row["day"])],
            by_cluster[row["cluster"]],
            by_model[(row["cluster"], row["model"])],
            totals,
        ):
            for name, count in counts.items():
                target[name] += count
    days = _steps(span.since, span.until, DAY)
    day_columns = ("day", "requests", "users", *COUNT_NAMES[1:])
    return {
        "totals": {**totals, "users": distinct},
        "tables": {
            "per_day": table(
                day_columns,
                (
                    [
                        _day(d),
                        per_day[d]["requests"],
                        users_per_day.get(d, 0),
                        *(per_day[d][n] for n in COUNT_NAMES[1:]),
                    ]
                    for d in days
                ),
            ),
            "per_hour": hourly,
            "by_cluster": _count_table(("cluster",), ((k,) for k in by_cluster), by_cluster.values()),
            "by_model": _count_table(("cluster", "model"), by_model, by_model.values()),
        },
    }


def _count_table(
    key_columns: Sequence[str], keys: Iterable[Sequence[str]], counts: Iterable[Mapping[str, int]]
) -> Table:
    """Most tokens first, then most requests."""
    pairs = sorted(
        zip(keys, counts, strict=True), key=lambda pair: (-pair[1]["total_tokens"], -pair[1]["requests"])
    )
    rows = [[*(k or "(none)" for k in key), *(c[n] for n in COUNT_NAMES)] for key, c in pairs]
    return table((*key_columns, *COUNT_NAMES), rows)


async def _per_hour(database: Database, span: Span, hours: int) -> Table:
    since = max(span.since, span.until // HOUR * HOUR - (hours - 1) * HOUR)
    recent = Span(since, span.until, span.summed_until)
    counts: dict[float, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    for row in await grouped(database, recent, HOURLY, f"hour, {sums_sql(COUNT_NAMES)}", "hour"):
        for name, count in _ints(row, COUNT_NAMES).items():
            counts[float(row["hour"])][name] += count
    summed_since, summed_until, raw_since, raw_until = recent.params()
    rows = []
    if summed_since < summed_until:
        rows += await database.fetch(
            "SELECT hour, users FROM usage_users_hourly WHERE hour >= ? AND hour < ?",
            summed_since,
            summed_until,
        )
    if raw_since < raw_until:
        rows += await database.fetch(raw_users_hourly_sql(database.dialect), raw_since, raw_until)
    users = {float(row["hour"]): int(row["users"]) for row in rows}
    return table(
        ("hour", "requests", "users", *COUNT_NAMES[1:]),
        (
            [
                _hour(hour),
                counts[hour]["requests"],
                users.get(hour, 0),
                *(counts[hour][n] for n in COUNT_NAMES[1:]),
            ]
            for hour in _steps(since, span.until, HOUR)
        ),
    )


def _steps(since: float, until: float, step: int) -> list[float]:
    """Every day or hour of the span, so charts and tables show the quiet ones as zeros."""
    first = since // step * step
    return [first + index * step for index in range(int((until - first - 1) // step) + 1)]


async def users(database: Database, span: Span, search: str = "") -> dict[str, Any]:
    """Every user's totals over the span, most tokens first; ``search`` matches part of a username."""
    where, params = "", []
    if search:
        where = " AND LOWER(username) LIKE ?"
        params.append(f"%{search.lower().replace('%', '').replace('_', '')}%")
    rows = await grouped(
        database,
        span,
        USERS_DAILY,
        f"username, {sums_sql(COUNT_NAMES)}, MAX(day) AS last_day",
        "username",
        f" AND username <> ''{where}",
        *params,
    )
    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    last: dict[str, float] = {}
    for row in rows:
        name = row["username"]
        for key, count in _ints(row, COUNT_NAMES).items():
            totals[name][key] += count
        last[name] = max(last.get(name, 0.0), float(row["last_day"]))
    ranked = sorted(totals, key=lambda name: (-totals[name]["total_tokens"], name))
    return {
        "truncated": len(ranked) > MAX_USERS,
        "tables": {
            "users": table(
                ("username", *COUNT_NAMES, "last_day"),
                ([name, *totals[name].values(), _day(last[name])] for name in ranked[:MAX_USERS]),
            )
        },
    }


async def user_history(database: Database, span: Span, username: str) -> dict[str, Any]:
    """One user's requests and tokens per day, and by model."""
    rows = await grouped(
        database,
        span,
        USERS_DAILY,
        f"day, cluster, model, {sums_sql(COUNT_NAMES)}",
        "day, cluster, model",
        " AND username = ?",
        username,
    )
    per_day: dict[float, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    by_model: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNT_NAMES, 0))
    for row in rows:
        for target in (per_day[float(row["day"])], by_model[(row["cluster"], row["model"])]):
            for name, count in _ints(row, COUNT_NAMES).items():
                target[name] += count
    return {
        "username": username,
        "tables": {
            "per_day": table(
                ("day", *COUNT_NAMES),
                ([_day(d), *per_day[d].values()] for d in _steps(span.since, span.until, DAY)),
            ),
            "by_model": _count_table(("cluster", "model"), by_model, by_model.values()),
        },
    }
