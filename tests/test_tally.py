"""Metric values kept as plain numbers (proxy/metrics/tally.py): the exposition prometheus-client would give
for the same observations, and sums over worker processes that share a directory."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.metrics import tally
from proxy.metrics.prometheus import LATENCY_BUCKETS
from proxy.metrics.tally import Tallies
from tests.support import samples, value

OBSERVED = [0.0, 0.004, 0.005, 0.0051, 0.25, 1, 1.5, 1800, 1800.5, 7200]


def exposition(tallies: Tallies) -> str:
    registry = CollectorRegistry()
    registry.register(tallies)
    return generate_latest(registry).decode()


def without_created(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {key: found for key, found in samples(text).items() if not key[0].endswith("_created")}


def test_the_exposition_is_the_one_prometheus_client_gives() -> None:
    """Bucket bounds included (a value equal to a bound is in that bucket), labels, types, sums."""
    ours, registry = Tallies(), CollectorRegistry()
    theirs = Histogram("latency_seconds", "Latency", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
    histogram = ours.histogram("latency_seconds", "Latency", LATENCY_BUCKETS, ["route"])
    for amount in OBSERVED:
        histogram.labels("/a").observe(amount)
        theirs.labels("/a").observe(amount)
    Counter("answered", "Answered", ["status"], registry=registry).labels("2xx").inc(3)
    ours.counter("answered", "Answered", ["status"]).labels("2xx").inc(3)
    Gauge("busy", "Busy", registry=registry).inc(2)
    busy = ours.gauge("busy", "Busy").labels()
    busy.inc(3)
    busy.dec()

    expected = without_created(generate_latest(registry).decode())
    assert without_created(exposition(ours)) == expected
    assert value(exposition(ours), "latency_seconds_bucket", le="0.005") == 3


def test_labels_must_match_the_metric() -> None:
    family = Tallies().counter("answered", "Answered", ["status"])
    with pytest.raises(ValueError, match="answered"):
        family.labels("2xx", "extra")


def test_a_metric_is_defined_once() -> None:
    tallies = Tallies()
    tallies.counter("answered", "Answered")
    with pytest.raises(ValueError, match="answered"):
        tallies.gauge("answered", "Answered")


def defined(tallies: Tallies) -> tuple[tally.Family[tally.CounterValue], tally.Family[tally.GaugeValue]]:
    return tallies.counter("answered", "Answered", ["status"]), tallies.gauge("busy", "Busy")


def in_another_process(directory: Path, work: Callable[[Tallies], None]) -> None:
    """A worker: its own pid, its own file in the shared directory."""
    process = multiprocessing.get_context("fork").Process(target=work, args=(Tallies(directory),))
    process.start()
    process.join(10)
    assert process.exitcode == 0


def busy_worker(tallies: Tallies) -> None:
    answered, busy = defined(tallies)
    answered.labels("2xx").inc(5)
    busy.labels().inc(2)
    tallies.histogram("latency_seconds", "Latency", LATENCY_BUCKETS).labels().observe(0.3)
    tallies.share()


def stopping_worker(tallies: Tallies) -> None:
    answered, busy = defined(tallies)
    answered.labels("2xx").inc(1)
    answered.labels("5xx").inc(1)
    busy.labels().inc(4)
    tallies.share(gauges=False)


def test_a_scrape_sums_every_worker_sharing_the_directory(tmp_path: Path) -> None:
    in_another_process(tmp_path, busy_worker)
    in_another_process(tmp_path, stopping_worker)
    scraped = Tallies(tmp_path)
    answered, busy = defined(scraped)
    answered.labels("2xx").inc(10)
    busy.labels().inc()
    latency = scraped.histogram("latency_seconds", "Latency", LATENCY_BUCKETS)
    latency.labels().observe(2)

    text = exposition(scraped)
    assert value(text, "answered_total", status="2xx") == 16
    assert value(text, "answered_total", status="5xx") == 1
    assert value(text, "busy") == 3  # the stopped worker's gauges are not summed
    assert value(text, "latency_seconds_count") == 2
    assert value(text, "latency_seconds_sum") == pytest.approx(2.3)
    assert value(text, "latency_seconds_bucket", le="0.5") == 1


def test_a_dead_workers_gauges_are_forgotten_and_its_counts_kept(tmp_path: Path) -> None:
    in_another_process(tmp_path, busy_worker)
    (dead,) = tmp_path.glob(f"{tally.FILE_PREFIX}*.json")
    pid = int(dead.stem.removeprefix(tally.FILE_PREFIX).split("-")[0])
    scraped = Tallies(tmp_path)
    defined(scraped)
    assert value(exposition(scraped), "busy") == 2

    tally.forget_gauges(tmp_path, pid)
    text = exposition(scraped)
    assert value(text, "busy") == 0
    assert value(text, "answered_total") == 5


def test_what_a_scrape_shows_of_a_worker_is_in_its_file(tmp_path: Path) -> None:
    """Had the worker been killed before its next share, its totals would otherwise go back."""
    worker = Tallies(tmp_path)
    answered, _ = defined(worker)
    answered.labels("2xx").inc(7)
    assert value(exposition(worker), "answered_total") == 7
    other = Tallies(tmp_path)  # another worker, as far as files go
    defined(other)
    assert value(exposition(other), "answered_total") == 7


def test_a_worker_rewrites_its_file_only_when_its_values_changed(tmp_path: Path) -> None:
    tallies = Tallies(tmp_path)
    answered, _ = defined(tallies)
    tallies.share()
    (path,) = tmp_path.glob(f"{tally.FILE_PREFIX}{os.getpid()}-*.json")
    path.unlink()
    tallies.share()
    assert not path.exists()
    answered.labels("2xx").inc()
    tallies.share()
    assert path.exists()


def test_unreadable_files_and_unknown_metrics_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / f"{tally.FILE_PREFIX}1-a.json").write_text("{not json")
    (tmp_path / f"{tally.FILE_PREFIX}3-c.json").write_text('{"gauges": [], "totals": {"answered": 5}}')
    (tmp_path / f"{tally.FILE_PREFIX}2-b.json").write_text(
        '{"gauges": {}, "totals": {"renamed": [[[], 4]], "latency_seconds": [[[], [1, 2]]],'
        ' "answered": [[["2xx"], 2], [["2xx", "x"], 1], "oops", [["5xx"], true], [[5], 1]]}}'
    )
    scraped = Tallies(tmp_path)
    answered, _ = defined(scraped)
    scraped.histogram("latency_seconds", "Latency", LATENCY_BUCKETS).labels().observe(1)
    answered.labels("2xx").inc()

    text = exposition(scraped)
    assert value(text, "answered_total", status="2xx") == 3
    assert value(text, "answered_total", status="5xx") == 0
    assert "renamed" not in text
    assert value(text, "latency_seconds_count") == 1  # other bucket bounds: not added
    assert "left out" in caplog.text


def test_a_worker_with_a_dead_workers_pid_keeps_the_dead_ones_totals(tmp_path: Path) -> None:
    in_another_process(tmp_path, busy_worker)
    (dead,) = tmp_path.glob(f"{tally.FILE_PREFIX}*.json")
    dead.rename(tmp_path / f"{tally.FILE_PREFIX}{os.getpid()}-0.json")
    scraped = Tallies(tmp_path)
    answered, _ = defined(scraped)
    answered.labels("2xx").inc()
    scraped.share()
    assert value(exposition(scraped), "answered_total") == 6


def test_clearing_removes_an_earlier_runs_files(tmp_path: Path) -> None:
    in_another_process(tmp_path, busy_worker)
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")
    tally.clear(tmp_path)
    assert list(tmp_path.iterdir()) == [unrelated]
