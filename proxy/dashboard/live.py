"""The live page: what is in flight now (the gateway's own gauges, summed over its worker processes)
and the last minutes of request records per endpoint; and the batches page."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Final

from proxy.dashboard.queries import Table, table
from proxy.metrics.prometheus import Metrics
from proxy.records.database import Database, Row

RECENT_SECONDS: Final = 900
_GAUGES: Final = {
    "gateway_requests_in_flight": "requests",
    "gateway_streams_in_flight": "streams",
    "gateway_compute_tasks_in_flight": "compute_tasks",
}


def in_flight(metrics: Metrics) -> tuple[dict[str, int], list[list[Any]]]:
    """Totals of the in-flight gauges, and requests in flight per route (the dashboard's own are not
    counted: its routes are quiet)."""
    totals = dict.fromkeys(_GAUGES.values(), 0)
    routes: list[list[Any]] = []
    for family in metrics.tallies.collect():
        key = _GAUGES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            route, value = sample.labels.get("route", ""), int(sample.value)
            totals[key] += value
            if key == "requests" and value > 0:
                routes.append([route, value])
    routes.sort(key=lambda row: -row[1])
    return totals, routes


async def live(database: Database, metrics: Metrics) -> dict[str, Any]:
    totals, routes = in_flight(metrics)
    now = time.time()
    return {
        "totals": totals,
        "metrics_enabled": metrics.enabled,
        "tables": {
            "in_flight": table(("route", "requests"), routes),
            "recent": await recent_by_endpoint(database, now - RECENT_SECONDS, now + 1),
        },
    }


async def recent_by_endpoint(database: Database, since: float, until: float) -> Table:
    """The last minutes per endpoint, read raw (a few thousand rows at most)."""
    rows = await database.fetch(
        "SELECT COALESCE(cluster, '') AS cluster, COALESCE(framework, '') AS framework,"
        " COALESCE(model, '') AS model, COUNT(*) AS requests,"
        " SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END) AS server_errors,"
        " SUM(CASE WHEN stream = 1 THEN 1 ELSE 0 END) AS streams,"
        " AVG(duration_ms) AS mean_ms, MAX(started_at) AS last_at"
        " FROM requests WHERE started_at >= ? AND started_at < ? AND model IS NOT NULL"
        " GROUP BY 1, 2, 3 ORDER BY 4 DESC",
        since,
        until,
    )
    return table(
        ("cluster", "framework", "model", "requests", "server_errors", "streams", "mean_ms", "last_request"),
        (
            [
                row["cluster"],
                row["framework"],
                row["model"],
                int(row["requests"]),
                int(row["server_errors"]),
                int(row["streams"]),
                round(float(row["mean_ms"]), 1),
                datetime.fromtimestamp(float(row["last_at"]), UTC).strftime("%H:%M:%S"),
            ]
            for row in rows
        ),
    )


BATCH_COLUMNS = (
    "id",
    "username",
    "cluster",
    "model",
    "status",
    "created",
    "started",
    "finished",
    "lines_processed",
    "num_responses",
    "total_tokens",
    "error",
)


async def batches(database: Database, limit: int = 200) -> dict[str, Any]:
    """Batches by status, and the latest with their progress (from the batch function's summary)."""
    counts = await database.fetch("SELECT status, COUNT(*) AS n FROM batches GROUP BY status ORDER BY status")
    rows = await database.fetch(
        "SELECT id, username, cluster, model, status, created_at, in_progress_at, completed_at, failed_at,"
        f" result, error FROM batches ORDER BY created_at DESC LIMIT {int(limit)}"
    )
    return {
        "tables": {
            "by_status": table(("status", "batches"), ([row["status"], int(row["n"])] for row in counts)),
            "batches": table(BATCH_COLUMNS, (_batch_row(row) for row in rows)),
        }
    }


def _batch_row(row: Row) -> list[Any]:
    summary: dict[str, Any] = {}
    if row["result"]:
        try:
            parsed = json.loads(row["result"])
            summary = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            summary = {}

    def when(value: Any) -> str:
        return "" if value is None else datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M")

    return [
        row["id"],
        row["username"],
        row["cluster"],
        row["model"],
        row["status"],
        when(row["created_at"]),
        when(row["in_progress_at"]),
        when(row["completed_at"] or row["failed_at"]),
        summary.get("lines_processed"),
        summary.get("num_responses"),
        summary.get("total_tokens"),
        (row["error"] or "")[:200],
    ]
