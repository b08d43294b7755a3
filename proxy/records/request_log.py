"""One record per request: a JSON line on stdout for operators, and a row in the database for usage reports.

Both paths sit next to the request path, so neither may slow it down much or fail it:

- ``LineWriter`` writes each record as one line to a file descriptor (stdout by default). Several gateway
  worker processes usually share that stdout pipe, and a write to a pipe is only atomic up to PIPE_BUF
  (4 kB on Linux) while a record carrying a prompt can be far larger; so lines leave together in writes
  of at most PIPE_BUF (64 kB to a regular file) when the caller flushes them
  (``proxy.core.recorder.Recorder`` does every ``RECORD_DELAY_SECONDS``), a longer line alone, each
  write under an exclusive ``flock`` on a lock file all the processes open: lines never tear into each
  other.
- ``RecordSink`` hands records to a background task that writes them in batches through
  ``proxy.records.usage_store.UsageStore``. ``submit`` only appends to a bounded in-memory buffer; while the
  database is unavailable the records wait there, and they are written, oldest first, when it returns.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import select
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Final

import orjson

from proxy.records.database import DatabaseUnavailable
from proxy.records.storable import storable

if TYPE_CHECKING:
    from proxy.records.usage_store import UsageStore

log = logging.getLogger(__name__)

STDOUT: Final = 1
LOG_EVERY: Final = 1000  # repeated failures are logged the first time and then every LOG_EVERY times
FIRST_RETRY_SECONDS: Final = 0.05
RECORD_DELAY_SECONDS: Final = 0.05
"""How long a record may wait for others to be built and written with it."""


_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""For the rare line orjson refuses; built once, as json.dumps with options builds one per call."""


@dataclass
class RequestRecord:
    request_id: str  # with started_at, the database key (a client may reuse its X-Request-ID)
    started_at: float  # epoch seconds
    duration_ms: float
    ttfc_ms: float | None  # time to the first chunk, for streams
    method: str
    route: str  # the route template, e.g. "/resource_server/{cluster}/{framework}/v1/{openai_path}"
    path: str
    status: int
    user_id: str | None
    username: str | None
    cluster: str | None
    framework: str | None
    model: str | None
    endpoint_slug: str | None
    stream: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    task_id: str | None
    client_ip: str | None
    error: str | None
    prompt: str | None = None  # only when the operator configures storing prompts and results
    result: str | None = None
    usage_estimated: bool = False  # the stream ended before the backend reported its usage

    def as_json_line(self) -> bytes:
        """Compact JSON ending in one newline. JSON escapes every control character, so the only newline
        is the last byte; text stays readable UTF-8. orjson writes it ten times faster than the standard
        library, which a busy gateway notices; it refuses a lone surrogate (undecodable client input),
        which the standard library then writes as the JSON escape ``\\udcXX``."""
        try:
            return orjson.dumps(vars(self), option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            text = _LINE_ENCODER.encode(vars(self))
            return text.encode("utf-8", "backslashreplace") + b"\n"


# --- stdout -------------------------------------------------------------------------------------------


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


# --- database -----------------------------------------------------------------------------------------


class RecordSink:
    """Records go to the database in batches, from a buffer that outlives database outages.

    ``submit`` appends records to a buffer of at most ``max_buffered`` (call it on the event loop's
    thread). A background task writes full batches of ``batch_size`` as soon as they fill up, and
    whatever is buffered every ``flush_seconds``. While the database is unavailable the task retries with
    a backoff growing to ``retry_seconds``, and records keep accumulating; once the buffer is full, new
    records are dropped and counted in ``dropped`` (better to lose usage rows than the gateway's memory).
    A batch the database refuses for another reason (a bug) is retried one record at a time, so one bad
    record costs only itself; those are counted in ``rejected``.

    Batches hold up to a thousand records: every commit copies each index page it touched into
    SQLite's write-ahead log, so a commit per record would cost far more, while a much larger batch
    keeps the database's thread busy (and taking turns at the GIL) long enough to show in request
    latencies.
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        max_buffered: int = 10_000,
        batch_size: int = 1000,
        flush_seconds: float = 2.0,
        retry_seconds: float = 5.0,
        close_timeout: float = 10.0,
    ) -> None:
        if max_buffered < 1 or batch_size < 1 or flush_seconds <= 0 or retry_seconds <= 0:
            raise ValueError("max_buffered, batch_size, flush_seconds and retry_seconds must be positive")
        self._store = store
        self._max_buffered = max_buffered
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._retry_seconds = retry_seconds
        self._close_timeout = close_timeout
        self.dropped = 0
        self.rejected = 0
        self.written = 0
        self._buffer: deque[RequestRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._dropping = False
        self._down_since: float | None = None
        self._retry_delay = min(FIRST_RETRY_SECONDS, retry_seconds)

    @property
    def buffered(self) -> int:
        """Records waiting to be written (including a batch being written right now)."""
        return len(self._buffer)

    def submit(self, records: Sequence[RequestRecord]) -> None:
        """Queue ``records`` for the database; never blocks, never raises."""
        room = 0 if self._closing else self._max_buffered - len(self._buffer)
        if len(records) > room:
            self._drop(len(records) - room)
            records = records[:room]
        self._buffer.extend(records)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    def start(self) -> None:
        """Start the background writer on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="request-record-sink")

    async def close(self, timeout: float | None = None) -> None:
        """Write what is buffered, for at most ``timeout`` seconds (default: ``close_timeout``); records
        still unwritten then (the database is down) are counted as dropped. Later submits are dropped."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="request-record-sink")
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=self._close_timeout if timeout is None else timeout)
        if not done:
            task.cancel()
            await asyncio.wait({task})
        if self._buffer:
            log.warning("request records: %d not written to the database at shutdown", len(self._buffer))
            self.dropped += len(self._buffer)
            self._buffer.clear()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if not self._dropping:
            self._dropping = True
            log.warning(
                "request records: buffer full (%d) or sink closed, dropping records (%d dropped so far)",
                len(self._buffer),
                self.dropped,
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._flush_seconds
        while not (self._closing and not self._buffer):
            await self._wait(due - loop.time())
            everything = self._closing or loop.time() >= due
            if everything:
                due = loop.time() + self._flush_seconds
            if not await self._write(everything):
                await self._back_off()

    async def _wait(self, timeout: float) -> None:
        """Until a batch is full, the flush is due, or close() is called."""
        if self._closing or len(self._buffer) >= self._batch_size or timeout <= 0:
            return
        self._wake.clear()
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _write(self, everything: bool) -> bool:
        """Write full batches (and, with ``everything``, the partial rest), oldest first; False when the
        database is unavailable, with the unwritten records still buffered in order."""
        try:
            while len(self._buffer) >= self._batch_size or (everything and self._buffer):
                await self._write_head(min(len(self._buffer), self._batch_size))
        except DatabaseUnavailable as exc:
            self._note_outage(exc)
            return False
        except Exception:
            log.exception("request records: writing failed unexpectedly; retrying")
            return False
        self._note_success()
        return True

    async def _write_head(self, count: int) -> None:
        """Write the first ``count`` buffered records and remove them from the buffer. Only this task
        removes records and submit only appends, so the head is still the same after the await."""
        batch = list(islice(self._buffer, count))
        try:
            await self._store.add_many(batch)
        except DatabaseUnavailable:
            raise
        except Exception:
            log.exception("request records: a batch of %d was refused; writing them one by one", count)
            await self._write_singly(batch)
            return
        for _ in batch:
            self._buffer.popleft()
        self.written += len(batch)

    async def _write_singly(self, batch: list[RequestRecord]) -> None:
        """A record refused as it is goes in once more with its text escaped and its numbers in
        range: a record is never lost for what a client or a backend put in it."""
        for record in batch:
            try:
                try:
                    await self._store.add_many([record])
                except DatabaseUnavailable:
                    raise
                except Exception:
                    await self._store.add_many([storable(record)])
            except DatabaseUnavailable:
                raise
            except Exception:
                self.rejected += 1
                log.exception(
                    "request records: record %s refused by the database, dropped", record.request_id
                )
            else:
                self.written += 1
            self._buffer.popleft()

    async def _back_off(self) -> None:
        await asyncio.sleep(self._retry_delay)
        self._retry_delay = min(self._retry_delay * 2, self._retry_seconds)

    def _note_outage(self, exc: DatabaseUnavailable) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "request records: database unavailable, buffering (%d buffered): %s", len(self._buffer), exc
            )

    def _note_success(self) -> None:
        if self._down_since is not None:
            log.info(
                "request records: database back after %.1f s, %d still buffered",
                time.monotonic() - self._down_since,
                len(self._buffer),
            )
            self._down_since = None
        self._retry_delay = min(FIRST_RETRY_SECONDS, self._retry_seconds)
        self._dropping = False
