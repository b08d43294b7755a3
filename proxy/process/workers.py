"""`--workers N`: N gateway processes serving one listening socket.

The supervisor binds the socket once and hands it to each worker, so the kernel gives each
connection to whichever worker accepts first: a busy worker simply accepts less. Workers are
fresh interpreters (not forks) and share their metrics through the directory in
PROMETHEUS_MULTIPROC_DIR, so a scrape of any worker sums them all. The supervisor serves
nothing itself: it forwards SIGTERM (drain and exit) and SIGHUP (reload), replaces a worker that
dies, and gives up when workers keep dying at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.metrics import tally

log = logging.getLogger("proxy.process.workers")

RESTART_DELAY_SECONDS = 1.0
EARLY_DEATH_SECONDS = 5.0
"""A worker that dies sooner than this after starting probably cannot start at all."""
MAX_EARLY_DEATHS = 5
SUPERVISOR_ENV = "INFERENCE_GATEWAY_SUPERVISOR"
"""Tells a worker its supervisor's pid: a worker started just as the supervisor died already has
another parent, and must not take that one for its supervisor."""


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def metrics_directory() -> Path:
    """Shared by the workers; emptied at start, or an earlier run's counts would be added in."""
    configured = os.environ.get(tally.SHARED_DIRECTORY_ENV)
    directory = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    tally.clear(directory)
    return directory


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(
        self,
        count: int,
        command: Sequence[str],
        sock: socket.socket,
        metrics_dir: Path,
        config_is_valid: Callable[[], bool],
    ) -> None:
        self._count = count
        self._command = [*command, "--listen-fd", str(sock.fileno())]
        self._sock = sock
        self._env = {
            **os.environ,
            tally.SHARED_DIRECTORY_ENV: str(metrics_dir),
            SUPERVISOR_ENV: str(os.getpid()),
        }
        self._metrics_dir = metrics_dir
        self._config_is_valid = config_is_valid
        self._workers: dict[int, Worker] = {}
        self._stopping = asyncio.Event()
        self._early_deaths = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for slot in range(self._count):
            await self._start(slot)
        log.info("%d workers serving (pids %s)", self._count, self._pids())
        await self._watch()
        return await self._stop()

    async def _start(self, slot: int) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._command, pass_fds=(self._sock.fileno(),), env=self._env
        )
        self._workers[slot] = Worker(process)

    async def _watch(self) -> None:
        """Until asked to stop: replace each worker that dies."""
        while not self._stopping.is_set():
            exits = {asyncio.ensure_future(w.process.wait()): slot for slot, w in self._workers.items()}
            stop = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
            for waiter in [stop, *exits]:
                if waiter not in done:
                    waiter.cancel()
            for waiter in done - {stop}:
                if not self._stopping.is_set() and not await self._replace(exits[waiter]):
                    self._stopping.set()

    async def _replace(self, slot: int) -> bool:
        worker = self._workers[slot]
        pid, code = worker.process.pid, worker.process.returncode
        self._forget(pid)
        if time.monotonic() - worker.started < EARLY_DEATH_SECONDS:
            self._early_deaths += 1
            if self._early_deaths >= MAX_EARLY_DEATHS:
                log.error("workers keep dying at start-up (last: pid %d, exit %s); giving up", pid, code)
                return False
        log.warning("worker pid %d exited with %s; starting a new one", pid, code)
        await asyncio.sleep(RESTART_DELAY_SECONDS)
        await self._start(slot)
        return True

    def _reload(self) -> None:
        """Checked here first so that a broken file is refused once, with one clear log line."""
        if not self._config_is_valid():
            return
        log.info("reloading endpoints and clusters in %d workers", len(self._workers))
        for worker in self._workers.values():
            worker.process.send_signal(signal.SIGHUP)

    async def _stop(self) -> int:
        """Each worker drains its own requests; the supervisor waits for all of them. A worker
        still starting dies of the signal itself (-SIGTERM), with nothing in flight: a clean stop."""
        self._sock.close()
        running = [w.process for w in self._workers.values() if w.process.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(process.wait() for process in running))
        for process in running:
            self._forget(process.pid)
        failed = [code for code in codes if code not in (0, -signal.SIGTERM)]
        if failed or self._early_deaths >= MAX_EARLY_DEATHS:
            log.error("stopped; workers exited with %s", codes)
            return 1
        log.info("stopped; all workers drained")
        return 0

    def _forget(self, pid: int) -> None:
        """A dead worker's gauges must not be summed into later scrapes."""
        tally.forget_gauges(self._metrics_dir, pid)

    def _pids(self) -> str:
        return ", ".join(str(w.process.pid) for w in self._workers.values())


def worker_command(argv: Sequence[str]) -> list[str]:
    """The same command line, minus `--workers`, as a fresh interpreter."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return [sys.executable, "-m", "proxy", *kept]


def exit_with_supervisor() -> asyncio.Task[None]:
    """A worker whose supervisor vanished (killed with SIGKILL) drains and exits instead of
    serving on, unsupervised, forever."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV, os.getppid()))

    async def watch() -> None:
        while os.getppid() == supervisor:
            await asyncio.sleep(1.0)
        log.warning("supervisor %d is gone; draining and exiting", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    return asyncio.ensure_future(watch())
