"""Slurm: `sbatch`, `squeue`, `sacct` and `scancel` run on the gateway host when it is a login node,
or through `command_prefix` (ssh) on one.

States come from one squeue call per batch of ids; the ids squeue no longer lists (finished longer
ago than MinJobAge) are asked of sacct, when the site has accounting (`use_sacct`), and are
`unknown` otherwise. What the commands print is read by slurm_format.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaptors.schedulers import slurm_format
from adaptors.schedulers.commands import CommandSettings, validated
from adaptors.schedulers.contract import JobSpec, JobState, JobStatus
from adaptors.schedulers.script_scheduler import CommandScheduler

IDS_PER_CALL = 100


class SlurmConfig(CommandSettings, slurm_format.SlurmJobSettings):
    sbatch: str = "sbatch"
    squeue: str = "squeue"
    sacct: str = "sacct"
    scancel: str = "scancel"
    use_sacct: bool = True


class SlurmScheduler(CommandScheduler[SlurmConfig]):
    """Submits pilot jobs with `sbatch --parsable`, reads their states with squeue (then sacct),
    ends them with scancel."""

    directive = "#SBATCH"
    script_suffix = ".sbatch"

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        super().__init__(name, validated(SlurmConfig, config))
        self._clusters = [f"--clusters={self.config.clusters}"] if self.config.clusters else []

    def directives(self, spec: JobSpec, job_name: str, log_path: str) -> list[str]:
        return slurm_format.directives(self.config, spec, job_name, log_path, self.config.directives)

    async def submit(self, spec: JobSpec) -> str:
        script = await self.staged_script(spec)
        result = await self._runner.run([self.config.sbatch, "--parsable", *self._clusters, script.path])
        return slurm_format.submitted_id(result)

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        ids = slurm_format.checked_ids(job_ids)
        found: dict[str, JobStatus] = {}
        for start in range(0, len(ids), IDS_PER_CALL):
            found.update(await self._batch(ids[start : start + IDS_PER_CALL]))
        return found

    async def _batch(self, ids: list[str]) -> dict[str, JobStatus]:
        config = self.config
        command = [
            config.squeue, *self._clusters, f"--jobs={','.join(ids)}", "--noheader",
            f"--format={slurm_format.SQUEUE_FORMAT}",
        ]  # fmt: skip
        listed = slurm_format.squeue_statuses(await self._runner.run(command, slurm_format.EPOCH_TIMES))
        missing = [job_id for job_id in ids if job_id not in listed]
        remembered: dict[str, JobStatus] | None = None
        if missing and config.use_sacct:
            command = [
                config.sacct, *self._clusters, f"--jobs={','.join(missing)}", "--allocations",
                "--noheader", "--parsable2", f"--format={slurm_format.SACCT_FORMAT}",
            ]  # fmt: skip
            remembered = slurm_format.sacct_statuses(await self._runner.run(command))
        for job_id in missing:
            known = (remembered or {}).get(job_id)
            why = "not listed by squeue or sacct" if remembered is not None else "not listed by squeue"
            listed[job_id] = known or JobStatus(JobState.unknown, why)
        return {job_id: listed[job_id] for job_id in ids}

    async def end(self, job_id: str) -> None:
        slurm_format.checked_ids([job_id])
        result = await self._runner.run([self.config.scancel, *self._clusters, job_id])
        slurm_format.cancelled(result)
