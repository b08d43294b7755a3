"""The model servers: one child process each, its output in the pilot's log, its state from its
health endpoint and from its exit.

Each server runs in a process group of its own, so that stopping it reaches the workers it
forks (vLLM starts one per GPU) and nothing outlives the pilot. A server is `loading` until its
health endpoint answers 200, `ready` from then on, and `failed` if it exits (at any time) or is
not healthy within its startup timeout: the gateway replaces a replica rather than the pilot
restarting a server, since a crash on a node is more often the node's than the server's.
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
SECRET_OPTION = re.compile(r"(key|token|secret|password)$", re.IGNORECASE)


def free_loopback_port() -> int:
    """A port free right now on 127.0.0.1. Another process could take it before the server binds
    it; the server then exits and is reported failed, as any server that cannot start is."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


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

    @property
    def name(self) -> str:
        return self.config.name

    def argv(self) -> list[str]:
        return [argument.replace("{port}", str(self.port)) for argument in self.config.command]

    def report(self) -> ModelReport:
        return ModelReport(name=self.name, state=self.state, detail=self.detail)

    async def start(self, health: aiohttp.ClientSession) -> None:
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
        self._tasks = [
            asyncio.create_task(self._pump(self._process)),
            asyncio.create_task(self._watch(self._process, health)),
        ]

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
                    self._fail(f"exited with status {process.returncode} while loading")
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
