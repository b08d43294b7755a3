"""Request records: JSON lines that never tear between processes, batched database writes that survive the
database going away, usage reports per user and per model, and the `usage` command."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import select
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import make_mocked_request

from proxy.core.exchange import Exchange
from proxy.core.recorder import Recorder
from proxy.metrics.prometheus import Metrics
from proxy.process.cli import main
from proxy.process.usage_cli import parse_time
from proxy.records import line_writer
from proxy.records.database import Database, DatabaseUnavailable
from proxy.records.line_writer import LineWriter, default_lock_path
from proxy.records.record import RequestRecord
from proxy.records.record_sink import RecordSink
from proxy.records.schema import connect
from proxy.records.usage_store import UsageStore
from testing.services.postgres_server import PostgresServer
from tests.support import CHAT_MODEL, EMBED_MODEL, write_gateway_config

T0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
DAY = 86400.0
ALICE, BOB = "alice@uni.edu", "bob@other.org"


def record(number: int, **fields: Any) -> RequestRecord:
    base = RequestRecord(
        request_id=f"req-{number:05d}",
        started_at=T0 + number,
        duration_ms=12.5,
        ttfc_ms=None,
        method="POST",
        route="/resource_server/{cluster}/{framework}/v1/{openai_path}",
        path="/resource_server/local/vllm/v1/chat/completions",
        status=200,
        user_id="a1a1",
        username=ALICE,
        cluster="local",
        framework="vllm",
        model=CHAT_MODEL,
        endpoint_slug="local-vllm-chat",
        stream=False,
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        task_id=None,
        client_ip="127.0.0.1",
        error=None,
    )
    return dataclasses.replace(base, **fields)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``check`` (sync or async) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class RecordingStore(UsageStore):
    """The real store, remembering the batches it was given."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self.batches: list[list[str]] = []

    async def add_many(self, records: Sequence[RequestRecord]) -> None:
        await super().add_many(records)
        self.batches.append([item.request_id for item in records])


class FakeStore(UsageStore):
    """No database: fails the first ``outages`` calls as unavailable, refuses records named in ``bad``."""

    def __init__(self, outages: int = 0, bad: frozenset[str] = frozenset()) -> None:
        self.outages = outages
        self.bad = bad
        self.ids: list[str] = []

    async def add_many(self, records: Sequence[RequestRecord]) -> None:
        if self.outages:
            self.outages -= 1
            raise DatabaseUnavailable("down")
        if any(item.request_id in self.bad for item in records):
            raise ValueError("bad record")
        self.ids.extend(item.request_id for item in records)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await connect(database_url)
    yield database
    await database.close()


async def count(db: Database) -> int:
    row = await db.fetchone("SELECT COUNT(*) AS n FROM requests")
    assert row is not None
    return int(row["n"])


# --- the record -----------------------------------------------------------------------------------


def test_record_is_one_compact_json_line() -> None:
    line = record(1, prompt="two\nlines \u2028 caf\u00e9 \udc80", stream=True).as_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b", " not in line and b'": ' not in line
    document = json.loads(line)
    assert document["prompt"] == "two\nlines \u2028 caf\u00e9 \udc80"
    assert document["stream"] is True and document["ttfc_ms"] is None
    assert list(document) == [field.name for field in dataclasses.fields(RequestRecord)]


# --- the store ------------------------------------------------------------------------------------


async def test_usage_by_user_and_by_model_over_a_period(db: Database) -> None:
    store = UsageStore(db)
    await store.add_many(
        [
            record(
                1, username=ALICE, model=CHAT_MODEL, prompt_tokens=100, completion_tokens=50, total_tokens=150
            ),
            record(
                2, username=ALICE, model=EMBED_MODEL, prompt_tokens=7, completion_tokens=0, total_tokens=7
            ),
            record(
                3, username=BOB, model=CHAT_MODEL, prompt_tokens=300, completion_tokens=200, total_tokens=None
            ),
            record(
                4,
                username=None,
                model=None,
                status=401,
                prompt_tokens=None,
                completion_tokens=None,
                total_tokens=None,
            ),
            record(
                5, username=BOB, started_at=T0 + 2 * DAY, prompt_tokens=1, completion_tokens=1, total_tokens=2
            ),
        ]
    )
    assert await store.usage(T0, T0 + DAY, "user", answered_only=False) == [
        {"user": BOB, "requests": 1, "prompt_tokens": 300, "completion_tokens": 200, "total_tokens": 500},
        {"user": ALICE, "requests": 2, "prompt_tokens": 107, "completion_tokens": 50, "total_tokens": 157},
        {"user": None, "requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    ]
    assert await store.usage(T0, None, "model", answered_only=False) == [
        {
            "model": CHAT_MODEL,
            "requests": 3,
            "prompt_tokens": 401,
            "completion_tokens": 251,
            "total_tokens": 652,
        },
        {"model": EMBED_MODEL, "requests": 1, "prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7},
        {"model": None, "requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    ]
    later = await store.usage(T0 + DAY, None, "user")
    assert [(row["user"], row["total_tokens"]) for row in later] == [(BOB, 2)]
    assert await store.usage(T0 + 3, T0 + 3, "user") == []  # until is excluded
    with pytest.raises(ValueError, match="usage by"):
        await store.usage(T0, None, "project")  # type: ignore[arg-type]


async def test_add_many_beyond_one_statement_and_retried_batches_add_nothing_twice(db: Database) -> None:
    store = UsageStore(db)
    records = [record(number, prompt="p" * 50) for number in range(2000)]  # over the parameter limit
    await store.add_many(records)
    await store.add_many(records[:10])  # a batch re-sent after a lost acknowledgement
    assert await count(db) == 2000
    await store.add_many([record(0, started_at=T0 - 5)])  # a client reusing its X-Request-ID: a new request
    assert await count(db) == 2001
    row = await db.fetchone(
        "SELECT stream, prompt FROM requests WHERE request_id = ? AND started_at = ?", "req-00007", T0 + 7
    )
    assert row == {"stream": 0, "prompt": "p" * 50}
    await store.add_many([record(9, started_at=T0 - 9, stream=True)])
    assert await db.fetchone("SELECT stream FROM requests WHERE started_at = ?", T0 - 9) == {"stream": 1}


async def test_records_with_any_mix_of_nulls_are_stored_as_they_are(db: Database) -> None:
    often_null = {
        "ttfc_ms": 3.25,
        "task_id": "task-1",
        "error": "upstream 502",
        "prompt": "hi",
        "result": "yo",
    }
    records = [
        record(
            number,
            stream=bool(number & 32),
            **{name: value for bit, (name, value) in enumerate(often_null.items()) if number >> bit & 1},
        )
        for number in range(64)
    ]
    await UsageStore(db).add_many(records[1::2] + records[::2])
    stored = await db.fetch("SELECT * FROM requests ORDER BY started_at")
    assert stored == [dataclasses.asdict(item) | {"stream": int(item.stream)} for item in records]


# --- the sink -------------------------------------------------------------------------------------


async def test_sink_writes_full_batches_then_the_rest_on_time_or_at_close(db: Database) -> None:
    store = RecordingStore(db)
    sink = RecordSink(store, batch_size=10, flush_seconds=60)
    sink.start()
    sink.submit([record(number) for number in range(12)])
    sink.submit([record(number) for number in range(12, 25)])
    await eventually(lambda: sink.written == 20)
    assert [len(batch) for batch in store.batches] == [10, 10] and sink.buffered == 5
    await sink.close()
    assert [len(batch) for batch in store.batches] == [10, 10, 5]
    assert [item for batch in store.batches for item in batch] == [f"req-{n:05d}" for n in range(25)]
    assert (await store.usage(T0, None, "user"))[0]["total_tokens"] == 25 * 15

    timed = RecordSink(store, batch_size=1000, flush_seconds=0.05)
    timed.start()
    timed.submit([record(100)])
    await eventually(lambda: timed.written == 1)  # a partial batch goes out once flush_seconds pass
    await timed.close()
    assert await count(db) == 26


async def test_a_sink_cancelled_as_it_wakes_stops() -> None:
    """asyncio.wait_for in Python 3.11 swallows a cancellation that arrives as the awaited event fires:
    the writer then ran on, and shutting down waited for it forever."""
    sink = RecordSink(FakeStore(), batch_size=1, flush_seconds=60)
    sink.start()
    await asyncio.sleep(0.01)  # the writer now waits for a full batch
    (task,) = [task for task in asyncio.all_tasks() if task.get_name() == "request-record-sink"]
    sink.submit([record(1)])  # wakes it...
    await asyncio.sleep(0)
    task.cancel()  # ...in the same turn as it is cancelled
    done, _ = await asyncio.wait({task}, timeout=1)
    assert done == {task} and task.cancelled()


async def test_close_flushes_what_was_submitted(db: Database) -> None:
    sink = RecordSink(UsageStore(db), batch_size=1000, flush_seconds=60)
    sink.start()
    sink.submit([record(number) for number in range(7)])
    await sink.close()
    assert await count(db) == 7 and sink.written == 7 and sink.dropped == 0
    sink.submit([record(8), record(9)])  # after close: dropped, not raised
    assert sink.dropped == 2


async def test_full_buffer_drops_new_records_and_counts_them(db: Database) -> None:
    sink = RecordSink(UsageStore(db), max_buffered=5, batch_size=100, flush_seconds=60)
    sink.submit([record(number) for number in range(4)])  # not started: nothing drains the buffer
    sink.submit([record(number) for number in range(4, 8)])
    assert sink.buffered == 5 and sink.dropped == 3
    sink.submit([record(9)])
    assert sink.buffered == 5 and sink.dropped == 4
    await sink.close()  # close writes what is buffered even without start()
    rows = await db.fetch("SELECT request_id FROM requests ORDER BY started_at")
    assert [row["request_id"] for row in rows] == [f"req-{n:05d}" for n in range(5)]  # the oldest kept


async def test_postgres_going_away_and_coming_back_loses_no_record(postgres_server: PostgresServer) -> None:
    url = await postgres_server.create_database("test_request_log_outage")
    db = await connect(url)
    store = RecordingStore(db)
    sink = RecordSink(store, batch_size=4, flush_seconds=0.05, retry_seconds=0.2)
    sink.start()
    try:
        sink.submit([record(number) for number in range(5)])
        await eventually(lambda: sink.written == 5)
        await postgres_server.stop()
        for number in range(5, 30):
            sink.submit([record(number)])
        await asyncio.sleep(0.5)  # several attempts fail meanwhile
        assert sink.buffered == 25 and sink.written == 5
    finally:
        await postgres_server.start()
    await eventually(lambda: sink.written == 30, timeout=10)
    await sink.close()
    written = [item for batch in store.batches for item in batch]
    assert written == [f"req-{n:05d}" for n in range(30)]  # oldest first
    assert await count(db) == 30 and sink.dropped == 0 and sink.rejected == 0
    await db.close()
    await postgres_server.drop_database("test_request_log_outage")


async def test_close_gives_up_after_its_timeout_while_postgres_is_down(
    postgres_server: PostgresServer,
) -> None:
    url = await postgres_server.create_database("test_request_log_close")
    db = await connect(url)
    sink = RecordSink(UsageStore(db), batch_size=100, flush_seconds=60, retry_seconds=0.1)
    sink.start()
    await postgres_server.stop()
    try:
        sink.submit([record(number) for number in range(3)])
        started = time.monotonic()
        await sink.close(timeout=0.3)
        assert time.monotonic() - started < 2
        assert sink.dropped == 3 and sink.buffered == 0
    finally:
        await postgres_server.start()
    await db.close()
    await postgres_server.drop_database("test_request_log_close")


async def test_outages_keep_order_and_a_refused_record_costs_only_itself() -> None:
    store = FakeStore(outages=3, bad=frozenset({"req-00004"}))
    sink = RecordSink(store, batch_size=3, flush_seconds=0.02, retry_seconds=0.02)
    sink.start()
    sink.submit([record(number) for number in range(10)])
    await sink.close()
    assert store.ids == [f"req-{n:05d}" for n in range(10) if n != 4]
    assert sink.written == 9 and sink.rejected == 1 and sink.dropped == 0


# --- stdout ---------------------------------------------------------------------------------------

LINES_PER_PROCESS = 200
LINE_BYTES = 100_000


def _write_many(writer: LineWriter, child: int) -> None:
    """A forked worker process: the writer (and its lock file) came from the parent."""
    for number in range(LINES_PER_PROCESS):
        payload = chr(ord("a") + child) * LINE_BYTES
        writer.write(record(number, request_id=f"{child}-{number}", prompt=payload))
        if number % 3 == 0:
            writer.write(record(number, request_id=f"{child}-short-{number}"))
    writer.flush()
    raise SystemExit(min(writer.failures, 100))


def test_two_processes_write_only_whole_lines_to_one_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long lines take several writes to a pipe, and short ones from the other process must not land
    between them."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the default lock file, keyed by the pipe
    read_end, write_end = os.pipe()
    writer = LineWriter(write_end)
    assert writer.lock_path == default_lock_path(write_end) and writer.lock_path.startswith(str(tmp_path))
    writer.write(record(0, request_id="parent"))
    writer.flush()  # opens the lock file before the fork
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_write_many, args=(writer, number)) for number in range(2)]
    for process in children:
        process.start()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    for process in children:
        process.join(10)
        assert process.exitcode == 0
    lines = data.split(b"\n")
    assert lines.pop() == b""
    documents = [json.loads(line) for line in lines]  # a torn line would not parse
    long_ids = {f"{child}-{number}" for child in range(2) for number in range(LINES_PER_PROCESS)}
    short_ids = {f"{child}-short-{number}" for child in range(2) for number in range(0, LINES_PER_PROCESS, 3)}
    assert len(documents) == 1 + len(long_ids) + len(short_ids)
    assert {document["request_id"] for document in documents} == {"parent"} | long_ids | short_ids
    for document in documents:
        if document["request_id"] in long_ids:
            writer_number = int(document["request_id"].split("-")[0])
            assert document["prompt"] == chr(ord("a") + writer_number) * LINE_BYTES


def test_lines_leave_in_atomic_writes_and_the_rest_on_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_write = line_writer._write_all

    def counted(fd: int, data: bytes) -> None:
        writes.append(data)
        real_write(fd, data)

    monkeypatch.setattr(line_writer, "_write_all", counted)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    writer = LineWriter(write_end, lock_path=tmp_path / "log.lock")
    lines = [record(number).as_json_line() for number in range(40)]
    for number in range(40):
        writer.write(record(number))
    longest = max(map(len, lines))
    assert writes and all(select.PIPE_BUF - longest < len(data) <= select.PIPE_BUF for data in writes)
    assert os.read(read_end, 1 << 20) == b"".join(writes)  # the rest waits...
    writer.flush()
    assert b"".join(writes) == b"".join(lines)  # ...for the flush, in order
    assert os.read(read_end, 1 << 20) == writes[-1]
    writer.close()
    for fd in (read_end, write_end):
        os.close(fd)


def test_lines_to_a_regular_file_leave_in_larger_pieces(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    writer = LineWriter(fd, lock_path=tmp_path / "log.lock")
    for number in range(40):  # about 18 kB: more than PIPE_BUF, less than one piece to a file
        writer.write(record(number))
    assert path.read_bytes() == b""
    writer.flush()
    assert path.read_bytes() == b"".join(record(number).as_json_line() for number in range(40))
    writer.close()
    os.close(fd)


@pytest.mark.alone(
    "records 50 ms apart must all wait for the first one's 0.2 s delay, then be written within 0.3 s"
)
async def test_records_wait_together_for_their_delay_and_after_close_leave_at_once(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = Recorder(LineWriter(fd, lock_path=tmp_path / "log.lock"), [], Metrics(enabled=False), False, 0.2)
    log.sink = RecordSink(FakeStore())  # not started: records stay in its buffer

    def end(request_id: str) -> None:
        exchange = Exchange(request_id, started=time.monotonic(), started_at=time.time(), route="/r")
        log.emit(make_mocked_request("POST", "/r"), exchange, 200)

    def written() -> list[str]:
        return [json.loads(line)["request_id"] for line in path.read_bytes().splitlines()]

    for number in range(3):
        end(f"r{number}")
        await asyncio.sleep(0.05)
    assert written() == [] and log.sink.buffered == 0
    await eventually(lambda: written() == ["r0", "r1", "r2"], timeout=0.3)  # 0.2 s after the first
    assert log.sink.buffered == 3
    end("r3")
    log.close()  # what waits leaves now...
    assert written() == ["r0", "r1", "r2", "r3"] and log.sink.buffered == 4
    end("r4")  # ...and so does each later record
    assert written()[-1] == "r4" and log.sink.buffered == 5
    os.close(fd)


def test_line_writer_counts_failures_instead_of_raising(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    other_read, other_write = os.pipe()
    assert default_lock_path(write_end) != default_lock_path(other_write)
    os.close(read_end)  # nobody reads: EPIPE
    writer = LineWriter(write_end, lock_path=tmp_path / "log.lock")
    writer.write(record(1))
    writer.write(record(2, prompt=object()))  # not JSON: counted too
    assert writer.failures == 1
    writer.flush()
    assert writer.failures == 2
    writer.close()
    for fd in (write_end, other_read, other_write):
        os.close(fd)


# --- the usage command ----------------------------------------------------------------------------


async def test_usage_command_prints_totals(
    db: Database, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_gateway_config(tmp_path, "http://127.0.0.1:9")
    document = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**document, "database_url": database_url}))
    await UsageStore(db).add_many(
        [
            record(1, username=ALICE, prompt_tokens=1000, completion_tokens=234, total_tokens=1234),
            record(
                2, username=BOB, model=EMBED_MODEL, prompt_tokens=40, completion_tokens=0, total_tokens=40
            ),
            record(3, username=BOB, prompt_tokens=5, completion_tokens=5, total_tokens=10),
            record(4, username=ALICE, started_at=T0 - DAY),  # before --since
        ]
    )
    base = ["usage", "--config", str(config), "--since", "2026-11-01"]

    assert await asyncio.to_thread(main, [*base, "--until", "2026-11-02T00:00:00Z"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "2026-11-01T00:00:00+00:00 to 2026-11-02T00:00:00+00:00 (UTC), answered requests"
    assert table[1].split() == [
        "USER",
        "REQUESTS",
        "PROMPT",
        "TOKENS",
        "COMPLETION",
        "TOKENS",
        "TOTAL",
        "TOKENS",
    ]
    assert table[3].split() == [ALICE, "1", "1,000", "234", "1,234"]
    assert table[4].split() == [BOB, "2", "45", "5", "50"]
    assert table[-1].split() == ["TOTAL", "3", "1,045", "239", "1,284"]
    assert len({len(line) for line in table[1:] if not line.startswith("-")}) == 1  # aligned

    assert await asyncio.to_thread(main, [*base, "--by", "model", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by"] == ["model"] and report["until"] is None and report["answered_only"] is True
    assert [(row["model"], row["requests"], row["total_tokens"]) for row in report["rows"]] == [
        (CHAT_MODEL, 2, 1244),
        (EMBED_MODEL, 1, 40),
    ]
    assert report["total"] == {
        "requests": 3,
        "prompt_tokens": 1045,
        "completion_tokens": 239,
        "total_tokens": 1284,
    }


def test_usage_command_times_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = T0 + 10 * DAY
    assert parse_time("7d", now) == now - 7 * DAY
    assert parse_time("24h", now) == now - DAY
    assert parse_time("90m", now) == now - 5400
    assert parse_time("2026-11-01") == T0
    assert parse_time("2026-11-01T01:00:00+01:00") == T0
    with pytest.raises(ValueError, match="neither"):
        parse_time("last week")
    assert main(["usage", "--since", "yesterday-ish"]) == 2
    assert "neither an ISO date" in capsys.readouterr().err
    assert main(["usage"]) == 2, "a report needs --since (`usage prune` does not)"
    assert "required: --since" in capsys.readouterr().err
    assert main(["usage", "--config", str(tmp_path / "missing.yaml"), "--since", "7d"]) == 2
    assert "configuration error" in capsys.readouterr().err


# --- usage: what counts, and the breakdowns ----------------------------------------------------------


async def test_usage_counts_answered_requests_by_default(db: Database) -> None:
    """401 (a refused token), 429 (a rate limit), 400 and 502 used no model time for the user."""
    store = UsageStore(db)
    statuses = [200, 401, 429, 400, 502, 201]
    await store.add_many([record(number, status=status) for number, status in enumerate(statuses)])
    (answered,) = await store.usage(T0, None, "user")
    assert (answered["requests"], answered["total_tokens"]) == (2, 30)
    (everything,) = await store.usage(T0, None, "user", answered_only=False)
    assert everything["requests"] == len(statuses)


async def test_usage_by_cluster_model_user_day_and_hour(db: Database) -> None:
    store = UsageStore(db)
    await store.add_many(
        [
            record(1, cluster="sophia", total_tokens=100),
            record(2, cluster="polaris", total_tokens=10, started_at=T0 + 3600 + 5),
            record(3, cluster="sophia", username=BOB, total_tokens=1, started_at=T0 + DAY - 1),
            record(4, cluster="sophia", model=EMBED_MODEL, total_tokens=7, started_at=T0 + DAY + 7200),
        ]
    )
    by_cluster = await store.usage(T0, None, "cluster")
    assert [(row["cluster"], row["requests"], row["total_tokens"]) for row in by_cluster] == [
        ("sophia", 3, 108),
        ("polaris", 1, 10),
    ]
    by_day = await store.usage(T0, None, "day")
    assert [(row["day"], row["requests"], row["total_tokens"]) for row in by_day] == [
        ("2026-11-01", 3, 111),
        ("2026-11-02", 1, 7),
    ]
    by_hour = await store.usage(T0, None, "hour")
    assert [(row["hour"], row["requests"]) for row in by_hour] == [
        ("2026-11-01T00:00+00:00", 1),
        ("2026-11-01T01:00+00:00", 1),
        ("2026-11-01T23:00+00:00", 1),
        ("2026-11-02T02:00+00:00", 1),
    ]
    combined = await store.usage(T0, None, ["day", "cluster", "user"])
    assert [(row["day"], row["cluster"], row["user"], row["total_tokens"]) for row in combined] == [
        ("2026-11-01", "sophia", ALICE, 100),
        ("2026-11-01", "polaris", ALICE, 10),
        ("2026-11-01", "sophia", BOB, 1),
        ("2026-11-02", "sophia", ALICE, 7),
    ]
    by_model = await store.usage(T0, None, ["model"])
    assert [row["model"] for row in by_model] == [CHAT_MODEL, EMBED_MODEL]


async def test_usage_command_breaks_down_by_several_keys(
    db: Database, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_gateway_config(tmp_path, "http://127.0.0.1:9")
    document = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**document, "database_url": database_url}))
    await UsageStore(db).add_many(
        [
            record(1, cluster="sophia", total_tokens=1500),
            record(2, cluster="sophia", status=429, total_tokens=None, prompt_tokens=None),
            record(3, cluster="polaris", started_at=T0 + DAY, total_tokens=20),
        ]
    )
    base = ["usage", "--config", str(config), "--since", "2026-11-01"]
    assert await asyncio.to_thread(main, [*base, "--by", "day,cluster"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["DAY", "CLUSTER", "REQUESTS"]
    assert table[3].split() == ["2026-11-01", "sophia", "1", "10", "5", "1,500"]
    assert table[4].split() == ["2026-11-02", "polaris", "1", "10", "5", "20"]
    assert table[-1].split() == ["TOTAL", "2", "20", "10", "1,520"]
    assert await asyncio.to_thread(main, [*base, "--by", "cluster", "--all", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answered_only"] is False
    assert [(row["cluster"], row["requests"]) for row in report["rows"]] == [("sophia", 2), ("polaris", 1)]
    assert main([*base, "--by", "project"]) == 2
    assert "choose from user, model, cluster, day, hour" in capsys.readouterr().err
