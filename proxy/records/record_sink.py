"""Request records into the database, in batches, from a buffer that outlives database outages.

Writing sits next to the request path, so it may neither slow a request down much nor fail it.
``RecordSink`` hands records to a background task that writes them in batches through
``proxy.records.usage_store.UsageStore``. ``submit`` only appends to a bounded in-memory buffer; while
the database is unavailable the records wait there, and they are written, oldest first, when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from itertools import islice
from typing import Final

from proxy.records.database import DatabaseUnavailable
from proxy.records.record import RequestRecord
from proxy.records.storable import storable
from proxy.records.usage_store import UsageStore

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS: Final = 0.05


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
