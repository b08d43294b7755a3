"""A throw-away nginx in front of the gateway, with the proxying rules the deployment ships.

The tests and the benchmark measure the real thing: the server block here only listens and includes
``deploy/nginx/gateway-locations.conf``, so every directive that matters is the deployed one. The
upstream is any list of ``host:port``: the gateway's ports, or, for the "nginx alone" benchmark, the
backend itself (the shipped rules do not depend on the gateway's base path).

    async with NginxServer(tmp_path / "nginx", ["127.0.0.1:8000"], port=free_port()) as nginx:
        ... requests to nginx.url ...
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Final

from testing.services.base import LOG_TAIL_CHARS, ServiceError, ServiceProcess

ROOT: Final = Path(__file__).resolve().parent.parent.parent
SHIPPED_LOCATIONS: Final = ROOT / "deploy" / "nginx" / "gateway-locations.conf"
SHIPPED_SITE: Final = ROOT / "deploy" / "nginx" / "inference-gateway.conf"
FALLBACK_BINARY: Final = Path("/usr/sbin/nginx")
"""Debian's nginx lives in /usr/sbin, which is not on an ordinary user's PATH."""
TEMP_PATHS: Final = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
MAX_OPEN_FILES: Final = 65536
MAX_CONNECTIONS: Final = 8192


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


class NginxServer(ServiceProcess):
    """nginx listening on ``host:port`` in front of ``upstreams``. Stopped with SIGQUIT, which lets
    workers finish the requests they hold; then SIGKILL to the whole session, workers included."""

    name = "nginx"
    ready_timeout = 10.0
    stop_timeout = 5.0
    stop_signal = signal.SIGQUIT
    own_session = True

    def __init__(
        self,
        directory: Path,
        upstreams: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        worker_processes: int = 1,
        locations: Path = SHIPPED_LOCATIONS,
    ) -> None:
        if not upstreams:
            raise ValueError("nginx needs at least one upstream host:port")
        super().__init__(Path(directory).resolve(), port)
        self.host = host
        self.url = f"http://{host}:{port}"
        self._upstreams, self._workers, self._locations = upstreams, worker_processes, locations

    @property
    def error_log(self) -> str:
        """For failure messages: what nginx complained about."""
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def prepare(self) -> None:
        config = top_level_config(
            self.directory,
            self._upstreams,
            port=self.port,
            host=self.host,
            worker_processes=self._workers,
            locations=self._locations,
        )
        (self.directory / "nginx.conf").write_text(config)

    def command(self, port: int) -> list[str]:
        """``-e`` sends even the messages logged before the configuration is read to the private log."""
        binary = nginx_binary()
        if binary is None:
            raise ServiceError("nginx is not installed (Debian: apt-get install -y nginx)")
        config, errors = self.directory / "nginx.conf", self.directory / "error.log"
        return [binary, "-p", str(self.directory), "-c", str(config), "-e", str(errors)]

    def log_path(self, port: int) -> Path:
        return self.directory / "stderr.log"

    def log_tail(self, port: int) -> str:
        texts = [(self.directory / name).read_text(errors="replace") for name in ("stderr.log", "error.log")]
        return "".join(texts)[-LOG_TAIL_CHARS:]

    async def ready(self) -> bool:
        """The master binds before it starts workers; a connection accepted into the backlog is served."""
        return await _accepts(self.host, self.port)


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return True
