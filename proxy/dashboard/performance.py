"""Latency percentiles, time to first token and tokens per second by model and by cluster, from the
histograms summed in the rollup tables (proxy/records/usage_rollup_tables.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.dashboard.queries import Span, grouped, sums_sql, table
from proxy.records.database import Database
from proxy.records.usage_rollup_tables import (
    DURATION_BUCKETS,
    LATENCY_BOUNDS_MS,
    MODEL_VALUES,
    MODELS_DAILY,
    TTFC_BUCKETS,
)


def percentile(buckets: Sequence[int], fraction: float) -> float | None:
    """The value below which ``fraction`` of the histogram lies, interpolated linearly inside its bucket
    (so accurate to within a bucket's width); the last bucket has no upper bound and reports its lower."""
    count = sum(buckets)
    if count == 0:
        return None
    wanted, seen = fraction * count, 0
    for index, in_bucket in enumerate(buckets):
        if in_bucket and seen + in_bucket >= wanted:
            low = 0 if index == 0 else LATENCY_BOUNDS_MS[index - 1]
            if index == len(LATENCY_BOUNDS_MS):
                return float(low)
            return low + (LATENCY_BOUNDS_MS[index] - low) * (wanted - seen) / in_bucket
        seen += in_bucket
    return float(LATENCY_BOUNDS_MS[-1])


PERFORMANCE_COLUMNS = (
    "requests",
    "answered",
    "errors",
    "error_rate",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "ttfc_p50_ms",
    "ttfc_p95_ms",
    "tokens_per_second",
    "prompt_tokens",
    "completion_tokens",
)


def _performance(sums: Mapping[str, float]) -> list[Any]:
    durations = [int(sums[name]) for name in DURATION_BUCKETS]
    ttfc = [int(sums[name]) for name in TTFC_BUCKETS]
    requests = int(sums["requests"])
    errors = int(sums["client_errors"] + sums["server_errors"])
    rate = sums["generated_tokens"] * 1000 / sums["generating_ms"] if sums["generating_ms"] else None
    rounded = [
        percentile(durations, 0.5),
        percentile(durations, 0.95),
        percentile(durations, 0.99),
        percentile(ttfc, 0.5),
        percentile(ttfc, 0.95),
        rate,
    ]
    return [
        requests,
        int(sums["answered"]),
        errors,
        round(errors / requests, 4) if requests else 0,
        *(None if value is None else round(value, 1) for value in rounded),
        int(sums["prompt_tokens"]),
        int(sums["completion_tokens"]),
    ]


async def performance(database: Database, span: Span) -> dict[str, Any]:
    """Latency percentiles, time to first token and tokens per second by model and by cluster."""
    rows = await grouped(
        database, span, MODELS_DAILY, f"cluster, model, {sums_sql(MODEL_VALUES)}", "cluster, model"
    )
    by_model: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(MODEL_VALUES, 0.0))
    by_cluster: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(MODEL_VALUES, 0.0))
    for row in rows:
        if not row["model"]:
            continue  # refused before a model was known (no token, a bad body): no latency to show
        for name in MODEL_VALUES:
            value = float(row[name] or 0)
            by_model[(row["cluster"], row["model"])][name] += value
            by_cluster[row["cluster"]][name] += value
    models = [
        [cluster or "(none)", model, *_performance(sums)] for (cluster, model), sums in by_model.items()
    ]
    models.sort(key=lambda row: -row[2])
    clusters = sorted(([c or "(none)", *_performance(s)] for c, s in by_cluster.items()), key=lambda r: -r[1])
    return {
        "tables": {
            "by_model": table(("cluster", "model", *PERFORMANCE_COLUMNS), models),
            "by_cluster": table(("cluster", *PERFORMANCE_COLUMNS), clusters),
        }
    }
