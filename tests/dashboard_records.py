"""Request records and batches a dashboard test inserts, and the numbers the dashboard must then show."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from proxy.records.batch_store import BatchRecord, BatchStore
from proxy.records.database import Database
from proxy.records.record import RequestRecord
from proxy.records.usage_store import UsageStore
from tests.support import CHAT_MODEL, EMBED_MODEL

HOUR = 3600.0


def record(
    number: int,
    started_at: float,
    username: str | None,
    *,
    status: int = 200,
    model: str | None = CHAT_MODEL,
    tokens: tuple[int, int] | None = (10, 20),
    duration_ms: float = 1200.0,
    ttfc_ms: float | None = None,
) -> RequestRecord:
    prompt, completion = tokens if tokens is not None else (None, None)
    return RequestRecord(
        request_id=f"dash-{number}",
        started_at=started_at,
        duration_ms=duration_ms,
        ttfc_ms=ttfc_ms,
        method="POST",
        route="/resource_server/{cluster}/{framework}/v1/{openai_path}",
        path="/resource_server/local/vllm/v1/chat/completions",
        status=status,
        user_id=None if username is None else f"id-{username}",
        username=username,
        cluster=None if model is None else "local",
        framework=None if model is None else "vllm",
        model=model,
        endpoint_slug=None,
        stream=ttfc_ms is not None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=None if prompt is None or completion is None else prompt + completion,
        task_id=None,
        client_ip="127.0.0.1",
        error=None if status < 400 else "failed",
    )


@dataclass(frozen=True)
class Expected:
    requests: int
    users: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    client_errors: int
    server_errors: int
    per_user_tokens: dict[str, int]
    per_user_requests: dict[str, int]


def records(now: float) -> tuple[list[RequestRecord], Expected]:
    """Two days ago (summed into the rollups) and the last minutes (read raw), across two users."""
    old, recent = now - 2 * 24 * HOUR, now - 600
    rows = [
        record(1, old, "alice@uni.edu", duration_ms=800, ttfc_ms=200),
        record(2, old + 60, "alice@uni.edu", duration_ms=1600),
        record(3, recent, "alice@uni.edu", duration_ms=2500, ttfc_ms=400),
        record(4, old, "bob@other.org", model=EMBED_MODEL, tokens=(5, 7), duration_ms=90),
        record(5, recent, "bob@other.org", model=EMBED_MODEL, tokens=(5, 7), duration_ms=110),
        record(6, recent + 1, "bob@other.org", status=500, tokens=None, duration_ms=3000),
        record(7, recent + 2, None, status=401, model=None, tokens=None, duration_ms=1),
        record(8, now - 40 * 24 * HOUR, "carol@uni.edu"),  # outside a 7-day period
    ]
    return rows, Expected(
        requests=7,
        users=2,
        prompt_tokens=40,
        completion_tokens=74,
        total_tokens=114,
        client_errors=1,
        server_errors=1,
        per_user_tokens={"alice@uni.edu": 90, "bob@other.org": 24},
        per_user_requests={"alice@uni.edu": 3, "bob@other.org": 3},
    )


async def insert(database: Database, rows: list[RequestRecord]) -> None:
    await UsageStore(database).add_many(rows)


def batch(
    batch_id: str, username: str, status: str, now: float, result: dict[str, Any] | None = None
) -> BatchRecord:
    return BatchRecord(
        id=batch_id,
        user_id=f"id-{username}",
        username=username,
        cluster="local",
        framework="vllm",
        model=CHAT_MODEL,
        endpoint_slug="local-vllm-x",
        input_file=f"/data/{batch_id}.jsonl",
        output_folder_path=None,
        task_ids="t1",
        status=status,
        result=None if result is None else json.dumps(result),
        error=None,
        created_at=now - 300,
        in_progress_at=now - 200 if status != "pending" else None,
        completed_at=now - 100 if status == "completed" else None,
        failed_at=None,
        updated_at=now,
    )


async def insert_batches(database: Database, now: float | None = None) -> None:
    now = time.time() if now is None else now
    store = BatchStore(database)
    summary = {"lines_processed": 120, "num_responses": 118, "total_tokens": 45000}
    for record_ in (
        batch("batch-a", "alice@uni.edu", "completed", now, summary),
        batch("batch-b", "bob@other.org", "running", now),
    ):
        assert await store.reserve(record_, max_active_per_user=10) == "added"
