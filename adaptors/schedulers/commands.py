"""Running a batch system's commands (qsub, sbatch, ...) from the gateway, and checking their settings.

Never through a local shell: the argv goes to `asyncio.create_subprocess_exec`, after an optional
prefix that reaches the commands elsewhere (`["ssh", "login-node"]`). ssh hands what follows to the
remote user's shell, so with `prefix_runs_shell` every argument after the prefix is quoted for a
POSIX shell. Every call has a deadline (the process group is killed when it passes) and keeps at
most `OUTPUT_LIMIT_BYTES` of each stream; at most `max_concurrent_commands` run at once. The
commands get a small environment: the variables below, those whose names the site lists, and
`command_environment`; never the gateway's secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

from adaptors.configured import AdaptorConfig
from adaptors.schedulers.contract import SchedulerError

OUTPUT_LIMIT_BYTES = 1024 * 1024
"""What is kept of a command's stdout (and of its stderr): qstat's JSON for a few hundred jobs."""
AFTER_EXIT_SECONDS = 2.0
"""How long the output is still read once the command has exited: a child it left behind (ssh's
ControlPersist master) may hold the pipes open for hours."""
MESSAGE_CHARS = 500
"""What of a command's complaint reaches an error message."""
PASSED_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "SSH_AUTH_SOCK", "KRB5CCNAME")
SAFE_TEXT = re.compile(r"^[^\x00-\x1f\x7f]*$")
Settings = TypeVar("Settings", bound=BaseModel)


class ScriptSettings(AdaptorConfig):
    """Where job scripts and the pilots' configurations are staged, and what the scripts add."""

    staging_directory: str
    """Where the gateway writes job scripts and the pilots' configurations (a shared filesystem)."""
    preamble: list[str] = Field(default_factory=list)
    """Lines run by the job before the pilot: module loads, venv activation."""
    directives: list[str] = Field(default_factory=list)
    """More directive arguments, one per line, e.g. "-l place=scatter" (PBS), "--qos=high" (Slurm)."""
    command_timeout_seconds: float = Field(default=60, gt=0, le=600)
    job_name_prefix: str = Field(default="", max_length=20, pattern=r"^[A-Za-z0-9_.-]*$")
    """Put before every job's name (`pilot-<deployment>`)."""

    @field_validator("staging_directory")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_path(value)

    @field_validator("preamble", "directives")
    @classmethod
    def _one_line_each(cls, lines: list[str]) -> list[str]:
        return one_line_each(lines)


class CommandSettings(ScriptSettings):
    """How the commands are reached, common to PBS and Slurm run from the gateway host."""

    job_staging_directory: str | None = None
    """The staging directory as jobs and the login node see it, when mounted elsewhere here."""
    command_prefix: list[str] = Field(default_factory=list)
    """argv put before every command, e.g. ["ssh", "-o", "BatchMode=yes", "login-node"]."""
    prefix_runs_shell: bool = False
    """The prefix hands the command to a shell (ssh does): quote each argument for it."""
    command_environment: dict[str, str] = Field(default_factory=dict)
    """More variables for the commands (PBS_CONF_FILE, SLURM_CONF...)."""
    passed_environment: list[str] = Field(default_factory=list)
    """Names of the gateway's variables passed on to the commands, beyond PATH, HOME and the like."""
    max_concurrent_commands: int = Field(default=4, ge=1, le=64)
    """Commands of this adaptor running at once: a login node is shared; the others wait their turn."""

    @field_validator("job_staging_directory")
    @classmethod
    def _job_directory(cls, value: str | None) -> str | None:
        return None if value is None else absolute_path(value)

    @field_validator("command_prefix")
    @classmethod
    def _prefix_lines(cls, lines: list[str]) -> list[str]:
        return one_line_each(lines)

    def job_directory(self) -> str:
        return self.job_staging_directory or self.staging_directory


def absolute_path(value: str) -> str:
    if not value.startswith("/") or not SAFE_TEXT.fullmatch(value):
        raise ValueError("must be an absolute path")
    return value.rstrip("/") or "/"


def one_line_each(lines: list[str]) -> list[str]:
    for line in lines:
        if not SAFE_TEXT.fullmatch(line):
            raise ValueError("each entry must be one line, without control characters")
    return lines


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    def complaint(self) -> str:
        """What the command said went wrong, bounded, for an operator."""
        text = " ".join((self.stderr.strip() or self.stdout.strip()).split())
        return text[:MESSAGE_CHARS] or f"exit status {self.returncode}"


class CommandRunner:
    """Runs the batch commands of one adaptor: each within the deadline, a few at once."""

    def __init__(self, settings: CommandSettings) -> None:
        self._settings = settings
        environment = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
        environment.update(
            {name: os.environ[name] for name in settings.passed_environment if name in os.environ}
        )
        environment.update(settings.command_environment)
        self._environment = environment
        self._slots = asyncio.Semaphore(settings.max_concurrent_commands)

    def argv(self, command: Sequence[str], variables: Mapping[str, str] | None = None) -> list[str]:
        """The full argv: the prefix, then `env NAME=VALUE ...` when variables must reach the
        command itself (across ssh too), then the command."""
        tail = [*(["env", *(f"{k}={v}" for k, v in variables.items())] if variables else []), *command]
        if self._settings.prefix_runs_shell:
            tail = [shlex.quote(part) for part in tail]
        return [*self._settings.command_prefix, *tail]

    async def run(self, command: Sequence[str], variables: Mapping[str, str] | None = None) -> CommandResult:
        """Raises a retryable `SchedulerError` when the command cannot be started through the
        prefix or does not finish in time; a non-retryable one when it does not exist here."""
        async with self._slots:
            return await self._run(command, variables)

    async def _run(self, command: Sequence[str], variables: Mapping[str, str] | None) -> CommandResult:
        argv = self.argv(command, variables)
        timeout = self._settings.command_timeout_seconds
        outputs = [await _OutputPipe.open(), await _OutputPipe.open()]
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=outputs[0].write_end,
                    stderr=outputs[1].write_end,
                    env=self._environment,
                    start_new_session=True,
                )
            finally:
                for output in outputs:
                    output.close_write_end()
            returncode = await self._finish(process, command[0], outputs, timeout)
        except FileNotFoundError:
            raise SchedulerError(f"{argv[0]}: command not found", retryable=False) from None
        except OSError as exc:
            raise SchedulerError(f"{argv[0]} could not be started: {exc.strerror}") from None
        finally:
            for output in outputs:
                output.close()
        result = CommandResult(returncode, outputs[0].text(), outputs[1].text())
        if self._settings.command_prefix and returncode == 255:
            raise SchedulerError(f"{argv[0]} could not reach the cluster: {result.complaint()}")
        return result

    @staticmethod
    async def _finish(
        process: asyncio.subprocess.Process, name: str, outputs: list[_OutputPipe], timeout: float
    ) -> int:
        """The exit status; the output is read until the command has exited and its pipes are
        closed, or `AFTER_EXIT_SECONDS` after it exited (a child it left behind, such as ssh's
        ControlPersist master, may hold them open for hours)."""
        try:
            async with asyncio.timeout(timeout):
                returncode = await process.wait()
                await asyncio.wait([output.drained for output in outputs], timeout=AFTER_EXIT_SECONDS)
                return returncode
        except TimeoutError:
            _kill(process)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
            raise SchedulerError(f"{name} did not finish within {timeout:g} s") from None
        except asyncio.CancelledError:
            _kill(process)
            raise


class _OutputPipe:
    """A pipe for one of the command's streams, read on the event loop into a bounded buffer.
    Not asyncio's own PIPE: a process with those is not seen to exit until they close too."""

    def __init__(
        self, write_end: int, transport: asyncio.ReadTransport, reader: asyncio.StreamReader
    ) -> None:
        self.write_end: int | None = write_end
        self._transport = transport
        self._kept = bytearray()
        self.drained = asyncio.ensure_future(_bounded(reader, self._kept))

    @classmethod
    async def open(cls) -> _OutputPipe:
        read_end, write_end = os.pipe()
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
        )
        return cls(write_end, transport, reader)

    def close_write_end(self) -> None:
        """Once the child has its copy: the pipe ends when the child's copies close."""
        if self.write_end is not None:
            os.close(self.write_end)
            self.write_end = None

    def close(self) -> None:
        self.close_write_end()
        self.drained.cancel()
        self._transport.close()

    def text(self) -> str:
        return self._kept.decode("utf-8", "replace")


async def _bounded(stream: asyncio.StreamReader, kept: bytearray) -> None:
    """Keeps the stream's first `OUTPUT_LIMIT_BYTES` in `kept`; the rest is read and dropped so the
    command never blocks on a full pipe."""
    while chunk := await stream.read(65536):
        if len(kept) < OUTPUT_LIMIT_BYTES:
            kept += chunk[: OUTPUT_LIMIT_BYTES - len(kept)]


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def validated(model: type[Settings], config: Mapping[str, Any]) -> Settings:
    """`config` checked against `model` once, when the adaptor is built; a mistake raises
    `ValueError` naming each field as `config.<field>`."""
    try:
        return model.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(
            f"config.{'.'.join(str(part) for part in error['loc']) or '(whole)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(problems) from None
