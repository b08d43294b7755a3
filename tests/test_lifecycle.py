"""The gateway as operators run it: `inference-gateway` processes, several workers on one port,
SIGTERM draining in-flight streams, SIGHUP (or `inference-gateway reload`) re-reading endpoints
and clusters without dropping anything, and refusing a broken file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from testing.processes import exited
from tests.processes import gateway_process
from tests.support import (
    CHAT_MODEL,
    Server,
    auth,
    chat,
    endpoint,
    free_port,
    summed_value,
    write_gateway_config,
    write_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/resource_server/local/vllm/v1/chat/completions"


def configured(tmp_path: Path, backend: Server, **server: object) -> Path:
    return write_gateway_config(tmp_path, backend.url, port=free_port(), **server)


async def complete(http: aiohttp.ClientSession, url: str, model: str = CHAT_MODEL) -> int:
    async with http.post(f"{url}{CHAT}", json=chat(model=model), headers=auth()) as response:
        await response.read()
        return response.status


async def open_stream(
    http: aiohttp.ClientSession, url: str, chunks: int, delay: float
) -> aiohttp.ClientResponse:
    body = chat(f"[[chunks={chunks}]] [[chunk_delay={delay}]]", stream=True)
    response = await http.post(f"{url}{CHAT}", json=body, headers=auth())
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: ")
    return response


async def test_two_workers_share_the_port_and_their_metrics(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with gateway_process(configured(tmp_path, backend), "--workers", "2") as gateway:
        assert len(gateway.children()) == 2
        fresh = [aiohttp.ClientSession() for _ in range(40)]
        try:
            statuses = await asyncio.gather(*(complete(client, gateway.url) for client in fresh))
        finally:
            await asyncio.gather(*(client.close() for client in fresh))
        assert statuses == [200] * 40
        total = await summed_value(
            http, f"{gateway.url}/metrics", "gateway_requests_total", 40, model=CHAT_MODEL, status_class="2xx"
        )
        assert total == 40


async def test_a_dead_worker_is_replaced(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with gateway_process(configured(tmp_path, backend), "--workers", "2") as gateway:
        await _until(lambda: gateway.log_text().count("serving on") == 2)
        victim = gateway.children()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = gateway.children()
            if len(children) == 2 and victim not in children:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the dead worker was not replaced")
        await _until(lambda: gateway.log_text().count("serving on") == 3)  # the new one too
        assert [await complete(http, gateway.url) for _ in range(10)] == [200] * 10
        assert "starting a new one" in gateway.log_text()


async def test_a_killed_workers_requests_still_count_and_its_streams_end(
    backend: Server, tmp_path: Path
) -> None:
    """Totals never go back when a worker dies; what it had in flight no longer is."""
    async with gateway_process(configured(tmp_path, backend), "--workers", "2") as gateway:
        await _until(lambda: gateway.log_text().count("serving on") == 2)
        port = int(gateway.url.rsplit(":", 1)[1])
        metrics = f"{gateway.url}/metrics"
        async with (
            aiohttp.ClientSession() as client,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as scraper,
        ):
            assert await complete(client, gateway.url) == 200
            victim = serving_process(port, client_port(client), gateway.children())
            stream = await open_stream(client, gateway.url, chunks=300, delay=0.1)  # on the same connection
            assert await summed_value(scraper, metrics, "gateway_streams_in_flight", 1) == 1
            os.kill(victim, signal.SIGKILL)
            replaced = lambda: len(gateway.children()) == 2 and victim not in gateway.children()  # noqa: E731
            await _until(replaced, timeout=20)
            stream.close()
            assert await summed_value(scraper, metrics, "gateway_streams_in_flight", 0) == 0
            finished = await summed_value(
                scraper, metrics, "gateway_requests_total", 1, model=CHAT_MODEL, status_class="2xx"
            )
            assert finished == 1, "the dead worker's answered request still counts"


async def test_workers_exit_when_the_supervisor_is_killed(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with gateway_process(configured(tmp_path, backend), "--workers", "2") as gateway:
        await _until(lambda: gateway.log_text().count("serving on") == 2)
        workers = gateway.children()
        gateway.process.kill()
        await _until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=20)
        assert gateway.log_text().count("is gone; draining and exiting") == 2


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_drains_in_flight_streams_then_exits_0(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, workers: str
) -> None:
    async with gateway_process(configured(tmp_path, backend), "--workers", workers) as gateway:
        response = await open_stream(http, gateway.url, chunks=8, delay=0.25)
        gateway.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await complete(fresh, gateway.url)
        rest = await response.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), "the stream ran to its end"
        assert await exited(gateway.process, 10)
        assert gateway.process.returncode == 0


async def test_drain_timeout_bounds_the_wait(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = configured(tmp_path, backend)
    document = yaml.safe_load(config.read_text())
    document["timeouts"]["shutdown_seconds"] = 1
    write_yaml(config, document)
    async with gateway_process(config) as gateway:
        response = await open_stream(http, gateway.url, chunks=100, delay=0.2)
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert await exited(gateway.process, 10)
        assert gateway.process.returncode == 0
        assert time.monotonic() - started < 6
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


def add_endpoint(config: Path, model: str, api_url: str) -> None:
    endpoints = config.parent / "endpoints.yaml"
    entries = yaml.safe_load(endpoints.read_text())
    write_yaml(endpoints, [*entries, endpoint("local", model, api_url)])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_reload_serves_new_endpoints_without_dropping_a_stream(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, workers: str
) -> None:
    config = configured(tmp_path, backend, pid_file="gateway.pid")
    async with gateway_process(config, "--workers", workers) as gateway:
        assert await complete(http, gateway.url, model="new/Model-1") == 404
        response = await open_stream(http, gateway.url, chunks=10, delay=0.2)
        add_endpoint(config, "new/Model-1", f"{backend.url}/v1")
        reload = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "reload", "--config", str(config), cwd=ROOT
        )
        assert await reload.wait() == 0
        await _until(lambda: gateway.log_text().count("reloaded:") == int(workers))
        for _ in range(6):
            assert await complete(http, gateway.url, model="new/Model-1") == 200
        rest = await response.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), "the stream begun before the reload ended normally"
        assert await complete(http, gateway.url) == 200


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_broken_reload_is_refused_and_the_old_configuration_stays(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, workers: str
) -> None:
    config = configured(tmp_path, backend)
    async with gateway_process(config, "--workers", workers) as gateway:
        endpoints = config.parent / "endpoints.yaml"
        entries = yaml.safe_load(endpoints.read_text())
        entries[0]["endpoint_adapter"] = "adaptors.nowhere.Endpoint"
        write_yaml(endpoints, entries)
        gateway.process.send_signal(signal.SIGHUP)
        await _until(lambda: "reload refused" in gateway.log_text())
        log = gateway.log_text()
        assert "endpoints.yaml, entry 1" in log and "endpoint_adapter" in log
        assert await complete(http, gateway.url) == 200
        assert gateway.process.poll() is None


async def _until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


async def test_workers_enforce_one_rate_limit_through_redis(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession, redis_url: str
) -> None:
    """Alone, each worker would admit its own burst; with Redis the two admit one between them."""
    config = configured(tmp_path, backend)
    document = yaml.safe_load(config.read_text())
    document["redis_url"] = redis_url
    document["limits"] = {"requests_per_second": 0.01, "burst": 6, "concurrent_per_user": 0}
    write_yaml(config, document)
    async with gateway_process(config, "--workers", "2") as gateway:
        await _until(lambda: gateway.log_text().count("serving on") == 2)
        port = int(gateway.url.rsplit(":", 1)[1])
        clients, first, served_by = [], [], set()
        try:
            while (len(served_by) < 2 or len(clients) < 10) and len(clients) < 200:
                client = aiohttp.ClientSession()
                clients.append(client)
                first.append(await complete(client, gateway.url))
                served_by.add(serving_process(port, client_port(client), gateway.children()))
            again = await asyncio.gather(*(complete(client, gateway.url) for client in clients))
        finally:
            await asyncio.gather(*(client.close() for client in clients))
        assert len(served_by) == 2, "both workers took connections"
        assert first.count(200) == 6, "one burst of 6, spent across both workers"
        assert set(again) == {429}


def client_port(client: aiohttp.ClientSession) -> int:
    """The local port of the client's one kept-alive connection."""
    connector = client.connector
    assert connector is not None
    (protocols,) = connector._conns.values()  # aiohttp has no public view of idle connections
    transport = protocols[0][0].transport
    assert transport is not None
    port: int = transport.get_extra_info("sockname")[1]
    return port


def serving_process(server_port: int, peer_port: int, pids: list[int]) -> int:
    """Which process holds the server side of a loopback connection, from /proc."""
    wanted = f":{server_port:04X} "
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted.strip()) and fields[2].endswith(f":{peer_port:04X}"):
            inode = fields[9]
    assert inode is not None, "the connection is not in /proc/net/tcp"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    raise AssertionError("no worker holds the connection")
