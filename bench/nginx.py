"""A throw-away nginx in front of the gateway, with the proxying rules the deployment ships.

The tests and the benchmark measure the real thing: the server block here only listens and includes
``deploy/nginx/gateway-locations.conf``, so every directive that matters is the deployed one. The
upstream is any list of ``host:port``: the gateway's ports, or, for the "nginx alone" benchmark, the
backend itself (the shipped rules do not depend on the gateway's base path).

    async with run_nginx(tmp_path / "nginx", ["127.0.0.1:8000"], port=free_port()) as nginx:
        ... requests to nginx.url ...
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.common import exited

ROOT: Final = Path(__file__).resolve().parent.parent
SHIPPED_LOCATIONS: Final = ROOT / "deploy" / "nginx" / "gateway-locations.conf"
SHIPPED_SITE: Final = ROOT / "deploy" / "nginx" / "inference-gateway.conf"
FALLBACK_BINARY: Final = Path("/usr/sbin/nginx")
"""Debian's nginx lives in /usr/sbin, which is not on an ordinary user's PATH."""
TEMP_PATHS: Final = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
MAX_OPEN_FILES: Final = 65536
MAX_CONNECTIONS: Final = 8192
READY_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0


class NginxError(RuntimeError):
    """nginx is missing, refused its configuration, or did not come up."""


def nginx_binary() -> str | None:
    """The nginx executable on PATH, else Debian's, else None."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    return str(FALLBACK_BINARY) if os.access(FALLBACK_BINARY, os.X_OK) else None


def _user_line() -> str:
    """A master started as root hands requests to workers running as `nobody`, who could not write the
    temp directories (request bodies) under a private test directory; as root the workers stay root.
    Otherwise nginx ignores the directive with a warning, so it is left out."""
    return "user root;\n" if os.geteuid() == 0 else ""


def _open_files() -> int:
    """The most files a worker may open: its connections count twice (client and upstream). nginx may
    raise its workers' limit up to the hard limit even when it does not run as root."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)


def top_level_config(
    directory: Path,
    upstreams: Sequence[str],
    *,
    port: int,
    host: str = "127.0.0.1",
    worker_processes: int = 1,
    locations: Path = SHIPPED_LOCATIONS,
    keepalive: int = 32,
) -> str:
    """A whole nginx.conf keeping every file nginx writes inside ``directory``."""
    servers = "".join(f"        server {upstream};\n" for upstream in upstreams)
    temp_paths = "".join(f"    {name}_temp_path {directory / name};\n" for name in TEMP_PATHS)
    open_files = _open_files()
    return (
        f"{_user_line()}"
        f"worker_processes {worker_processes};\n"
        f"worker_rlimit_nofile {open_files};\n"
        "daemon off;\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} notice;\n"
        f"events {{\n    worker_connections {min(MAX_CONNECTIONS, open_files // 2)};\n}}\n"
        "http {\n"
        f"    access_log {directory / 'access.log'};\n"
        f"{temp_paths}"
        "    upstream inference_gateway {\n"
        f"{servers}"
        f"        keepalive {keepalive};\n"
        "        keepalive_timeout 60s;\n"
        "    }\n"
        "    server {\n"
        f"        listen {host}:{port};\n"
        f"        include {locations};\n"
        "    }\n"
        "}\n"
    )


@dataclass(frozen=True)
class RunningNginx:
    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def error_log(self) -> str:
        """For failure messages: what nginx complained about."""
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@asynccontextmanager
async def run_nginx(
    directory: Path,
    upstreams: Sequence[str],
    *,
    port: int,
    host: str = "127.0.0.1",
    worker_processes: int = 1,
    locations: Path = SHIPPED_LOCATIONS,
) -> AsyncIterator[RunningNginx]:
    """nginx listening on ``host:port`` in front of ``upstreams``; stopped (SIGQUIT, then SIGKILL) on exit."""
    if not upstreams:
        raise ValueError("nginx needs at least one upstream host:port")
    binary = nginx_binary()
    if binary is None:
        raise NginxError("nginx is not installed (Debian: apt-get install -y nginx)")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(
        top_level_config(
            directory, upstreams, port=port, host=host, worker_processes=worker_processes, locations=locations
        )
    )
    process = _launch(binary, directory, config)
    try:
        await _wait_until_listening(process, directory, host, port)
        yield RunningNginx(url=f"http://{host}:{port}", directory=directory, process=process)
    finally:
        await _stop(process)


def _launch(binary: str, directory: Path, config: Path) -> subprocess.Popen[bytes]:
    """``-e`` sends even the messages logged before the configuration is read to the private log. A
    session of its own lets a stop reach the workers too, should the master have to be killed."""
    command = [binary, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
    with (directory / "stderr.log").open("ab") as stderr:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True
        )


async def _wait_until_listening(
    process: subprocess.Popen[bytes], directory: Path, host: str, port: int
) -> None:
    """The master binds before it starts workers; a connection accepted into the backlog is served."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NginxError(f"nginx exited with status {process.returncode}: {_complaints(directory)}")
        if await _accepts(host, port):
            return
        await asyncio.sleep(0.02)
    raise NginxError(f"nginx did not listen on {host}:{port} within {READY_TIMEOUT:g} s")


def _complaints(directory: Path) -> str:
    texts = [(directory / name).read_text(errors="replace") for name in ("stderr.log", "error.log")]
    return "".join(texts)[-2000:]


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return True


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGQUIT lets workers finish the requests they hold; SIGKILL if that takes too long."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGQUIT)
    if not await exited(process, STOP_TIMEOUT):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await exited(process, STOP_TIMEOUT)
