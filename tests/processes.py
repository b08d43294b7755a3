"""The gateway and the fake backend as processes of their own, for tests that need a real process:
its signals, its workers, its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml

from testing.processes import children, stop_process

ROOT = Path(__file__).resolve().parent.parent


async def wait_until_serving(http: aiohttp.ClientSession, url: str, timeout: float = 20) -> None:
    """For gateways started as processes: their health route answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


class GatewayProcess:
    """`python -m proxy` as deployed; its stderr (the gateway's own log) kept in a file."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        """Its workers, with `--workers N`."""
        return children(self.process.pid)


@contextlib.asynccontextmanager
async def gateway_process(config: Path, *args: str, port: int | None = None) -> AsyncIterator[GatewayProcess]:
    """Serving once its health route answers (on `port`, or the configuration's); stopped with
    SIGTERM, its graceful shutdown, when the block ends, and any worker left behind killed."""
    if port is None:
        port = int(yaml.safe_load(config.read_text())["server"]["port"])
    else:
        args = (*args, "--port", str(port))
    log = config.parent / f"gateway-{time.monotonic_ns()}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=output,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until_serving(http, f"{gateway.url}/resource_server/health")
        assert process.poll() is None, f"the gateway exited: was port {port} taken meanwhile?"
        yield gateway
    finally:
        workers = _workers(gateway)
        await stop_process(process, signal.SIGTERM, 30)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _workers(gateway: GatewayProcess) -> list[int]:
    """The gateway's children except those in a session of their own: the local scheduler's jobs
    (pilots), which outlive their gateway as a real scheduler's would, for the next to adopt."""
    try:
        return [pid for pid in gateway.children() if os.getsid(pid) != pid]
    except OSError:
        return []


_BACKEND = """
import socket, sys
from aiohttp import web
from testing.fake_vllm import create_backend_app
from testing.loops import new_event_loop
listener = socket.socket(fileno=int(sys.argv[1]))
web.run_app(create_backend_app(models=sys.argv[2:]), sock=listener, access_log=None, print=None,
            handler_cancellation=True, loop=new_event_loop())
"""


@contextlib.asynccontextmanager
async def backend_process(*models: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """The fake backend (testing.fake_vllm) in a process of its own, on a socket bound here and handed
    over: a port picked free and bound later could be taken meanwhile by another test's server."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    with listener:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BACKEND, str(listener.fileno()), *models, pass_fds=[listener.fileno()],
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            await wait_until_serving(http, f"http://127.0.0.1:{port}/health")
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
