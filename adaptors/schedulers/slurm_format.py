"""Slurm as its commands speak it: the job script's directives, and what `sbatch --parsable`,
`squeue`, `sacct` and `scancel` print.

From Slurm's sources (src/sbatch, src/squeue/opts.c and print.c, src/scancel/scancel.c,
src/common/parse_time.c, src/common/slurm_errno.c):

- `sbatch --parsable` prints `<id>` or `<id>;<cluster>`; a refusal prints `sbatch: error: Batch
  job submission failed: <reason>` and exits 1.
- `squeue --noheader --format=%i|%T|%S|%r` prints one line per job: id, state in full
  (PENDING, RUNNING...), start time (for a pending job the expected start, `N/A` when none),
  reason. Times follow `SLURM_TIME_FORMAT`, a strftime(3) format: `%s` gives epoch seconds.
  Asked for one job id it no longer knows, squeue prints `slurm_load_jobs error: Invalid job id
  specified` and exits 1; asked for several, it lists those it knows. Finished jobs stay listed for
  MinJobAge (300 s by default), then only `sacct` remembers them.
- `sacct --parsable2 --noheader --format=JobID,State,ExitCode` prints `id|STATE|code:signal`,
  `CANCELLED by <uid>` for a cancelled job; nothing for an id it does not know.
- `scancel` of a job that already ended is silent; of an id it no longer knows it prints `Invalid
  job id specified` (older releases and `--ctld` differ: only the message is relied on).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from adaptors.configured import AdaptorConfig
from adaptors.schedulers import job_script
from adaptors.schedulers.commands import MESSAGE_CHARS, CommandResult
from adaptors.schedulers.contract import JobSpec, JobState, JobStatus, SchedulerError

JOB_ID = re.compile(r"^[0-9]+$")
PARSABLE = re.compile(r"^([0-9]+)(;[A-Za-z0-9_.-]+)?$")
SQUEUE_FORMAT = "%i|%T|%S|%r"
EPOCH_TIMES = {"SLURM_TIME_FORMAT": "%s"}
SACCT_FORMAT = "JobID,State,ExitCode"
INVALID_JOB = "Invalid job id specified"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "POWER_UP_NODE"}
ENDED = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
}  # fmt: skip
TRANSIENT = re.compile(
    r"unable to contact|connect failure|connection refused|timed out|try again|temporarily|"
    r"socket|communications? error|slurmctld|not responding",
    re.IGNORECASE,
)
RESOURCES = ("partition", "account", "nodes", "qos", "constraint", "gres", "reservation")


class SlurmJobSettings(AdaptorConfig):
    """What every pilot job gets unless the deployment's `resources` say otherwise."""

    partition: str | None = None
    account: str | None = None
    nodes: int | None = 1
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None
    reservation: str | None = None
    clusters: str | None = None
    """`--clusters` for every command, on a multi-cluster site."""


def directives(
    settings: SlurmJobSettings, spec: JobSpec, job_name: str, log_path: str, extra: Sequence[str]
) -> list[str]:
    chosen = job_script.resources(
        spec.resources,
        RESOURCES,
        {
            "partition": settings.partition,
            "account": settings.account,
            "nodes": settings.nodes,
            "qos": settings.qos,
            "constraint": settings.constraint,
            "gres": settings.gres,
            "reservation": settings.reservation,
        },
    )
    lines = [
        f"--job-name={job_name}",
        f"--time={job_script.walltime(spec.walltime_seconds)}",
        *(f"--{key}={value}" for key, value in chosen.items()),
        f"--output={job_script.directive_value('log', log_path)}",
    ]
    return [*lines, *extra]


def refusal(command: str, result: CommandResult) -> SchedulerError:
    message = f"{command} failed: {result.complaint()}"
    return SchedulerError(message, retryable=bool(TRANSIENT.search(result.complaint())))


def submitted_id(result: CommandResult) -> str:
    if result.returncode != 0:
        raise refusal("sbatch", result)
    for line in reversed(result.stdout.splitlines()):
        matched = PARSABLE.fullmatch(line.strip())
        if matched:
            return matched.group(1)
    raise SchedulerError(f"sbatch printed no job id: {result.stdout.strip()[:MESSAGE_CHARS]!r}")


def checked_ids(job_ids: Sequence[str]) -> list[str]:
    for job_id in job_ids:
        if not JOB_ID.fullmatch(job_id):
            raise SchedulerError(f"{job_id[:80]!r} is not a Slurm job id", retryable=False)
    return list(job_ids)


def state_of(word: str) -> JobState:
    """`CANCELLED by 1000`, `CANCELLED+` and the like count as their first word."""
    base = word.split()[0].rstrip("+") if word.split() else ""
    if base in QUEUED:
        return JobState.queued
    if base in RUNNING:
        return JobState.running
    if base in ENDED:
        return JobState.ended
    return JobState.unknown


def squeue_statuses(result: CommandResult) -> dict[str, JobStatus]:
    """The jobs squeue listed, by id; a single id it no longer knows lists none."""
    if result.returncode != 0:
        if INVALID_JOB in result.stderr:
            return {}
        raise refusal("squeue", result)
    found: dict[str, JobStatus] = {}
    for line in result.stdout.splitlines():
        fields = line.strip().split("|", 3)
        if len(fields) != 4 or not JOB_ID.fullmatch(fields[0]):
            continue
        job_id, word, start, reason = fields
        state = state_of(word)
        estimated = float(start) if state is JobState.queued and start.isdigit() else None
        detail = f"{word}; reason={reason}" if reason and reason != "None" else word
        found[job_id] = JobStatus(state, detail[:MESSAGE_CHARS], estimated)
    return found


def sacct_statuses(result: CommandResult) -> dict[str, JobStatus] | None:
    """The finished jobs sacct remembers; None when it could not be asked (no accounting)."""
    if result.returncode != 0:
        return None
    found: dict[str, JobStatus] = {}
    for line in result.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 3 or not JOB_ID.fullmatch(fields[0]):
            continue
        state = state_of(fields[1])
        found[fields[0]] = JobStatus(state, f"{fields[1]}; ExitCode={fields[2]}"[:MESSAGE_CHARS])
    return found


def cancelled(result: CommandResult) -> None:
    """`scancel`'s answer: done, or the job had already ended or been forgotten: also done."""
    if result.returncode == 0 or INVALID_JOB in result.stderr + result.stdout:
        return
    if "already completing or completed" in result.stderr:
        return
    raise refusal("scancel", result)
