"""The dashboard's numbers on SQLite and PostgreSQL: the same whether the records are summed into
the rollup tables or still raw, equal to what the test inserted, summed once however often the
rollup runs; and its session cookies and settings."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from adaptors.cluster import GetJobsResponse
from proxy.dashboard import clusters, live, performance, queries
from proxy.dashboard.session import Cookies, Signer
from proxy.records import schema, usage_rollups
from proxy.records.database import Database, DatabaseTimeout
from proxy.records.usage_rollups import roll_up, summed_until
from proxy.settings import load_settings
from proxy.settings.dashboard import DashboardSettings
from proxy.settings.files import ConfigError
from tests.dashboard_records import HOUR, insert, insert_batches, records
from tests.support import write_gateway_config


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = await schema.connect(database_url)
    yield db
    await db.close()


async def pages(database: Database, span: queries.Span) -> list[object]:
    return [
        await queries.overview(database, span),
        await queries.users(database, span),
        await queries.users(database, span, "ALI"),
        await queries.user_history(database, span, "alice@uni.edu"),
        await performance.performance(database, span),
    ]


async def test_summed_and_raw_records_give_the_same_pages(database: Database) -> None:
    now = time.time()
    rows, expected = records(now)
    await insert(database, rows)
    raw = await pages(database, queries.Span.last_days(7, now, summed_until=0))
    watermark = await roll_up(database, delay=HOUR, now=now)
    assert watermark == (now - HOUR) // HOUR * HOUR
    assert await roll_up(database, delay=HOUR, now=now) == watermark  # nothing summed twice
    summed = await pages(database, queries.Span.last_days(7, now, watermark))
    assert summed == raw

    overview = summed[0]
    assert isinstance(overview, dict)
    totals = overview["totals"]
    for key in ("requests", "users", "prompt_tokens", "completion_tokens", "total_tokens"):
        assert totals[key] == getattr(expected, key), key
    assert (totals["client_errors"], totals["server_errors"]) == (
        expected.client_errors,
        expected.server_errors,
    )
    per_day = overview["tables"]["per_day"]
    assert len(per_day["rows"]) == 7
    assert sum(row[1] for row in per_day["rows"]) == expected.requests

    users = summed[1]
    assert isinstance(users, dict)
    table = users["tables"]["users"]
    shown = {row[0]: row[table["columns"].index("total_tokens")] for row in table["rows"]}
    assert shown == expected.per_user_tokens
    searched = summed[2]
    assert isinstance(searched, dict)
    assert [row[0] for row in searched["tables"]["users"]["rows"]] == ["alice@uni.edu"]

    models = summed[4]
    assert isinstance(models, dict)
    by_model = models["tables"]["by_model"]
    chat = next(row for row in by_model["rows"] if row[1].startswith("meta-llama"))
    column = by_model["columns"].index
    assert chat[column("requests")] == 4 and chat[column("answered")] == 3 and chat[column("errors")] == 1
    # latencies 800, 1600 and 2500 ms: the median lies in the 1500-2000 ms bucket
    assert 1500 <= chat[column("p50_ms")] <= 2000
    assert chat[column("ttfc_p50_ms")] is not None


async def test_a_year_span_and_the_batches(database: Database) -> None:
    now = time.time()
    rows, _ = records(now)
    await insert(database, rows)
    await insert_batches(database, now)
    await roll_up(database, delay=HOUR, now=now)
    year = await queries.users(database, queries.Span.last_days(365, now, await summed_until(database)))
    assert {row[0] for row in year["tables"]["users"]["rows"]} == {
        "alice@uni.edu",
        "bob@other.org",
        "carol@uni.edu",
    }
    batches = await live.batches(database)
    assert dict(map(tuple, batches["tables"]["by_status"]["rows"])) == {"completed": 1, "running": 1}


async def test_a_day_too_busy_to_sum_at_once_is_summed_in_smaller_parts(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    rows, _ = records(now)
    await insert(database, rows)
    raw = await pages(database, queries.Span.last_days(7, now, summed_until=0))
    whole = usage_rollups._sum
    refused: list[float] = []
    summed: list[float] = []

    async def slow_beyond_six_hours(db: Database, done: float, end: float) -> float:
        if end - done > 6 * HOUR:
            refused.append(end - done)
            raise DatabaseTimeout("statement timeout")
        summed.append(end - done)
        return await whole(db, done, end)

    monkeypatch.setattr(usage_rollups, "_sum", slow_beyond_six_hours)
    watermark = await roll_up(database, delay=HOUR, now=now)
    assert refused and max(summed) <= 6 * HOUR
    assert all(span % HOUR == 0 for span in summed), "whole hours: each hour summed once, all of it"
    assert await pages(database, queries.Span.last_days(7, now, watermark)) == raw


def test_the_clusters_job_reports_become_rows() -> None:
    job = {
        "Models": "m/A,m/B",
        "Framework": "vllm",
        "Cluster": "c1",
        "Job ID": "42",
        "Model Status": "running",
    }
    report = GetJobsResponse.model_validate(
        {"jobs": {"running": [job], "queued": [{**job, "Models": "m/B"}], "private-batch-queued": [job]}}
    )
    down = GetJobsResponse(error_message="qstat failed", error_code=502)
    found = {"c1": report, "c2": down, "c3": None}
    jobs = clusters.model_jobs(found)
    assert jobs["rows"] == [
        ["c1", "vllm", "m/A", 1, 0, ""],
        ["c1", "vllm", "m/B", 1, 1, ""],
        ["c2", "", "", None, None, "qstat failed"],
        ["c3", "", "", None, None, "no answer"],
    ]
    assert clusters.private_batches(found)["rows"] == [["c1", "queued", "42", "vllm", "m/A,m/B", "running"]]


def test_percentiles_interpolate_within_a_bucket() -> None:
    buckets = [0] * 20
    buckets[1] = 10  # 100-250 ms
    assert performance.percentile(buckets, 0.5) == pytest.approx(175)
    assert performance.percentile([0] * 20, 0.5) is None
    buckets[-1] = 90  # over 300 s: reported as its lower bound
    assert performance.percentile(buckets, 0.99) == 300000


def test_signed_values_refuse_tampering_other_purposes_and_age() -> None:
    signer = Signer("a-secret-of-at-least-32-characters!!")
    value = signer.sign("session", {"u": "dana", "exp": time.time() + 60})
    assert signer.unsign("session", value) is not None
    assert signer.unsign("login", value) is None
    body, mac = value.split(".")
    assert signer.unsign("session", f"{body}x.{mac}") is None
    assert Signer("another-secret-of-at-least-32-chars!!").unsign("session", value) is None
    assert signer.unsign("session", value, now=time.time() + 120) is None
    assert signer.unsign("session", "é.é") is None


def test_session_cookies_are_secure_behind_tls_and_only_believe_trusted_proxies() -> None:
    settings = DashboardSettings(enabled=True, admin_groups=["g"], session_secret="s" * 32)
    cookies = Cookies(settings, ["127.0.0.1/32"])

    def secure(peer: str, headers: dict[str, str]) -> bool:
        request = make_mocked_request("GET", "/dashboard/", headers=headers)
        request = request.clone(remote=peer)
        response = web.Response()
        cookies.start_session(request, response, "dana@uni.edu", "Dana")
        morsel = response.cookies["gateway_dashboard"]
        assert morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/dashboard"
        return bool(morsel["secure"])

    assert secure("127.0.0.1", {"X-Forwarded-Proto": "https"})
    assert not secure("127.0.0.1", {})
    assert not secure("203.0.113.9", {"X-Forwarded-Proto": "https"}), "only nginx's word is believed"


def test_an_enabled_dashboard_needs_admin_groups_and_a_long_secret(tmp_path: Path) -> None:
    path = write_gateway_config(tmp_path, "http://127.0.0.1:9")
    document = yaml.safe_load(path.read_text())
    for dashboard, problem in (
        ({"enabled": True, "session_secret": "x" * 40}, "admin_groups"),
        ({"enabled": True, "admin_groups": ["g"], "session_secret": "short"}, "session_secret"),
    ):
        path.write_text(yaml.safe_dump({**document, "dashboard": dashboard}))
        with pytest.raises(ConfigError, match=problem):
            load_settings(path)
    path.write_text(yaml.safe_dump({**document, "dashboard": {"admin_groups": []}}))
    assert load_settings(path).dashboard.enabled is False
