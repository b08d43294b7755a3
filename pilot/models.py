"""The model servers: one child process each, its output in the pilot's log, its state from its
health endpoint and from its exit.

Each server runs in a process group of its own, so that stopping it reaches the workers it
forks (vLLM starts one per GPU) and nothing outlives the pilot. A server is `loading` until its
health endpoint answers 200, `ready` from then on, and `failed` if it exits (at any time) or is
not healthy within its startup timeout: the gateway replaces a replica rather than the pilot
restarting a server, since a crash on a node is more often the node's than the server's.

One exit is the pilot's own doing: the port it picked (`port: 0`) is free when picked, and another
process can bind it before the server does. A server that exits while loading because its port was
taken is started again on another port, a few times, instead of failing the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Callable

import aiohttp

from pilot.protocol import ModelConfig, ModelReport, ModelState

log = logging.getLogger("pilot.models")
output_log = logging.getLogger("pilot.output")

HEALTH_INTERVAL_SECONDS = 1.0
HEALTH_TIMEOUT_SECONDS = 5.0
MAX_LINE_CHARS = 2000
"""A longer line of a server's output is cut there, so one runaway line cannot flood the log."""
READ_BYTES = 64 * 1024
PORT_ATTEMPTS = 3
"""How many ports the pilot picks for one server whose port another process took first."""
PUMP_DRAIN_SECONDS = 1.0
"""After a server exits, how long its last output may take to reach the log (a worker it forked
may hold the pipe open)."""
ADDRESS_IN_USE = re.compile(rb"address already in use|errno 98\b", re.IGNORECASE)
SECRET_OPTION = re.compile(r"(key|token|secret|password)$", re.IGNORECASE)


def free_loopback_port() -> int:
    """A port free right now on 127.0.0.1. Another process could take it before the server binds
    it (see `ModelServer._port_was_taken`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _bindable(port: int) -> bool:
    """Whether a server could bind `port` on 127.0.0.1 now (with SO_REUSEADDR, as servers set it,
    so that the server's own connections left in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ModelServer:
    def __init__(self, config: ModelConfig, changed: Callable[[], None]) -> None:
        self.config = config
        self.port = config.port or free_loopback_port()
        self.state = ModelState.loading
        self.detail = ""
        self._changed = changed
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._output: asyncio.Task[None] | None = None
        self._ports_tried = 1
        self._said_address_in_use = False

    @property
    def name(self) -> str:
        return self.config.name

    def argv(self) -> list[str]:
        return [argument.replace("{port}", str(self.port)) for argument in self.config.command]

    def report(self) -> ModelReport:
        return ModelReport(name=self.name, state=self.state, detail=self.detail)

    async def start(self, health: aiohttp.ClientSession) -> None:
        self._said_address_in_use = False
        argv = self.argv()
        log.info("%s: starting on 127.0.0.1:%d: %s", self.name, self.port, " ".join(_masked(argv)))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # its own group, so that one signal reaches its workers too; the job's session,
                # so that the batch system's (or the local scheduler's) end of the job reaches it.
                # (uvloop takes no `process_group`; setpgrp is one system call, safe after fork.)
                preexec_fn=os.setpgrp,
            )
        except OSError as exc:
            self._fail(f"cannot start {argv[0]}: {exc.strerror or exc}")
            return
        self._output = asyncio.create_task(self._pump(self._process))
        self._tasks += [self._output, asyncio.create_task(self._watch(self._process, health))]

    def _set(self, state: ModelState, detail: str) -> None:
        self.state, self.detail = state, detail
        self._changed()

    def _fail(self, detail: str) -> None:
        log.error("%s: failed: %s", self.name, detail)
        self._set(ModelState.failed, detail)

    async def _watch(self, process: asyncio.subprocess.Process, health: aiohttp.ClientSession) -> None:
        """Loading until healthy, then ready until the process exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.startup_timeout_seconds
        url = f"http://127.0.0.1:{self.port}{self.config.health_path}"
        exit_wait = asyncio.ensure_future(process.wait())
        try:
            while not await self._healthy(health, url):
                if self._stopping:
                    return
                if process.returncode is not None:
                    await self._exited_while_loading(process, health)
                    return
                if loop.time() >= deadline:
                    self._fail(f"not healthy within {self.config.startup_timeout_seconds:g} s")
                    await self.stop(grace=HEALTH_TIMEOUT_SECONDS)
                    return
                await asyncio.wait({exit_wait}, timeout=HEALTH_INTERVAL_SECONDS)
            log.info("%s: ready", self.name)
            self._set(ModelState.ready, "")
            status = await exit_wait
            if not self._stopping:
                self._fail(f"exited with status {status}")
        finally:
            exit_wait.cancel()

    async def _exited_while_loading(
        self, process: asyncio.subprocess.Process, health: aiohttp.ClientSession
    ) -> None:
        """Failed, unless the port the pilot picked was taken: then started again on another."""
        status = process.returncode
        _signal_group(process.pid, signal.SIGKILL)  # what it forked goes with it, as in `stop`
        if await self._port_was_taken() and self._ports_tried < PORT_ATTEMPTS and not self._stopping:
            taken, self.port = self.port, free_loopback_port()
            self._ports_tried += 1
            log.warning(
                "%s: exited with status %d: another process took port %d; starting again on port %d",
                self.name,
                status,
                taken,
                self.port,
            )
            await self.start(health)
            return
        self._fail(f"exited with status {status} while loading")

    async def _port_was_taken(self) -> bool:
        """Whether the server's exit was a port race: only for a port the pilot picked, and only
        if its output said so or another process holds the port now."""
        if self.config.port:
            return False
        if self._output is not None:
            await asyncio.wait({self._output}, timeout=PUMP_DRAIN_SECONDS)
        return self._said_address_in_use or not _bindable(self.port)

    @staticmethod
    async def _healthy(health: aiohttp.ClientSession, url: str) -> bool:
        try:
            async with health.get(url, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_SECONDS)) as answer:
                return answer.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        """Copies the server's output into the log line by line, each line prefixed with the
        model's name and cut at MAX_LINE_CHARS."""
        assert process.stdout is not None
        pending = b""
        cut = False
        while chunk := await process.stdout.read(READ_BYTES):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if not cut:
                    self._log_line(line)
                cut = False
            if len(pending) > MAX_LINE_CHARS:
                if not cut:
                    self._log_line(pending)
                pending, cut = b"", True
        if pending and not cut:
            self._log_line(pending)

    def _log_line(self, line: bytes) -> None:
        if ADDRESS_IN_USE.search(line):
            self._said_address_in_use = True
        text = line.decode("utf-8", "replace").rstrip("\r")
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + " [cut]"
        output_log.info("[%s] %s", self.name, text)

    async def stop(self, grace: float) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left of it after `grace`."""
        self._stopping = True
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), grace)
        _signal_group(process.pid, signal.SIGKILL)  # the group's stragglers, even if the leader exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(
            *(t for t in self._tasks if t is not asyncio.current_task()), return_exceptions=True
        )


def _masked(argv: list[str]) -> list[str]:
    """The command line as logged: the value of an option named for a secret (vLLM's `--api-key`)
    is replaced, whether given as `--api-key VALUE` or `--api-key=VALUE`."""
    shown: list[str] = []
    for argument in argv:
        option, equals, _ = argument.partition("=")
        if shown and shown[-1].startswith("-") and SECRET_OPTION.search(shown[-1]) and "=" not in shown[-1]:
            shown.append("***")
        elif equals and option.startswith("-") and SECRET_OPTION.search(option):
            shown.append(f"{option}=***")
        else:
            shown.append(argument)
    return shown


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
