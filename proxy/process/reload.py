"""Re-reading endpoints and clusters while serving (SIGHUP or `inference-gateway reload`).

The new files are loaded and their adaptors started before anything changes; a broken file is
refused with one log line and the running configuration stays. Requests already in flight keep
the adaptors they started with; those are shut down when the last such request ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from adaptors import AdaptorContext
from proxy.core.jobs import JobsCache
from proxy.core.registry import Registry, load_registry
from proxy.process.reload_report import Outcome, record_outcome
from proxy.settings.files import ConfigError

log = logging.getLogger("proxy.process.reload")


class Reloader:
    def __init__(
        self, registry: Registry, jobs: JobsCache, endpoints_file: Path, clusters_file: Path
    ) -> None:
        self._registry = registry
        self._jobs = jobs
        self._files = (endpoints_file, clusters_file)
        self.context: AdaptorContext | None = None
        """Set once the adaptors have started; the new generation starts with the same one."""
        self._retiring: set[asyncio.Task[None]] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def reload_soon(self, report: Path | None = None) -> None:
        """For a signal handler: the reload runs as a task, kept until it ends; its outcome is
        appended to `report` (for `inference-gateway reload`) when given."""
        task = asyncio.ensure_future(self._reload_and_report(report))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _reload_and_report(self, report: Path | None) -> None:
        outcome = await self.reload()
        if report is not None:
            record_outcome(report, outcome)

    async def reload(self) -> Outcome:
        async with self._lock:
            try:
                new = await asyncio.to_thread(load_registry, *self._files)
            except ConfigError as exc:
                log.error("reload refused; still serving the previous endpoints and clusters:\n%s", exc)
                return Outcome(False, f"reload refused:\n{exc}")
            refusal = await self._started(new)
            if refusal is not None:
                return Outcome(False, refusal)
            old = self._registry.replace(new)
            self._jobs.clear()
            task = asyncio.ensure_future(_retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            message = f"reloaded: {len(new.clusters)} clusters, {len(new.endpoints)} endpoints"
            log.info("%s", message)
            return Outcome(True, message)

    async def _started(self, new: Registry) -> str | None:
        """None once every new adaptor has started, else why the reload is refused."""
        if self.context is None:
            log.error("reload refused: the gateway has not finished starting")
            return "reload refused: the gateway has not finished starting"
        adaptors = list(new.adaptors())
        results = await asyncio.gather(*(a.startup(self.context) for a in adaptors), return_exceptions=True)
        failed = [(a, r) for a, r in zip(adaptors, results, strict=True) if isinstance(r, BaseException)]
        if not failed:
            return None
        reasons = [
            f"reload refused: {type(adaptor).__name__} failed to start: {error}" for adaptor, error in failed
        ]
        for reason in reasons:
            log.error("%s", reason)
        await shut_down(new)
        return "\n".join(reasons)

    async def close(self) -> None:
        """At exit, generations still retiring are shut down without waiting for their requests,
        which the server has already drained or cancelled."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)


async def _retire(old: Registry) -> None:
    try:
        await old.holds.idle()
    finally:
        await shut_down(old)


async def shut_down(registry: Registry) -> None:
    await asyncio.gather(*(adaptor.shutdown() for adaptor in registry.adaptors()), return_exceptions=True)


def sighup_reloads(reloader: Reloader, report: Path | None) -> Callable[[web.Application], Awaitable[None]]:
    """A startup hook that makes SIGHUP reload; `report` receives each reload's outcome."""

    async def install(_: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload_soon, report)

    return install
