"""PBS Professional (ALCF's Polaris, Aurora, Sophia): `qsub`, `qstat` and `qdel` run on the gateway
host when it is a login node, or through `command_prefix` (ssh) on one.

The job script is written to the staging directory (0600) next to the pilot's configuration and
submitted by path; the job's output goes to the same name ending in `.log`. What the commands
print is read by pbs_format.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaptors.schedulers import pbs_format
from adaptors.schedulers.commands import CommandSettings, validated
from adaptors.schedulers.contract import JobSpec, JobStatus
from adaptors.schedulers.script_scheduler import CommandScheduler

IDS_PER_CALL = 100
"""Job ids per qstat call: many ids in one call, an argv of bounded length."""


class PbsConfig(CommandSettings, pbs_format.PbsJobSettings):
    qsub: str = "qsub"
    qstat: str = "qstat"
    qdel: str = "qdel"


class PbsScheduler(CommandScheduler[PbsConfig]):
    """Submits pilot jobs with qsub, reads their states with one `qstat -x -f -F json` per batch
    of ids, ends them with qdel."""

    directive = "#PBS"
    script_suffix = ".pbs"

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        super().__init__(name, validated(PbsConfig, config))

    def directives(self, spec: JobSpec, job_name: str, log_path: str) -> list[str]:
        return pbs_format.directives(self.config, spec, job_name, log_path, self.config.directives)

    async def submit(self, spec: JobSpec) -> str:
        script = await self.staged_script(spec)
        return pbs_format.submitted_id(await self._runner.run([self.config.qsub, script.path]))

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
