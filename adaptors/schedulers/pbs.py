"""PBS Professional (ALCF's Polaris, Aurora, Sophia): `qsub`, `qstat` and `qdel` run on the gateway
host when it is a login node, or through `command_prefix` (ssh) on one.

The job script is written to the staging directory (0600) next to the pilot's configuration and
submitted by path; the job's output goes to the same name ending in `.log`. What the commands
print is read by pbs_format.py.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

from adaptors.context import AdaptorContext
from adaptors.schedulers import job_script, pbs_format
from adaptors.schedulers.commands import CommandRunner, CommandSettings, validated
from adaptors.schedulers.contract import JobSpec, JobStatus, Scheduler
from adaptors.schedulers.staging import write_private

IDS_PER_CALL = 100
"""Job ids per qstat call: many ids in one call, an argv of bounded length."""


class PbsConfig(CommandSettings, pbs_format.PbsJobSettings):
    qsub: str = "qsub"
    qstat: str = "qstat"
    qdel: str = "qdel"


class PbsScheduler(Scheduler):
    """Submits pilot jobs with qsub, reads their states with one `qstat -x -f -F json` per batch
    of ids, ends them with qdel."""

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        super().__init__(name, config)
        self.config = validated(PbsConfig, config)
        self._runner = CommandRunner(self.config)
        self._executor: Executor | None = None

    async def startup(self, context: AdaptorContext) -> None:
        self._executor = context.executor

    def staging_path(self, file_name: str) -> str:
        return f"{self.config.job_directory()}/{file_name}"

    async def stage(self, content: bytes, file_name: str) -> str:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, write_private, self.config.staging_directory, file_name, content
        )
        return self.staging_path(file_name)

    def check(self, spec: JobSpec) -> None:
        pbs_format.directives(self.config, spec, self.staging_path("check.log"), self.config.directives)

    async def submit(self, spec: JobSpec) -> str:
        config = self.config
        stem = f"{job_script.job_name(config.job_name_prefix + spec.name)}.{secrets.token_hex(4)}"
        lines = pbs_format.directives(config, spec, self.staging_path(f"{stem}.log"), config.directives)
        text = job_script.script("#PBS", lines, config.preamble, spec, config.job_directory())
        path = await self.stage(text.encode(), f"{stem}.pbs")
        return pbs_format.submitted_id(await self._runner.run([config.qsub, path]))

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        ids = pbs_format.checked_ids(job_ids)
        found: dict[str, JobStatus] = {}
        for start in range(0, len(ids), IDS_PER_CALL):
            batch = ids[start : start + IDS_PER_CALL]
            command = [self.config.qstat, "-x", "-f", "-F", "json", *batch]
            result = await self._runner.run(command, pbs_format.QSTAT_TIME_ZONE)
            found.update(pbs_format.statuses(batch, result))
        return found

    async def end(self, job_id: str) -> None:
        pbs_format.checked_ids([job_id])
        pbs_format.deleted(job_id, await self._runner.run([self.config.qdel, job_id]))
