"""Request records as JSON lines on stdout, whole even when several processes share the pipe.

Writing sits next to the request path, so it may neither slow a request down much nor fail it.
``LineWriter`` writes each record as one line to a file descriptor (stdout by default). Several gateway
worker processes usually share that stdout pipe, and a write to a pipe is only atomic up to PIPE_BUF
(4 kB on Linux) while a record carrying a prompt can be far larger; so lines leave together in writes
of at most PIPE_BUF (64 kB to a regular file) when the caller flushes them
(``proxy.core.recorder.Recorder`` does every ``RECORD_DELAY_SECONDS``), a longer line alone, each
write under an exclusive ``flock`` on a lock file all the processes open: lines never tear into each
other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Final

from proxy.records.record import RequestRecord

log = logging.getLogger(__name__)

STDOUT: Final = 1
LOG_EVERY: Final = 1000  # repeated failures are logged the first time and then every LOG_EVERY times


def default_lock_path(fd: int) -> str:
    """The lock file every process writing to the same pipe, terminal or file agrees on without being told:
    keyed by the device and inode of what ``fd`` refers to, in the system temporary directory."""
    status = os.fstat(fd)
    return os.path.join(
        tempfile.gettempdir(), f"inference-gateway-log-{status.st_dev:x}-{status.st_ino}.lock"
    )


class LineWriter:
    """Writes whole lines to ``fd`` under an exclusive lock shared by every process writing there.

    ``flock`` belongs to an open file description, which a forked child shares with its parent; two
    processes holding the same one do not exclude each other. So the lock file is opened per process
    (again after a fork), and a thread lock covers threads of one process. A failed write is counted in
    ``failures`` and logged, never raised: the request it describes has already been served.
    """

    def __init__(self, fd: int = STDOUT, lock_path: str | os.PathLike[str] | None = None) -> None:
        self.fd = fd
        self.failures = 0
        self._lock_path = None if lock_path is None else os.fspath(lock_path)
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._threads = threading.Lock()
        self._warned_unlocked = False
        self._atomic_bytes = atomic_write_bytes(fd)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    @property
    def lock_path(self) -> str:
        if self._lock_path is None:
            self._lock_path = default_lock_path(self.fd)
        return self._lock_path

    def write(self, record: RequestRecord) -> None:
        """Lines wait until they fill one atomic write or ``flush`` is called: a write system call per
        request was a visible share of a busy gateway's time."""
        try:
            line = record.as_json_line()
        except Exception as exc:  # a field of a type json cannot encode: the caller's bug, not a crash
            self._failed(exc)
            return
        if self._pending_bytes + len(line) > self._atomic_bytes:
            self.flush()
        self._pending.append(line)
        self._pending_bytes += len(line)

    def flush(self) -> None:
        """Write the pending lines now: what one write puts down whole, or one longer line alone."""
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self.write_line(b"".join(pending))

    def write_line(self, line: bytes) -> None:
        """Write ``line`` (which should end in a newline) as one piece, however large. Even a write
        within PIPE_BUF, which POSIX makes atomic on a pipe, takes the lock: unlocked, it could land
        between the pieces of another process's longer line."""
        try:
            with self._threads, self._locked():
                _write_all(self.fd, line)
        except Exception as exc:
            self._failed(exc)

    def close(self) -> None:
        """Write what is pending and release the lock file; the file descriptor written to is the
        caller's and stays open."""
        self.flush()
        with self._threads:
            if self._lock_fd is not None and self._lock_pid == os.getpid():
                _close_quietly(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_fd = self._lock_file()
        if lock_fd is None:  # no lock file: a line that might tear beats a lost one
            yield
            return
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _lock_file(self) -> int | None:
        pid = os.getpid()
        if self._lock_fd is not None and self._lock_pid == pid:
            return self._lock_fd
        if self._lock_fd is not None:  # inherited over fork: it shares the parent's lock, so excludes nothing
            _close_quietly(self._lock_fd)
            self._lock_fd = None
        try:
            # Read-only is enough for flock, and lets processes of other users share a lock file one of
            # them created; O_NOFOLLOW keeps a symlink planted in /tmp from redirecting the open.
            flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._lock_fd = os.open(self.lock_path, flags, 0o644)
        except OSError as exc:
            if not self._warned_unlocked:
                self._warned_unlocked = True
                log.warning(
                    "request log lock file %s cannot be opened, writing unlocked: %s", self.lock_path, exc
                )
            return None
        self._lock_pid = pid
        return self._lock_fd

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % LOG_EVERY == 0:
            log.warning("request log line not written (%d failures so far): %s", self.failures, exc)


FILE_WRITE_BYTES: Final = 1 << 16


def atomic_write_bytes(fd: int) -> int:
    """How much one write to ``fd`` puts down whole whoever else writes there: PIPE_BUF on a pipe,
    socket or terminal; Linux writes to a regular file under its inode lock, so there lines can
    leave in larger pieces (a 4 kB write to a file cost a busy gateway about 16 µs of CPU)."""
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    return FILE_WRITE_BYTES if regular else select.PIPE_BUF


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out: a pipe takes a large write in pieces. A non-blocking ``fd``
    (someone set O_NONBLOCK on a shared stdout) is waited on rather than given up."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        view = view[written:]


def _close_quietly(fd: int) -> None:
    with suppress(OSError):
        os.close(fd)
