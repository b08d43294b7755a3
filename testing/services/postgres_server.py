"""A real, throw-away PostgreSQL server on a free 127.0.0.1 port, for tests.

The same reason as for ``redis_server.py``: only the real server shows how the gateway's SQL, its
locks and its reconnects behave, including when the server goes away and comes back. Unlike Redis the data
survives ``stop()`` and ``start()`` (same port, same data directory), which is what "no data lost" needs.

PostgreSQL refuses to run as root, and the tests run as root in CI: then initdb and postgres run as the
``postgres`` OS user, in a fresh temporary directory that user owns (pytest's own temporary directories
are private to root), under /dev/shm when that is a roomy tmpfs, else under /tmp. Durability is switched
off (fsync, synchronous_commit, full_page_writes): a crashed test machine loses nothing anyone wants.

    async with PostgresServer(tmp_path) as postgres_server:
        url = await postgres_server.create_database("test_one")
        ...
        await postgres_server.stop()
        await postgres_server.start()
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest

from testing.services.base import LOG_TAIL_CHARS, ServiceError, ServiceProcess

OS_USER: Final = "postgres"
SHM: Final = "/dev/shm"
SHM_MIN_FREE: Final = 1 << 30
MISSING_MESSAGE: Final = (
    "PostgreSQL server binaries (initdb, postgres) are not installed. The tests need a real PostgreSQL: "
    "install the Debian package `postgresql` (apt-get install -y postgresql), as .ci/run does on a fresh "
    "machine; its binaries live in /usr/lib/postgresql/<version>/bin, off PATH."
)
_DATABASE_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SETTINGS: Final = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "logging_collector": "off",
}


def _bin_dir() -> Path:
    """Debian's versioned directory (newest version first), else initdb on PATH; missing fails loudly."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(on_path)
    for initdb in candidates:
        directory = Path(initdb).parent
        if (directory / "postgres").exists():
            return directory
    pytest.fail(MISSING_MESSAGE, pytrace=False)


def _version(initdb: str) -> tuple[int, ...]:
    parts = Path(initdb).parent.parent.name.split(".")
    return tuple(int(part) for part in parts if part.isdigit())


def _scratch_parent() -> str | None:
    """Where the cluster lives: a roomy tmpfs when there is one, since on a slow disk each CREATE DATABASE
    waits a quarter of a second for page writeback even with fsync off; else the temporary directory.
    Docker's default 64 MB /dev/shm is too small (and PostgreSQL needs it for shared memory): skipped."""
    try:
        shm = os.statvfs(SHM)
    except OSError:
        return None
    return SHM if shm.f_bavail * shm.f_frsize >= SHM_MIN_FREE and os.access(SHM, os.W_OK) else None


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root to the postgres user; nothing when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        pytest.fail(
            f"running as root, but there is no `{OS_USER}` user to run PostgreSQL as. {MISSING_MESSAGE}"
        )
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


async def _accepts_queries(port: int) -> bool:
    """Listening is not enough: a starting server refuses sessions ("the database system is starting up")."""
    try:
        connection = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", timeout=1.0)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    try:
        answer: object = await connection.fetchval("SELECT 1")
        return answer == 1
    finally:
        await connection.close()


class PostgresServer(ServiceProcess):
    """One postgres process; ``stop()`` and ``start()`` keep the port and the data. Stopped with SIGINT,
    PostgreSQL's fast shutdown: sessions are cut, committed data is kept, the port refuses connections."""

    name = "postgres"
    ready_timeout = 15.0
    stop_timeout = 10.0
    stop_signal = signal.SIGINT

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)  # logs, written through our file descriptor
        self._root: Path | None = None  # data directory and socket directory, owned by the postgres user

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        if not self.port:
            raise RuntimeError("PostgresServer is not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    async def create_database(self, name: str) -> str:
        """A fresh, empty database (one per test keeps tests independent); its URL."""
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and underscores")
        connection = await asyncpg.connect(self.url, timeout=self.ready_timeout)
        # FILE_COPY (PostgreSQL 15+) copies the template's files instead of logging every page: faster here.
        strategy = " STRATEGY = FILE_COPY" if connection.get_server_version().major >= 15 else ""
        try:
            await connection.execute(f'CREATE DATABASE "{name}"{strategy}')
        finally:
            await connection.close()
        return self.database_url(name)

    async def drop_database(self, name: str) -> None:
        """Drop a test's database, cutting any connection it left open (its disk space adds up)."""
        connection = await asyncpg.connect(self.url, timeout=self.ready_timeout)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    async def close(self) -> None:
        """Stop and delete the data: the server cannot be started again."""
        await self.stop()
        root, self._root = self._root, None
        if root is not None:
            await asyncio.to_thread(shutil.rmtree, root, True)

    async def prepare(self) -> None:
        """The cluster is created on first use."""
        if self._root is None:
            await asyncio.to_thread(self._initdb)

    def command(self, port: int) -> list[str]:
        assert self._root is not None
        command = [str(_bin_dir() / "postgres"), "-D", str(self._root / "data"), "-p", str(port)]
        settings = {**_SETTINGS, "unix_socket_directories": str(self._root / "socket")}
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self._root, **_run_as()}

    async def ready(self) -> bool:
        return await _accepts_queries(self.port)

    def _initdb(self) -> None:
        bin_dir, run_as = _bin_dir(), _run_as()
        root = Path(tempfile.mkdtemp(prefix="gateway-pg-", dir=_scratch_parent()))
        (root / "socket").mkdir()
        if run_as:
            for path in (root, root / "socket"):
                os.chown(path, run_as["user"], run_as["group"])
        command = [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "trust"]
        command += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        log_path = self.directory / "initdb.log"
        with log_path.open("ab") as log:
            done = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=root, check=False, **run_as
            )
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise ServiceError(f"initdb failed ({done.returncode}); its log:\n{tail}")
        self._root = root
