"""A real, throw-away PostgreSQL server on a free 127.0.0.1 port, for tests.

The same reason as for ``tests/redis_server.py``: only the real server shows how the gateway's SQL, its
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
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import pytest

from tests.processes import became_ready, stop

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
OS_USER = "postgres"
SHM = "/dev/shm"
SHM_MIN_FREE = 1 << 30
MISSING_MESSAGE = (
    "PostgreSQL server binaries (initdb, postgres) are not installed. The tests need a real PostgreSQL: "
    "install the Debian package `postgresql` (apt-get install -y postgresql), as .ci/run does on a fresh "
    "machine; its binaries live in /usr/lib/postgresql/<version>/bin, off PATH."
)
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _free_port() -> int:
    """An ephemeral port nobody listens on right now (the small race is handled by retrying in start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


class PostgresServer:
    """One postgres process; ``stop()`` and ``start()`` keep the port and the data."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)  # logs, written through our file descriptor
        self.port = 0
        self._root: Path | None = None  # data directory and socket directory, owned by the postgres user
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        if not self.port:
            raise RuntimeError("PostgresServer is not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Create the cluster on first use; start on a free port (or the previous one after a stop) and
        wait until it answers queries."""
        if self.running:
            return
        if self._root is None:
            await asyncio.to_thread(self._initdb)
        if self.port:
            await self._launch(self.port)
            return
        for attempt in range(3):
            try:
                await self._launch(_free_port())
                return
            except RuntimeError:
                self.port = 0
                if attempt == 2:
                    raise

    async def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, committed data is kept, the port refuses connections."""
        process, self._process = self._process, None
        await stop(process, signal.SIGINT, STOP_TIMEOUT)

    async def restart(self) -> None:
        """PostgreSQL goes away and comes back on the same port, with its data."""
        await self.stop()
        await self.start()

    async def create_database(self, name: str) -> str:
        """A fresh, empty database (one per test keeps tests independent); its URL."""
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use lowercase letters, digits and underscores")
        connection = await asyncpg.connect(self.url, timeout=READY_TIMEOUT)
        # FILE_COPY (PostgreSQL 15+) copies the template's files instead of logging every page: faster here.
        strategy = " STRATEGY = FILE_COPY" if connection.get_server_version().major >= 15 else ""
        try:
            await connection.execute(f'CREATE DATABASE "{name}"{strategy}')
        finally:
            await connection.close()
        return self.database_url(name)

    async def drop_database(self, name: str) -> None:
        """Drop a test's database, cutting any connection it left open (its disk space adds up)."""
        connection = await asyncpg.connect(self.url, timeout=READY_TIMEOUT)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        """Stop and delete the data: the server cannot be started again."""
        await self.stop()
        root, self._root = self._root, None
        if root is not None:
            await asyncio.to_thread(shutil.rmtree, root, True)

    async def __aenter__(self) -> PostgresServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cleanup()

    def _initdb(self) -> None:
        bin_dir, run_as = _bin_dir(), _run_as()
        self.directory.mkdir(parents=True, exist_ok=True)
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
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"initdb failed ({done.returncode}); its log:\n{tail}")
        self._root = root

    async def _launch(self, port: int) -> None:
        assert self._root is not None
        log_path = self.directory / f"postgres-{port}.log"
        command = [str(_bin_dir() / "postgres"), "-D", str(self._root / "data"), "-p", str(port)]
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self._root / "socket"),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "logging_collector": "off",
        }
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._root,
                **_run_as(),
            )
        self._process, self.port = process, port
        if await became_ready(process, lambda: _accepts_queries(port), READY_TIMEOUT):
            return
        await self.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"postgres on port {port} did not accept queries; its log:\n{tail}")


async def start_postgres(tmp_dir: Path) -> PostgresServer:
    """Start a server in ``tmp_dir``; the caller must ``await server.cleanup()`` (or use ``async with``)."""
    server = PostgresServer(tmp_dir)
    await server.start()
    return server
