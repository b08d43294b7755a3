"""Metric values as plain numbers, cheap enough for the ten or so updates every request makes.

A prometheus-client metric takes a lock and makes several calls on every update; in a busy gateway
those updates cost about 5% of its CPU. Here a value is a Python number that only the event loop's
thread updates, so it needs no lock, and prometheus-client's collector interface turns the values
into its exposition format when they are scraped.

Worker processes share a directory (``PROMETHEUS_MULTIPROC_DIR``). Each worker writes its values
to its own file there once a second, when it is scraped and when it stops; a scrape of any worker
adds its own values to the other workers' files, which are at most a second old. Counters and
histograms of workers that have ended stay in the sum, so totals never go back (a killed worker
loses at most its last second, which no scrape has shown). Gauges count running workers only: a
stopping worker leaves them out of its last file, and the supervisor removes those of a worker
that died.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Generic, TypeVar, cast

import orjson
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

log = logging.getLogger(__name__)

SHARED_DIRECTORY_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""The variable prometheus-client's multiprocess mode reads: deployments already set it."""
SHARE_SECONDS: Final = 1.0
FILE_PREFIX: Final = "tally-"
GAUGE: Final = "gauge"
GAUGES: Final = "gauges"
TOTALS: Final = "totals"


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def shared(self) -> float:
        return self.value


class GaugeValue(CounterValue):
    """A counter that may also go down."""

    __slots__ = ()

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class HistogramValue:
    """Counts per bucket, not cumulated: an observation touches one bucket."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def shared(self) -> list[float]:
        return [*self.counts, self.sum]


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)
Shared = float | list[float]
"""A value as workers share it: a number, or a histogram's counts followed by its sum."""
Document = dict[str, list[list[Any]]]
"""A worker's file holds two: gauges, and totals (counters and histograms), by metric name."""


class Family(Generic[V]):
    """A metric's children, one per set of label values, found by one dictionary look-up."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        new: Callable[[], V],
        bounds: tuple[float, ...] = (),
        running_only: bool = False,
    ) -> None:
        self.kind = kind
        self.running_only = running_only or kind == GAUGE
        """Shared like a gauge: only while its worker runs (a worker's own CPU time, say)."""
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], V] = {}
        self._new: Callable[[], V] = new
        self._bounds = bounds

    def labels(self, *values: str) -> V:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} has labels {self.labelnames}, not {values}")
            child = self._new()
            self.children[values] = child
        return child

    def shared(self) -> Iterator[tuple[tuple[str, ...], Shared]]:
        for labels, child in self.children.items():
            yield labels, child.shared()

    def fits(self, entry: object) -> bool:
        """Whether a series from another worker's file is one of this metric's: a worker of another
        version may have other labels or buckets."""
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)):
            return False
        labels, value = entry
        if len(labels) != len(self.labelnames) or not all(isinstance(label, str) for label in labels):
            return False
        if self.kind == "histogram":
            return (
                isinstance(value, list)
                and len(value) == len(self._bounds) + 2
                and all(_is_number(number) for number in value)
            )
        return _is_number(value)

    def exposed(self, series: dict[tuple[str, ...], Shared]) -> Metric:
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for labels, value in series.items():
                assert isinstance(value, list)
                histogram.add_metric(list(labels), self._buckets(value[:-1]), value[-1])
            return histogram
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        metric = kind(self.name, self.documentation, labels=self.labelnames)
        for labels, value in series.items():
            assert isinstance(value, float)
            metric.add_metric(list(labels), value)
        return metric

    def _buckets(self, counts: list[float]) -> list[tuple[str, float]]:
        cumulative = 0.0
        buckets = []
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        return buckets


class Tallies:
    """Every metric of one process, and a prometheus-client collector of them (and, with a shared
    directory, of every worker's)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._families: dict[str, Family[CounterValue] | Family[GaugeValue] | Family[HistogramValue]] = {}
        self._written: bytes | None = None
        self._file: Path | None = None
        self._file_pid = 0
        self.refreshers: list[Callable[[], None]] = []
        """Called before this worker's values are shared or scraped: values read, not counted."""

    def counter(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), running_only: bool = False
    ) -> Family[CounterValue]:
        return self._add(
            Family("counter", name, documentation, labelnames, CounterValue, running_only=running_only)
        )

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Family[GaugeValue]:
        return self._add(Family(GAUGE, name, documentation, labelnames, GaugeValue))

    def histogram(
        self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Family[HistogramValue]:
        bounds = tuple(sorted(float(bound) for bound in buckets if bound != math.inf))
        return self._add(
            Family("histogram", name, documentation, labelnames, lambda: HistogramValue(bounds), bounds)
        )

    def _add(self, family: Family[V]) -> Family[V]:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is defined twice")
        self._families[family.name] = family
        return family

    def collect(self) -> Iterable[Metric]:
        """This worker's values are shared before they are shown: whatever a scrape has seen of a
        worker is in its file, and stays in the totals if the worker is killed."""
        totals = self._own_values()
        if self.directory is not None:
            self._write(self.directory, totals, gauges=True)
            for others in self._other_workers():
                self._add_up(totals, others)
        return [family.exposed(totals[name]) for name, family in self._families.items()]

    def share(self, gauges: bool = True) -> None:
        """Write this worker's values to its file (replaced whole, so readers never see half of
        it); `gauges` False when stopping, as a stopped worker has nothing in flight."""
        if self.directory is not None:
            self._write(self.directory, self._own_values(), gauges)

    def _own_values(self) -> dict[str, dict[tuple[str, ...], Shared]]:
        for refresh in self.refreshers:
            refresh()
        return {name: dict(family.shared()) for name, family in self._families.items()}

    def _write(self, directory: Path, values: dict[str, dict[tuple[str, ...], Shared]], gauges: bool) -> None:
        document: dict[str, Document] = {GAUGES: {}, TOTALS: {}}
        for name, family in self._families.items():
            if gauges or not family.running_only:
                section = document[GAUGES if family.running_only else TOTALS]
                section[name] = [[list(labels), value] for labels, value in values[name].items()]
        data = orjson.dumps(document)
        path = self._own_file(directory)
        if data == self._written:
            return
        try:
            _replace(path, data)
        except OSError as exc:
            log.warning("metrics not shared with the other workers: %s", exc)
            return
        self._written = data

    async def share_forever(self) -> None:
        while True:
            await asyncio.sleep(SHARE_SECONDS)
            self.share()

    def _own_file(self, directory: Path) -> Path:
        """Named by pid and a random part: a new worker that gets a dead one's pid must not
        replace the dead one's totals."""
        pid = os.getpid()
        if self._file is None or self._file_pid != pid:
            self._file = directory / f"{FILE_PREFIX}{pid}-{secrets.token_hex(4)}.json"
            self._file_pid, self._written = pid, None
        return self._file

    def _add_up(self, totals: dict[str, dict[tuple[str, ...], Shared]], document: Document) -> None:
        for name, series in document.items():
            family = self._families.get(name)
            if family is None or not isinstance(series, list):
                continue
            known = totals[name]
            for entry in series:
                if not family.fits(entry):
                    continue
                key, value = tuple(entry[0]), entry[1]
                mine = known.get(key)
                if isinstance(value, list):
                    summed = [0.0] * len(value) if mine is None else cast(list[float], mine)
                    known[key] = [a + b for a, b in zip(summed, value, strict=True)]
                else:
                    known[key] = cast(float, mine or 0.0) + value

    def _other_workers(self) -> Iterator[Document]:
        assert self.directory is not None
        for path in self.directory.glob(f"{FILE_PREFIX}*.json"):
            if path != self._file:
                document = _read(path)
                if document is not None:
                    for section in (document.get(GAUGES), document.get(TOTALS)):
                        if isinstance(section, dict):
                            yield section


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def forget_gauges(directory: Path, pid: int) -> None:
    """A dead worker's requests are no longer in flight; its counters and histograms still count."""
    for path in directory.glob(f"{FILE_PREFIX}{pid}-*.json"):
        document = _read(path)
        if document is None or not document.get(GAUGES):
            continue
        try:
            _replace(path, orjson.dumps({GAUGES: {}, TOTALS: document.get(TOTALS, {})}))
        except OSError as exc:
            log.warning("the gauges of worker %d stay in the metrics: %s", pid, exc)


def clear(directory: Path) -> None:
    """Files of an earlier run would be added to this one's counters."""
    for stale in directory.glob(f"{FILE_PREFIX}*"):
        stale.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Document] | None:
    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("metrics file %s left out: %s", path, exc)
        return None
    return document if isinstance(document, dict) else None


def _replace(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
