"""Re-reading endpoints and clusters while serving (SIGHUP or `inference-gateway reload`).

The new files are loaded and their adaptors started before anything changes; a broken file is
refused with one log line and the running configuration stays. Requests already in flight keep
the adaptors they started with; those are shut down when the last such request ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from adaptors import AdaptorContext
from proxy.jobs import JobsCache
from proxy.registry import Registry, load_registry
from proxy.settings import ConfigError

log = logging.getLogger("proxy.reload")


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
        self._running: set[asyncio.Task[bool]] = set()
        self._lock = asyncio.Lock()

    def reload_soon(self) -> None:
        """For a signal handler: the reload runs as a task, kept until it ends."""
        task = asyncio.ensure_future(self.reload())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def reload(self) -> bool:
        async with self._lock:
            try:
                new = await asyncio.to_thread(load_registry, *self._files)
            except ConfigError as exc:
                log.error("reload refused; still serving the previous endpoints and clusters:\n%s", exc)
                return False
            if not await self._started(new):
                return False
            old = self._registry.replace(new)
            self._jobs.clear()
            task = asyncio.ensure_future(_retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("reloaded: %d clusters, %d endpoints", len(new.clusters), len(new.endpoints))
            return True

    async def _started(self, new: Registry) -> bool:
        if self.context is None:
            log.error("reload refused: the gateway has not finished starting")
            return False
        adaptors = list(new.adaptors())
        results = await asyncio.gather(*(a.startup(self.context) for a in adaptors), return_exceptions=True)
        failed = [(a, r) for a, r in zip(adaptors, results, strict=True) if isinstance(r, BaseException)]
        if not failed:
            return True
        for adaptor, error in failed:
            log.error("reload refused: %s failed to start: %s", type(adaptor).__name__, error)
        await shut_down(new)
        return False

    async def close(self) -> None:
        """At exit, generations still retiring are shut down without waiting for their requests,
        which the server has already drained or cancelled."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)


async def _retire(old: Registry) -> None:
    try:
        await old.leases.idle()
    finally:
        await shut_down(old)


async def shut_down(registry: Registry) -> None:
    await asyncio.gather(*(adaptor.shutdown() for adaptor in registry.adaptors()), return_exceptions=True)


RELOADER = web.AppKey("reloader", Reloader)


async def reload_on_sighup(app: web.Application) -> None:
    """Installed by the command line only: tests and embedders keep their own signal handling."""
    reloader = app[RELOADER]
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.reload_soon)


def signal_reload(pid_file: Path) -> int:
    """`inference-gateway reload`: what systemd's ExecReload does, for those without systemd."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"{pid_file}: no running gateway to reload ({exc})", file=sys.stderr)
        return 1
    print(f"asked the gateway (pid {pid}) to reload endpoints and clusters; its log says whether it did")
    return 0
