"""A real, throw-away Prometheus server scraping a gateway every second, for tests.

The dashboard and the alerting rules are PromQL: only a real Prometheus shows that each query
parses, finds the series the gateway exports under the labels it uses, and that each rule
evaluates. Its storage is a temporary directory; it runs until the block ends.

    async with PrometheusServer(tmp_path, target="127.0.0.1:8000", rules=[path]) as prometheus:
        await prometheus.query("sum(rate(gateway_requests_total[1m]))")
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import yaml

from testing.services.base import ServiceProcess

MISSING_MESSAGE: Final = (
    "prometheus is not installed. The dashboard tests need a real Prometheus: install the Debian "
    "package `prometheus` (apt-get install -y prometheus), as scripts/test-deps does."
)


def _binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(MISSING_MESSAGE, pytrace=False)
    return path


class PrometheusServer(ServiceProcess):
    name = "prometheus"
    ready_timeout = 20.0
    stop_timeout = 10.0

    def __init__(
        self, directory: Path, target: str, rules: list[Path], metrics_path: str = "/metrics"
    ) -> None:
        super().__init__(directory)
        self._target, self._rules, self._metrics_path = target, rules, metrics_path
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def _config_path(self) -> Path:
        return self.directory / "prometheus.yml"

    async def prepare(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule) for rule in self._rules],
            "scrape_configs": [
                {
                    "job_name": "inference-gateway",
                    "metrics_path": self._metrics_path,
                    "static_configs": [{"targets": [self._target]}],
                }
            ],
        }
        self._config_path.write_text(yaml.safe_dump(config))
        if self._http is None:
            self._http = aiohttp.ClientSession()

    def command(self, port: int) -> list[str]:
        return [
            _binary(), f"--config.file={self._config_path}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ]  # fmt: skip

    async def ready(self) -> bool:
        assert self._http is not None
        with contextlib.suppress(aiohttp.ClientError):
            async with self._http.get(f"{self.url}/-/ready") as response:
                return response.status == 200
        return False

    async def close(self) -> None:
        await self.stop()
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def api(self, path: str, **params: Any) -> Any:
        """The `data` of an API answer; a failed query fails the test with Prometheus's error."""
        assert self._http is not None
        async with self._http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            document = await response.json()
        assert document["status"] == "success", f"{path} {params}: {document.get('error')}"
        return document["data"]

    async def query(self, expression: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expression)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scraped(self, times: int, timeout: float = 15.0) -> None:
        """Until the gateway has been scraped ``times`` more times: a rate needs two samples."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wanted = await self._scrapes() + times
        while (done := await self._scrapes()) < wanted:
            assert loop.time() < deadline, f"scraped {done} times, not {wanted}"
            await asyncio.sleep(0.2)

    async def _scrapes(self) -> int:
        result = await self.query("count_over_time(up[5m])")
        return int(result[0]["value"][1]) if result else 0
