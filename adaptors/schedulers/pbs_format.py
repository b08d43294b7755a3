"""PBS Professional as its commands speak it: the job script's directives, what `qsub`, `qstat -x
-f -F json` and `qdel` print, and what that means for a job. Shared by the adaptor that runs the
commands on the gateway host (pbs.py) and the one that runs them on a login node through Globus
Compute (globus_compute.py).

From OpenPBS's sources (src/cmds/qsub.c, qstat.c, qdel.c, src/lib/Libcmds/err_handling.c):

- `qsub` prints the new job's id and a newline on stdout (`12345.polaris-pbs-01.hsn.cm...`); a
  refusal prints `qsub: <the server's message>` on stderr and exits with the PBS error number
  (modulo 256).
- `qstat -f -F json` prints one JSON document at the end: `timestamp`, `pbs_version`,
  `pbs_server`, and `Jobs` (absent when no job was found), each job's attributes by name, values
  parsed as JSON where they parse (`Exit_status` is a number), resources as objects
  (`"estimated": {"start_time": ...}`), times as ctime(3) text in the local time zone, an unknown
  estimate as `UNKNOWN`. Each id it cannot find prints `qstat: Unknown Job Id <id>` on stderr
  (exit 153); the others are still in the document. `-x` includes finished jobs (`F`) while the
  server keeps their history.
- `qdel` prints `qdel: Unknown Job Id <id>` (exit 153) for a job the server does not know and
  `qdel: Job has finished <id>` (exit 35) for a finished one.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from adaptors.configured import AdaptorConfig
from adaptors.schedulers import job_script
from adaptors.schedulers.commands import MESSAGE_CHARS, CommandResult
from adaptors.schedulers.contract import JobSpec, JobState, JobStatus, SchedulerError

JOB_ID = re.compile(r"^[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?$")
QSTAT_TIME_ZONE = {"TZ": "UTC"}
"""qstat prints times in its local time zone: asked in UTC, they read the same everywhere."""
QUEUED = {"Q", "H", "W", "T", "S", "U"}
RUNNING = {"R", "B"}
ENDED = {"E", "F", "X"}
NOT_KNOWN = "Unknown Job Id"
FINISHED = "Job has finished"
TRANSIENT = re.compile(
    r"cannot connect|communication failure|connection refused|timed? ?out|try again|"
    r"temporarily|server is (busy|shutting down)|no route to host|protocol error",
    re.IGNORECASE,
)
RESOURCES = ("queue", "account", "select", "filesystems", "place")


class PbsJobSettings(AdaptorConfig):
    """What every pilot job gets unless the deployment's `resources` say otherwise."""

    queue: str | None = None
    account: str | None = None
    """The project charged (`-A`)."""
    select: str | int | None = 1
    """`-l select=`: a node count or a whole chunk such as "1:ncpus=64:ngpus=4"."""
    filesystems: str | None = None
    """`-l filesystems=`, which ALCF's systems require, e.g. "home:eagle"."""
    place: str | None = None


def directives(
    settings: PbsJobSettings, spec: JobSpec, job_name: str, log_path: str, extra: Sequence[str]
) -> list[str]:
    chosen = job_script.resources(
        spec.resources,
        RESOURCES,
        {
            "queue": settings.queue,
            "account": settings.account,
            "select": settings.select,
            "filesystems": settings.filesystems,
            "place": settings.place,
        },
    )
    lines = [
        f"-N {job_name}",
        f"-l walltime={job_script.walltime(spec.walltime_seconds)}",
    ]
    if "queue" in chosen:
        lines.append(f"-q {chosen['queue']}")
    if "account" in chosen:
        lines.append(f"-A {chosen['account']}")
    for resource in ("select", "filesystems", "place"):
        if resource in chosen:
            lines.append(f"-l {resource}={chosen[resource]}")
    lines += ["-j oe", f"-o {job_script.directive_value('log', log_path)}", *extra]
    return lines


def submitted_id(result: CommandResult) -> str:
    """The job id `qsub` printed; its refusal as a `SchedulerError`."""
    if result.returncode != 0:
        raise refusal("qsub", result)
    for line in reversed(result.stdout.splitlines()):
        if JOB_ID.fullmatch(line.strip()):
            return line.strip()
    raise SchedulerError(f"qsub printed no job id: {result.stdout.strip()[:MESSAGE_CHARS]!r}")


def refusal(command: str, result: CommandResult) -> SchedulerError:
    """A command's failure: retryable when it says the server could not be reached."""
    message = f"{command} failed: {result.complaint()}"
    return SchedulerError(message, retryable=bool(TRANSIENT.search(result.complaint())))


def checked_ids(job_ids: Sequence[str]) -> list[str]:
    for job_id in job_ids:
        if not JOB_ID.fullmatch(job_id):
            raise SchedulerError(f"{job_id[:80]!r} is not a PBS job id", retryable=False)
    return list(job_ids)


def statuses(job_ids: Sequence[str], result: CommandResult) -> dict[str, JobStatus]:
    """The states of `job_ids` from `qstat -x -f -F json`: a job it no longer knows is `unknown`
    (its history has expired, or it never existed); output that is not qstat's is an error."""
    document: Any = None
    if result.stdout.strip():
        try:
            document = json.loads(result.stdout)
        except ValueError:
            document = None
    if not isinstance(document, dict):
        raise refusal("qstat", result)
    complaints = [line for line in result.stderr.splitlines() if line.strip() and NOT_KNOWN not in line]
    if result.returncode != 0 and complaints:
        raise refusal("qstat", CommandResult(result.returncode, "", "\n".join(complaints)))
    jobs = document.get("Jobs") or {}
    if not isinstance(jobs, dict):
        raise SchedulerError("qstat printed Jobs that are not an object")
    found: dict[str, JobStatus] = {}
    for job_id in job_ids:
        attributes = _find(jobs, job_id)
        if isinstance(attributes, dict):
            found[job_id] = status(attributes)
        else:
            found[job_id] = JobStatus(JobState.unknown, "not listed by qstat -x")
    return found


def _find(jobs: dict[str, Any], job_id: str) -> Any:
    """qstat names each job by its full id; the id given may be the short form."""
    if job_id in jobs:
        return jobs[job_id]
    number = job_id.split(".", 1)[0]
    return next((value for key, value in jobs.items() if key.split(".", 1)[0] == number), None)


def status(attributes: dict[str, Any]) -> JobStatus:
    letter = str(attributes.get("job_state", ""))
    comment = str(attributes.get("comment", ""))
    if letter in QUEUED:
        state = JobState.queued
    elif letter in RUNNING:
        state = JobState.running
    elif letter in ENDED:
        state = JobState.ended
    else:
        state = JobState.unknown
    words = [f"job_state={letter}"]
    if "Exit_status" in attributes:
        words.append(f"Exit_status={attributes['Exit_status']}")
    if comment:
        words.append(comment)
    detail = "; ".join(words)[:MESSAGE_CHARS]
    start = None
    estimated = attributes.get("estimated")
    if state is JobState.queued and isinstance(estimated, dict):
        start = _utc_ctime(estimated.get("start_time"))
    return JobStatus(state, detail, start)


def _utc_ctime(value: Any) -> float | None:
    """`Fri Dec  4 18:00:00 2026`, as qstat prints it under TZ=UTC; `UNKNOWN` or anything else: None."""
    if not isinstance(value, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(" ".join(value.split()), "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return None


def deleted(job_id: str, result: CommandResult) -> None:
    """`qdel`'s answer: done, or the job had already ended (finished, or forgotten): also done."""
    if result.returncode == 0:
        return
    said = result.stderr + result.stdout
    if NOT_KNOWN in said or FINISHED in said:
        return
    raise refusal("qdel", result)
