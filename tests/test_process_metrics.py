"""`process_*` metrics of every gateway process, one-process and `--workers`, scraped from real
processes: file-descriptor exhaustion must be something an operator can alert on (issue 15.5)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp

from tests.processes import GatewayProcess, gateway_process
from tests.support import Server, free_port, samples, write_gateway_config


def by_pid(text: str, name: str) -> dict[int, float]:
    return {int(dict(labels)["pid"]): v for (n, labels), v in samples(text).items() if n == name}


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_one_process_reports_its_open_files_as_they_grow(backend: Server, tmp_path: Path) -> None:
    config = write_gateway_config(tmp_path, backend.url, port=free_port())
    async with gateway_process(config) as gateway, aiohttp.ClientSession() as http:
        before = by_pid(await scrape(http, gateway.url), "process_open_fds")
        port = int(gateway.url.rsplit(":", 1)[1])
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        await asyncio.sleep(0.2)
        text = await scrape(http, gateway.url)
        for _, writer in connections:
            writer.close()
    after = by_pid(text, "process_open_fds")
    assert set(before) == set(after) == {gateway.pid}
    assert after[gateway.pid] - before[gateway.pid] >= 40, "each idle connection is an open file"
    assert by_pid(text, "process_max_fds")[gateway.pid] >= after[gateway.pid]
    assert by_pid(text, "process_resident_memory_bytes")[gateway.pid] > 10_000_000
    assert by_pid(text, "process_cpu_seconds_total")[gateway.pid] > 0


async def test_each_worker_reports_its_own_process(backend: Server, tmp_path: Path) -> None:
    """Whichever worker answers the scrape, every running worker is there, under its own pid."""
    config = write_gateway_config(tmp_path, backend.url, port=free_port())
    async with gateway_process(config, "--workers", "2") as gateway, aiohttp.ClientSession() as http:
        workers = set(gateway.children())
        assert len(workers) == 2
        await started(gateway, 2)
        text = await scraped_until(http, gateway.url, workers)
        open_fds = by_pid(text, "process_open_fds")
        assert set(open_fds) == workers, "each worker under its pid, the supervisor serves nothing"
        assert all(count > 5 for count in open_fds.values())
        assert (
            set(by_pid(text, "process_max_fds")) == set(by_pid(text, "process_cpu_seconds_total")) == workers
        )
        victim = workers.pop()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (victim in gateway.children() or len(gateway.children()) < 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        replaced = set(gateway.children())
        await started(gateway, 3)
        text = await scraped_until(http, gateway.url, replaced)
        assert (
            set(by_pid(text, "process_open_fds"))
            == set(by_pid(text, "process_cpu_seconds_total"))
            == replaced
        )
        assert victim not in replaced, "a dead worker's process leaves the metrics"


async def started(gateway: GatewayProcess, workers: int) -> None:
    """Until `workers` worker processes have started in all (imported the gateway, which takes
    seconds on a busy machine), so that the wait for their shared values measures only that."""
    deadline = time.monotonic() + 30
    while gateway.log_text().count("serving on") < workers:
        assert time.monotonic() < deadline, gateway.log_text()
        await asyncio.sleep(0.05)


async def scraped_until(http: aiohttp.ClientSession, url: str, pids: set[int]) -> str:
    """Workers share their values once a second: a scrape shows the others' within about that."""
    deadline = time.monotonic() + 5
    while True:
        text = await scrape(http, url)
        if set(by_pid(text, "process_open_fds")) == pids or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.2)
