"""One real server in a subprocess, for as long as a test or a benchmark needs it.

A fake would only show that the gateway agrees with the fake; the real server also behaves honestly
when it goes away and comes back. Each server differs in its command line and in how it says it is
ready; starting, waiting with a deadline, stopping, and reporting a failure with the server's own log
are the same for all, and are here.

A server outlives nothing that started it: it is launched through util-linux's `setpriv` (Debian
installs it everywhere) with its own stop signal as its parent-death signal, so that a test run killed
outright (SIGKILL, or a signal pytest does not handle) stops its servers as `stop()` would, instead of
leaving them running with their ports and memory. The signal follows the thread that launched the
server; servers are launched from the thread that runs the test's event loop, which lives as long as
they do.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Self

from testing.ports import free_port
from testing.processes import became_ready, stop_process

LAUNCH_ATTEMPTS: Final = 3
"""A free port may be taken by another process before the server binds it: a new one is tried."""
LOG_TAIL_CHARS: Final = 2000


class ServiceError(RuntimeError):
    """A server did not come up (it exited, or did not answer in time), or cannot be started at all."""


class ServiceProcess(ABC):
    """A server program on a 127.0.0.1 port, its output in a log file under `directory`.

    `start()` launches it on `port`, or on a free port when `port` is 0, and waits until `ready()`
    holds; if it exits or `ready_timeout` passes first, it is stopped and `ServiceError` carries the
    tail of its log. `stop()` sends `stop_signal`, then SIGKILL after `stop_timeout`; `start()` after
    `stop()` keeps the port, so that clients reconnect to the same URL. `async with` starts it and
    `close()`s it at the end.
    """

    name: ClassVar[str]
    ready_timeout: ClassVar[float]
    stop_timeout: ClassVar[float]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    own_session: ClassVar[bool] = False
    """Start it in a session of its own, so that SIGKILL reaches its workers too."""

    def __init__(self, directory: Path, port: int = 0) -> None:
        self.directory = Path(directory)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def command(self, port: int) -> list[str]:
        """The command line that serves on `port`."""

    @abstractmethod
    async def ready(self) -> bool:
        """Whether the server, starting on `self.port`, answers yet: polled until it does."""

    async def prepare(self) -> None:
        """Before each launch: whatever the command needs to find (a configuration, a data directory)."""

    def popen_options(self) -> dict[str, Any]:
        """More arguments for `subprocess.Popen` (a working directory, another user)."""
        return {}

    def log_path(self, port: int) -> Path:
        return self.directory / f"{self.name}-{port}.log"

    def log_tail(self, port: int) -> str:
        """For failure messages: the end of what the server wrote."""
        return self.log_path(port).read_text(errors="replace")[-LOG_TAIL_CHARS:]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self) -> None:
        """Serving once it answers; a server already running is left as it is."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        await self.prepare()
        if self.port:
            await self._launch(self.port)
            return
        for attempt in range(LAUNCH_ATTEMPTS):
            try:
                await self._launch(free_port())
                return
            except ServiceError:
                self.port = 0
                if attempt == LAUNCH_ATTEMPTS - 1:
                    raise

    async def stop(self) -> None:
        """The server is gone and its port refuses connections."""
        process, self.process = self.process, None
        await stop_process(process, self.stop_signal, self.stop_timeout, group=self.own_session)

    async def restart(self) -> None:
        """The server goes away and comes back on the same port."""
        await self.stop()
        await self.start()

    async def close(self) -> None:
        """When the block using the server ends: stop it, and release what `prepare` made."""
        await self.stop()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _launch(self, port: int) -> None:
        with self.log_path(port).open("ab") as log:
            process = subprocess.Popen(
                [*stopped_with_parent(self.stop_signal), *self.command(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
                **self.popen_options(),
            )
        self.process, self.port = process, port
        if await became_ready(process, self.ready, self.ready_timeout):
            return
        status = process.poll()
        await self.stop()
        what = f"did not answer within {self.ready_timeout:g} s" if status is None else f"exited ({status})"
        raise ServiceError(f"{self.name} on port {port} {what}; its log:\n{self.log_tail(port)}")


def stopped_with_parent(sig: signal.Signals) -> list[str]:
    """The prefix that gives a server `sig` when the thread that launched it ends; none where `setpriv`
    is missing (not a Debian machine), where a killed run leaves its servers to be stopped by hand."""
    setpriv = shutil.which("setpriv")
    return [setpriv, f"--pdeathsig={sig.name}", "--"] if setpriv else []
