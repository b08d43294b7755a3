"""The dashboard's rollup tables (migration 5): what they hold and the SQL that fills them from the
request records; ``proxy.records.usage_rollups`` runs the summing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.records.database import Dialect, Migration

HOUR: Final = 3600
DAY: Final = 86400

LATENCY_BOUNDS_MS: Final = (
    100,
    250,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    4000,
    5000,
    7500,
    10000,
    15000,
    20000,
    30000,
    45000,
    60000,
    120000,
    300000,
)
"""Upper bounds of the histogram buckets (a last bucket holds the rest). Fixed by migration 5."""

_ANSWERED: Final = "status >= 200 AND status < 300"
_TOTAL: Final = "COALESCE(total_tokens, COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0))"


def _buckets(prefix: str, value: str, condition: str) -> list[tuple[str, str]]:
    edges = (None, *LATENCY_BOUNDS_MS, None)
    columns = []
    for index in range(len(LATENCY_BOUNDS_MS) + 1):
        low, high = edges[index], edges[index + 1]
        parts = [condition] + ([f"{value} >= {low}"] if low is not None else [])
        parts += [f"{value} < {high}"] if high is not None else []
        columns.append((f"{prefix}{index}", f"SUM(CASE WHEN {' AND '.join(parts)} THEN 1 ELSE 0 END)"))
    return columns


_COUNTS: Final = [
    ("requests", "COUNT(*)"),
    ("client_errors", "SUM(CASE WHEN status >= 400 AND status < 500 THEN 1 ELSE 0 END)"),
    ("server_errors", "SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END)"),
    ("prompt_tokens", f"SUM(CASE WHEN {_ANSWERED} THEN COALESCE(prompt_tokens, 0) ELSE 0 END)"),
    ("completion_tokens", f"SUM(CASE WHEN {_ANSWERED} THEN COALESCE(completion_tokens, 0) ELSE 0 END)"),
    ("total_tokens", f"SUM(CASE WHEN {_ANSWERED} THEN {_TOTAL} ELSE 0 END)"),
]
"""Tokens are what backends answered, as `usage` counts them (proxy/records/usage_store.py)."""

_GENERATING: Final = f"{_ANSWERED} AND completion_tokens > 0 AND duration_ms > COALESCE(ttfc_ms, 0)"
_HOURLY_EXTRA: Final = [
    ("answered", f"SUM(CASE WHEN {_ANSWERED} THEN 1 ELSE 0 END)"),
    ("streams", f"SUM(CASE WHEN {_ANSWERED} AND stream = 1 THEN 1 ELSE 0 END)"),
    ("generated_tokens", f"SUM(CASE WHEN {_GENERATING} THEN completion_tokens ELSE 0 END)"),
    ("generating_ms", f"SUM(CASE WHEN {_GENERATING} THEN duration_ms - COALESCE(ttfc_ms, 0) ELSE 0 END)"),
    *_buckets("d", "duration_ms", _ANSWERED),
    *_buckets("f", "ttfc_ms", f"{_ANSWERED} AND ttfc_ms IS NOT NULL"),
]
"""Throughput is generated tokens over the time spent generating them (after the first chunk)."""

MODEL_VALUES: Final = tuple(name for name, _ in (*_COUNTS, *_HOURLY_EXTRA))
USER_VALUES: Final = tuple(name for name, _ in _COUNTS)
DURATION_BUCKETS: Final = tuple(name for name in MODEL_VALUES if name[0] == "d" and name[1:].isdigit())
TTFC_BUCKETS: Final = tuple(name for name in MODEL_VALUES if name[0] == "f" and name[1:].isdigit())


@dataclass(frozen=True)
class Rollup:
    table: str
    seconds: int  # HOUR or DAY: the first key
    keys: tuple[str, ...]
    values: tuple[str, ...]

    @property
    def time_key(self) -> str:
        return self.keys[0]

    def raw_sql(self, dialect: Dialect, where: str = "") -> str:
        """This table's columns, summed from the raw records started in [?, ?) (and ``where``)."""
        columns = [f"{bucket_sql('started_at', self.seconds, dialect)} AS {self.time_key}"]
        columns += [f"COALESCE({key}, '') AS {key}" for key in self.keys[1:]]
        expressions = dict((*_COUNTS, *_HOURLY_EXTRA))
        columns += [f"COALESCE({expressions[name]}, 0) AS {name}" for name in self.values]
        return (
            f"SELECT {', '.join(columns)} FROM requests WHERE started_at >= ? AND started_at < ?{where}"
            f" GROUP BY {', '.join(str(i) for i in range(1, len(self.keys) + 1))}"
        )

    def add_sql(self, dialect: Dialect) -> str:
        columns = ", ".join((*self.keys, *self.values))
        added = ", ".join(f"{name} = {self.table}.{name} + excluded.{name}" for name in self.values)
        return (
            f"INSERT INTO {self.table} ({columns}) {self.raw_sql(dialect)}"
            f" ON CONFLICT ({', '.join(self.keys)}) DO UPDATE SET {added}"
        )

    def create_sql(self) -> str:
        columns = [f"{self.time_key} DOUBLE PRECISION NOT NULL"]
        columns += [f"{key} TEXT NOT NULL" for key in self.keys[1:]]
        columns += [
            f"{value} {'DOUBLE PRECISION' if value == 'generating_ms' else 'BIGINT'} NOT NULL"
            for value in self.values
        ]
        return f"CREATE TABLE {self.table} ({', '.join(columns)}, PRIMARY KEY ({', '.join(self.keys)}))"


HOURLY: Final = Rollup("usage_hourly", HOUR, ("hour", "cluster", "model"), MODEL_VALUES)
MODELS_DAILY: Final = Rollup("usage_models_daily", DAY, ("day", "cluster", "model"), MODEL_VALUES)
USERS_DAILY: Final = Rollup("usage_users_daily", DAY, ("day", "username", "cluster", "model"), USER_VALUES)
ROLLUPS: Final = (HOURLY, MODELS_DAILY, USERS_DAILY)


ROLLUPS_MIGRATIONS: Final[list[Migration]] = [
    (
        5,
        "usage_rollups",
        [
            *(rollup.create_sql() for rollup in ROLLUPS),
            "CREATE INDEX usage_users_daily_username ON usage_users_daily (username, day)",
            "CREATE TABLE usage_users_hourly (hour DOUBLE PRECISION PRIMARY KEY, users BIGINT NOT NULL)",
            "CREATE TABLE usage_rollup_state (name TEXT PRIMARY KEY, summed_until DOUBLE PRECISION NOT NULL)",
        ],
    ),
]
"""The rollup tables' part of ``proxy.records.schema.MIGRATIONS``: append only."""


def bucket_sql(column: str, seconds: int, dialect: Dialect) -> str:
    """The start of the UTC hour or day: SQLite's CAST truncates (times are positive), PostgreSQL's
    would round, so it takes FLOOR."""
    if dialect == "postgresql":
        return f"FLOOR({column} / {seconds}) * {seconds}"
    return f"CAST({column} / {seconds} AS INTEGER) * {seconds}"


def raw_users_hourly_sql(dialect: Dialect) -> str:
    """Distinct users per hour of the raw records started in [?, ?)."""
    return (
        f"SELECT {bucket_sql('started_at', HOUR, dialect)} AS hour, COUNT(DISTINCT username) AS users"
        " FROM requests WHERE started_at >= ? AND started_at < ? AND username IS NOT NULL AND username <> ''"
        " GROUP BY 1"
    )
