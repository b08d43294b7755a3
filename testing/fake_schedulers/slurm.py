"""Fake ``sbatch``, ``squeue``, ``sacct`` and ``scancel`` of Slurm, printing what Slurm prints.

Read from Slurm's sources (src/sbatch/opt.c, src/squeue/squeue.c, opts.c and print.c,
src/scancel/scancel.c, src/common/parse_time.c and slurm_errno.c) and its man pages:

- ``sbatch`` prints ``Submitted batch job <id>``, or with ``--parsable`` ``<id>`` (``<id>;<cluster>``
  on a multi-cluster site); a refusal prints ``sbatch: error: Batch job submission failed: <reason>``
  and exits 1 (``Invalid partition name specified``, ``Invalid account or account/partition
  combination specified``).
- ``squeue --format`` takes ``%[.][size]type`` fields (a size of 0 prints the value as it is, a
  ``.`` right-justifies) and prints text between them as it is; ``%i`` id, ``%T`` state in full,
  ``%t`` compact, ``%S`` start time (``N/A`` when none), ``%r`` reason, ``%j`` name, ``%P``
  partition. Times follow ``SLURM_TIME_FORMAT`` (unset or ``standard``: ``%FT%T``; else a
  strftime(3) format). A single unknown id prints ``slurm_load_jobs error: Invalid job id
  specified`` (exit 1); several ids list the known ones. Finished jobs are listed for MinJobAge.
- ``sacct --parsable2`` separates fields with ``|``; ``CANCELLED by <uid>`` for a cancelled job.
  Without accounting: ``sacct: error: Slurm accounting storage is disabled`` (exit 1).
- ``scancel`` of a finished job is silent (exit 0); of an unknown id it prints ``scancel: error:
  Kill job error on job id <id>: Invalid job id specified`` and exits 1.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any

from testing.fake_schedulers.table import (
    DONE,
    QUEUED,
    RUNNING,
    FakeBatch,
    script_directives,
    walltime_seconds,
)

MIN_JOB_AGE = 300.0
SHORT = {"-J": "job-name", "-p": "partition", "-A": "account", "-t": "time", "-N": "nodes", "-o": "output"}
SHORT.update({"-D": "chdir", "-q": "qos", "-C": "constraint", "-M": "clusters"})
FIELD = re.compile(r"%(\.?)(\d*)([A-Za-z])")
HEADERS = {"i": "JOBID", "T": "STATE", "t": "ST", "S": "START_TIME", "r": "REASON", "j": "NAME"}


def _options(words: list[str]) -> dict[str, str] | str:
    """`--name=value`, `--name value` and `-X value` forms; the bad option's text on a mistake."""
    found: dict[str, str] = {}
    pairs = iter(words)
    for word in pairs:
        if word == "--parsable":
            found["parsable"] = ""
        elif word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            found[name] = value if equals else next(pairs, "")
        elif word in SHORT:
            found[SHORT[word]] = next(pairs, "")
        else:
            return word
    return found


def sbatch(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("sbatch")
    control = batch.control()
    if not argv:
        sys.stderr.write("sbatch: error: Batch script is empty!\n")
        return 1
    try:
        with open(argv[-1]) as file:
            script = file.read()
    except OSError:
        sys.stderr.write(f"sbatch: error: Unable to open file {argv[-1]}\n")
        return 1
    options = _options([word for line in script_directives(script, "#SBATCH") for word in line.split()])
    given = _options(argv[:-1])
    if isinstance(options, str) or isinstance(given, str):
        bad = options if isinstance(options, str) else given
        sys.stderr.write(f"sbatch: unrecognized option '{bad}'\n")
        return 1
    options.update(given)
    partition = options.get("partition", control["default_partition"])
    if partition not in control["partitions"]:
        sys.stderr.write("sbatch: error: Batch job submission failed: Invalid partition name specified\n")
        return 1
    account = options.get("account")
    if control["accounts"] is not None and account not in control["accounts"]:
        sys.stderr.write(
            "sbatch: error: Batch job submission failed: "
            "Invalid account or account/partition combination specified\n"
        )
        return 1
    name = options.get("job-name", os.path.basename(argv[-1]))
    workdir = options.get("chdir", os.getcwd())
    limit = options.get("time")

    def named(number: int) -> dict[str, Any]:
        output = options.get("output", f"{workdir}/slurm-%j.out").replace("%j", str(number))
        variables = {"SLURM_JOB_ID": str(number), "SLURM_JOB_NAME": name, "SLURM_SUBMIT_DIR": workdir}
        return {"id": str(number), "variables": variables, "output": output}

    job = batch.add(
        {
            "kind": "slurm",
            "name": name,
            "queue": partition,
            "account": account,
            "resources": {
                key: options[key] for key in ("nodes", "qos", "constraint", "gres") if key in options
            },
            "walltime_seconds": _slurm_time(limit) if limit else None,
        },
        script,
        named,
    )
    if "parsable" in options:
        print(job["id"] + (f";{options['clusters']}" if options.get("clusters") else ""))
    else:
        print(f"Submitted batch job {job['id']}")
    return 0


def _slurm_time(text: str) -> int | None:
    """minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if days:
        parts += ["0"] * (3 - len(parts))
        seconds = walltime_seconds(":".join(parts))
        return None if seconds is None or not days.isdigit() else int(days) * 86400 + seconds
    if len(parts) == 1:
        return int(parts[0]) * 60 if parts[0].isdigit() else None
    if len(parts) == 2:
        return walltime_seconds(f"{parts[0]}:{parts[1]}")
    return walltime_seconds(clock)


def state_word(job: dict[str, Any]) -> str:
    if job["state"] == QUEUED:
        return "PENDING"
    if job["state"] == RUNNING:
        return "COMPLETING" if job["deleted"] else "RUNNING"
    return {"cancelled": "CANCELLED", "walltime": "TIMEOUT", "node_fail": "NODE_FAIL"}.get(
        job["ended_by"], "COMPLETED" if job["exit_status"] == 0 else "FAILED"
    )


def _time_text(epoch: float | None) -> str:
    if not epoch:
        return "N/A"
    chosen = os.environ.get("SLURM_TIME_FORMAT", "")
    layout = "%Y-%m-%dT%H:%M:%S" if chosen in ("", "standard", "relative") or "%" not in chosen else chosen
    return time.strftime(layout, time.localtime(epoch))


def _field(job: dict[str, Any], letter: str, control: dict[str, Any]) -> str:
    start = job["started"]
    if job["state"] == QUEUED and control["estimated_start_in"] is not None:
        start = job["submitted"] + float(control["estimated_start_in"])
    reason = {QUEUED: "Priority", RUNNING: "None"}.get(job["state"], "None")
    values: dict[str, str] = {
        "i": str(job["id"]), "T": state_word(job), "t": state_word(job)[:2], "S": _time_text(start),
        "r": reason, "j": str(job["name"]), "P": str(job["queue"]),
    }  # fmt: skip
    return values.get(letter, "")


def squeue(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("squeue")
    control = batch.control()
    options = _options([word for word in argv if word not in ("--noheader", "-h")])
    if isinstance(options, str) or "jobs" not in options or "format" not in options:
        sys.stderr.write("fake squeue: only `squeue --jobs=IDS [--noheader] --format=FMT` is imitated\n")
        return 1
    ids = [part for part in options["jobs"].split(",") if part]
    jobs: list[dict[str, Any]] = []
    for job_id in ids:
        job = batch.job(int(job_id)) if job_id.isdigit() else None
        if job is None or job.get("kind") != "slurm":
            continue
        if job["state"] != DONE or time.time() <= job["ended"] + MIN_JOB_AGE:
            jobs.append(job)
    if len(ids) == 1 and not jobs:
        sys.stderr.write("slurm_load_jobs error: Invalid job id specified\n")
        return 1
    layout = options["format"]
    if "--noheader" not in argv and "-h" not in argv:
        print(FIELD.sub(lambda m: HEADERS.get(m[3], m[3]), layout))
    for job in jobs:
        print(_line(job, layout, control))
    return 0


def _line(job: dict[str, Any], layout: str, control: dict[str, Any]) -> str:
    return FIELD.sub(lambda m: _sized(_field(job, m[3], control), m[1], m[2]), layout)


def _sized(value: str, right: str, size: str) -> str:
    if not size or int(size) == 0:
        return value
    width = int(size)
    return value[:width].rjust(width) if right else value[:width].ljust(width)


def sacct(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("sacct")
    if not batch.control()["accounting"]:
        sys.stderr.write("sacct: error: Slurm accounting storage is disabled\n")
        return 1
    flags = {"--allocations", "-X", "--noheader", "-n", "--parsable2", "-P"}
    options = _options([word for word in argv if word not in flags])
    if isinstance(options, str) or "jobs" not in options:
        sys.stderr.write("fake sacct: only `sacct --jobs=IDS --parsable2 --format=...` is imitated\n")
        return 1
    fields = options.get("format", "JobID,State,ExitCode").split(",")
    for job_id in options["jobs"].split(","):
        job = batch.job(int(job_id)) if job_id.isdigit() else None
        if job is None or job.get("kind") != "slurm":
            continue
        word = state_word(job)
        if word == "CANCELLED":
            word = f"CANCELLED by {os.getuid()}"
        code = job["exit_status"] or 0
        exit_code = f"0:{code - 256}" if code > 256 else f"{max(code, 0)}:0"
        values = {"JobID": job["id"], "State": word, "ExitCode": exit_code, "JobName": job["name"]}
        print("|".join(values.get(field, "") for field in fields))
    return 0


def scancel(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("scancel")
    failed = 0
    for job_id in (word for word in argv if not word.startswith("-")):
        job = batch.job(int(job_id)) if job_id.isdigit() else None
        if job is None or job.get("kind") != "slurm":
            sys.stderr.write(f"scancel: error: Kill job error on job id {job_id}: Invalid job id specified\n")
            failed = 1
            continue
        batch.cancel(job["number"], 256 + signal.SIGTERM)
    return failed
