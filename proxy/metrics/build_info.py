"""What is running: the version for `--version` and the `gateway_build_info` metric, so a dashboard
shows which release each host serves during a rolling upgrade."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterator
from functools import cache

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

DISTRIBUTION = "hpc-inference-gateway"


@cache
def version() -> str:
    """The installed distribution's version (setup.cfg's `version`)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class BuildInfo(Collector):
    """`gateway_build_info{version, python} 1`, from this process: constant, so it is never summed
    across workers as the shared tallies are."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gateway_build_info", "The running gateway's version (always 1)", labels=["version", "python"]
        )
        family.add_metric([version(), platform.python_version()], 1)
        yield family
