"""The gateway process's own resources: open files against their limit, memory, CPU time.

prometheus-client reads them from /proc (``ProcessCollector``). Registered as it is, a scrape would
show only the worker that answers it; so each worker copies them into tallies labelled with its
pid, read whenever its values are shared or scraped (once a second at most when idle). Shared like
gauges, they count only running workers: `process_open_fds / process_max_fds` per pid is what an
alert on file-descriptor exhaustion needs, worker by worker, and in one-process mode the same.
"""

from __future__ import annotations

import os

from prometheus_client import ProcessCollector

from proxy.metrics.tally import CounterValue, Family, GaugeValue, Tallies

_GAUGES = {
    "process_open_fds": "Open file descriptors",
    "process_max_fds": "Most file descriptors the process may open (its soft limit)",
    "process_resident_memory_bytes": "Resident memory size in bytes",
    "process_virtual_memory_bytes": "Virtual memory size in bytes",
    "process_start_time_seconds": "Start time of the process since the Unix epoch, in seconds",
}


class ProcessMetrics:
    def __init__(self, tallies: Tallies) -> None:
        self._reader = ProcessCollector(registry=None)
        self._gauges: dict[str, Family[GaugeValue]] = {
            name: tallies.gauge(name, documentation, ["pid"]) for name, documentation in _GAUGES.items()
        }
        self._cpu: Family[CounterValue] = tallies.counter(
            "process_cpu_seconds", "User and system CPU time spent, in seconds", ["pid"], running_only=True
        )
        tallies.refreshers.append(self.refresh)

    def refresh(self) -> None:
        """Labelled with the pid of now: a worker is a fresh interpreter, but a fork would not be."""
        pid = str(os.getpid())
        for metric in self._reader.collect():
            for sample in metric.samples:
                if metric.name in self._gauges:
                    self._gauges[metric.name].labels(pid).value = float(sample.value)
                elif metric.name == "process_cpu_seconds":
                    self._cpu.labels(pid).value = float(sample.value)
