"""On-demand deployments in the durable store (docs/on-demand.md): one row per replica (a pilot
job), each process's load and demand per deployment, each deployment's start back-off, and the
controller's lease.

The database is what lets the controller restart, or move to another process or host, without
losing the jobs it started: a new leader reads the live replicas here and goes on managing them.
A replica's token is kept only as its SHA-256. Exactly one process reconciles at a time: the one
holding the `controller` lease (taken by a conditional update, renewed while it runs, lost when it
lapses), as the OpenAI batch runner leases batches.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, fields
from typing import Any, Final

from proxy.records.database import Database, Migration

DEPLOYMENTS_MIGRATIONS: Final[list[Migration]] = [
    (
        8,
        "deployments",
        [
            """CREATE TABLE deployment_replicas (
                replica_id TEXT PRIMARY KEY,
                deployment TEXT NOT NULL,
                cluster TEXT NOT NULL,
                scheduler TEXT NOT NULL,
                job_id TEXT,
                phase TEXT NOT NULL,
                token_hash TEXT NOT NULL,
                address TEXT,
                port INTEGER,
                walltime_end DOUBLE PRECISION,
                created DOUBLE PRECISION NOT NULL,
                registered DOUBLE PRECISION,
                last_heartbeat DOUBLE PRECISION,
                ready_at DOUBLE PRECISION,
                ended DOUBLE PRECISION,
                end_reason TEXT,
                stop_requested INTEGER NOT NULL,
                in_flight INTEGER NOT NULL,
                estimated_start DOUBLE PRECISION,
                detail TEXT NOT NULL
            )""",
            "CREATE INDEX deployment_replicas_live ON deployment_replicas (ended, deployment)",
            "CREATE UNIQUE INDEX deployment_replicas_token ON deployment_replicas (token_hash)",
            """CREATE TABLE deployment_usage (
                deployment TEXT NOT NULL,
                process TEXT NOT NULL,
                in_flight INTEGER NOT NULL,
                last_used DOUBLE PRECISION,
                wanted DOUBLE PRECISION,
                reported DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (deployment, process)
            )""",
            """CREATE TABLE deployment_backoff (
                deployment TEXT PRIMARY KEY,
                failures INTEGER NOT NULL,
                retry_at DOUBLE PRECISION NOT NULL,
                detail TEXT NOT NULL
            )""",
            """CREATE TABLE deployment_leases (
                name TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                until DOUBLE PRECISION NOT NULL
            )""",
        ],
    ),
]
"""The deployment tables' part of ``proxy.records.schema.MIGRATIONS``: append only."""

LIVE_PHASES: Final = ("queued", "starting", "loading", "ready")


@dataclass
class ReplicaRecord:
    replica_id: str
    deployment: str
    cluster: str
    scheduler: str
    job_id: str | None
    phase: str
    token_hash: str
    created: float
    address: str | None = None
    port: int | None = None
    walltime_end: float | None = None
    registered: float | None = None
    last_heartbeat: float | None = None
    ready_at: float | None = None
    ended: float | None = None
    end_reason: str | None = None
    stop_requested: int = 0
    in_flight: int = 0
    estimated_start: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Usage:
    """One deployment's load and demand summed over the processes that reported recently."""

    in_flight: int = 0
    last_used: float | None = None
    wanted: float | None = None


@dataclass(frozen=True)
class Backoff:
    failures: int
    retry_at: float
    detail: str


_COLUMNS: Final = tuple(field.name for field in fields(ReplicaRecord))
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM deployment_replicas"
_INSERT: Final = (
    f"INSERT INTO deployment_replicas ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_CONTROLLER_LEASE: Final = "controller"


class DeploymentStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, replica: ReplicaRecord) -> None:
        await self._db.execute(_INSERT, *astuple(replica))

    async def live(self) -> list[ReplicaRecord]:
        """Every replica not yet ended, oldest first."""
        rows = await self._db.fetch(f"{_SELECT} WHERE ended IS NULL ORDER BY created")
        return [ReplicaRecord(**row) for row in rows]

    async def get(self, replica_id: str) -> ReplicaRecord | None:
        row = await self._db.fetchone(f"{_SELECT} WHERE replica_id = ?", replica_id)
        return None if row is None else ReplicaRecord(**row)

    async def by_token_hash(self, token_hash: str) -> ReplicaRecord | None:
        row = await self._db.fetchone(f"{_SELECT} WHERE token_hash = ?", token_hash)
        return None if row is None else ReplicaRecord(**row)

    async def update(self, replica_id: str, *, only_live: bool = True, **columns: Any) -> bool:
        """Change columns of a replica; with `only_live`, an ended replica stays as it ended."""
        assignments = ", ".join(f"{name} = ?" for name in columns)
        condition = " AND ended IS NULL" if only_live else ""
        changed = await self._db.execute(
            f"UPDATE deployment_replicas SET {assignments} WHERE replica_id = ?{condition}",
            *columns.values(),
            replica_id,
        )
        return changed > 0

    async def end(self, replica_id: str, reason: str, now: float) -> bool:
        return await self.update(
            replica_id, phase="ended", ended=now, end_reason=reason[:500], stop_requested=1
        )

    async def start_durations(self, count: int = 5) -> dict[str, list[float]]:
        """Seconds from submission to ready of each deployment's latest `count` replicas that got
        ready, newest first."""
        rows = await self._db.fetch(
            "SELECT deployment, ready_at - created AS duration FROM deployment_replicas "
            "WHERE ready_at IS NOT NULL ORDER BY created DESC LIMIT 500"
        )
        durations: dict[str, list[float]] = {}
        for row in rows:
            kept = durations.setdefault(row["deployment"], [])
            if len(kept) < count:
                kept.append(float(row["duration"]))
        return durations

    async def report_usage(
        self, process: str, deployment: str, in_flight: int, last_used: float | None, wanted: float | None
    ) -> None:
        now = time.time()
        changed = await self._db.execute(
            "UPDATE deployment_usage SET in_flight = ?, last_used = ?, wanted = ?, reported = ? "
            "WHERE deployment = ? AND process = ?",
            in_flight,
            last_used,
            wanted,
            now,
            deployment,
            process,
        )
        if not changed:
            await self._db.execute(
                "INSERT INTO deployment_usage (deployment, process, in_flight, last_used, wanted, reported) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                deployment,
                process,
                in_flight,
                last_used,
                wanted,
                now,
            )

    async def usage(self, since: float) -> dict[str, Usage]:
        """Load and demand per deployment; a process that stopped reporting before `since` counts
        for its last use and demand, not for requests in flight (it may have died with them)."""
        rows = await self._db.fetch(
            "SELECT deployment, SUM(CASE WHEN reported >= ? THEN in_flight ELSE 0 END) AS in_flight, "
            "MAX(last_used) AS last_used, MAX(wanted) AS wanted FROM deployment_usage GROUP BY deployment",
            since,
        )
        return {
            row["deployment"]: Usage(int(row["in_flight"] or 0), row["last_used"], row["wanted"])
            for row in rows
        }

    async def prune(self, before: float) -> None:
        """Forget processes that stopped reporting, and replicas that ended, before `before`."""
        await self._db.execute("DELETE FROM deployment_usage WHERE reported < ?", before)
        await self._db.execute("DELETE FROM deployment_replicas WHERE ended < ?", before)

    async def backoffs(self) -> dict[str, Backoff]:
        rows = await self._db.fetch("SELECT deployment, failures, retry_at, detail FROM deployment_backoff")
        return {
            row["deployment"]: Backoff(int(row["failures"]), row["retry_at"], row["detail"]) for row in rows
        }

    async def set_backoff(self, deployment: str, backoff: Backoff | None) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM deployment_backoff WHERE deployment = ?", deployment)
            if backoff is not None:
                await tx.execute(
                    "INSERT INTO deployment_backoff (deployment, failures, retry_at, detail) "
                    "VALUES (?, ?, ?, ?)",
                    deployment,
                    backoff.failures,
                    backoff.retry_at,
                    backoff.detail[:500],
                )

    async def lease(self, owner: str, until: float, now: float) -> bool:
        """Take or renew the controller's lease; True while `owner` holds it."""
        changed = await self._db.execute(
            "UPDATE deployment_leases SET owner = ?, until = ? WHERE name = ? AND (until < ? OR owner = ?)",
            owner,
            until,
            _CONTROLLER_LEASE,
            now,
            owner,
        )
        if changed:
            return True
        inserted = await self._db.execute(
            "INSERT INTO deployment_leases (name, owner, until) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            _CONTROLLER_LEASE,
            owner,
            until,
        )
        return inserted > 0

    async def release(self, owner: str) -> None:
        await self._db.execute(
            "DELETE FROM deployment_leases WHERE name = ? AND owner = ?", _CONTROLLER_LEASE, owner
        )
