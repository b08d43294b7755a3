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
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
import yaml

from tests.processes import became_ready, stop

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
MISSING_MESSAGE = (
    "prometheus is not installed. The dashboard tests need a real Prometheus: install the Debian "
    "package `prometheus` (apt-get install -y prometheus), as scripts/test-deps does."
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(MISSING_MESSAGE, pytrace=False)
    return path


class PrometheusServer:
    def __init__(
        self, directory: Path, target: str, rules: list[Path], metrics_path: str = "/metrics"
    ) -> None:
        self.directory = Path(directory)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._target, self._rules, self._metrics_path = target, rules, metrics_path
        self._process: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PrometheusServer:
        self.directory.mkdir(parents=True, exist_ok=True)
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
        config_path = self.directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        log = (self.directory / "prometheus.log").open("wb")
        with log:
            self._process = subprocess.Popen(
                [
                    _binary(), f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._http = aiohttp.ClientSession()
        if not await became_ready(self._process, self._ready, READY_TIMEOUT):
            await self._close()
            raise RuntimeError(f"prometheus did not start: {(self.directory / 'prometheus.log').read_text()}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        process, self._process = self._process, None
        await stop(process, signal.SIGTERM, STOP_TIMEOUT)
        if self._http is not None:
            await self._http.close()

    async def _ready(self) -> bool:
        assert self._http is not None
        with contextlib.suppress(aiohttp.ClientError):
            async with self._http.get(f"{self.url}/-/ready") as response:
                return response.status == 200
        return False

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
