"""What the batch systems that take a job script share (PBS and Slurm run from the gateway host,
PBS through Globus Compute): the script is built from the deployment's job, staged (0600) beside
the pilot's configuration, and submitted by its path; the job's output goes to the same name
ending in `.log`. Each system says only its directives and how it submits.
"""

from __future__ import annotations

import asyncio
import secrets
from abc import abstractmethod
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from adaptors.context import AdaptorContext
from adaptors.schedulers import job_script
from adaptors.schedulers.commands import CommandRunner, CommandSettings, ScriptSettings
from adaptors.schedulers.contract import JobSpec, Scheduler
from adaptors.schedulers.staging import write_private

Config = TypeVar("Config", bound=ScriptSettings)
Commands = TypeVar("Commands", bound=CommandSettings)


@dataclass(frozen=True)
class StagedScript:
    file_name: str
    path: str
    """As the job and the login node see it."""


class ScriptScheduler(Scheduler, Generic[Config]):
    directive: ClassVar[str]
    """"#PBS" or "#SBATCH"."""
    script_suffix: ClassVar[str]

    def __init__(self, name: str, config: Config) -> None:
        super().__init__(name, {})
        self.config = config

    @abstractmethod
    def directives(self, spec: JobSpec, job_name: str, log_path: str) -> list[str]:
        """The script's directive arguments; a resource that cannot be one raises `SchedulerError`."""

    def script_directory(self) -> str:
        """Where the job starts unless its spec names a directory."""
        return self.config.staging_directory

    def check(self, spec: JobSpec) -> None:
        self.directives(spec, self._job_name(spec), self.staging_path("check.log"))

    async def staged_script(self, spec: JobSpec) -> StagedScript:
        job_name = self._job_name(spec)
        stem = f"{job_name}.{secrets.token_hex(4)}"
        lines = self.directives(spec, job_name, self.staging_path(f"{stem}.log"))
        text = job_script.script(self.directive, lines, self.config.preamble, spec, self.script_directory())
        file_name = f"{stem}{self.script_suffix}"
        return StagedScript(file_name, await self.stage(text.encode(), file_name))

    def _job_name(self, spec: JobSpec) -> str:
        return job_script.job_name(self.config.job_name_prefix + spec.name)


class CommandScheduler(ScriptScheduler[Commands]):
    """A batch system whose commands run here (or through `command_prefix`), its staging
    directory mounted here: files are written on the adaptors' executor."""

    def __init__(self, name: str, config: Commands) -> None:
        super().__init__(name, config)
        self._runner = CommandRunner(config)
        self._executor: Executor | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._executor = context.executor

    def script_directory(self) -> str:
        return self.config.job_directory()

    def staging_path(self, file_name: str) -> str:
        return f"{self.config.job_directory()}/{file_name}"

    async def stage(self, content: bytes, file_name: str) -> str:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, write_private, self.config.staging_directory, file_name, content
        )
        return self.staging_path(file_name)
