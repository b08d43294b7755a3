"""Fake ``qsub``, ``qstat`` and ``qdel`` of PBS Professional, printing what OpenPBS prints.

Read from OpenPBS's sources (src/cmds/qsub.c, qstat.c, qdel.c, src/lib/Libcmds/err_handling.c,
src/lib/Libjson/cJSON/pbs_cjson.c, src/include/pbs_error.h, src/lib/Liblog/pbs_messages.c):

- ``qsub`` prints ``<number>.<server>`` and a newline; a refusal prints ``qsub: <message>`` on
  stderr and exits with the PBS error number modulo 256 (Unknown queue: 15018 -> 170; a site hook's
  rejection: 15136 -> 32, the message being the hook's own, here assumed).
- ``qstat -f -F json`` prints, once at the end, ``{"timestamp", "pbs_version", "pbs_server",
  "Jobs": {id: attributes}}`` as cJSON prints it (tab-indented); attribute values that parse as JSON
  are numbers, resources are nested objects, times are ctime(3) text in the local time zone, an
  unknown ``estimated.start_time`` is ``UNKNOWN``; ``Jobs`` is absent when no job was found. An
  unknown id prints ``qstat: Unknown Job Id <id>`` on stderr (exit 153); without ``-x`` a finished
  job prints ``qstat: <id> Job has finished, use -x or -H to obtain historical job information``.
- ``qdel`` is silent on success; ``qdel: Unknown Job Id <id>`` (153), ``qdel: Job has finished <id>``
  (35). A running job deleted is exiting (``E``) until its script has ended (SIGTERM, then SIGKILL
  after ``kill_delay_seconds``); a script killed by a signal ends with Exit_status 256 + its number.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from testing.fake_schedulers.table import (
    DONE,
    QUEUED,
    RUNNING,
    FakeBatch,
    script_directives,
    walltime_seconds,
)

PBS_VERSION = "2022.1.1.20220926110806"
UNKNOWN_JOB = 15001 % 256
FINISHED_JOB = 15139 % 256
UNKNOWN_QUEUE = 15018 % 256
HOOK_REJECTED = 15136 % 256
DELETED_RUNNING = 271
LETTERS = {QUEUED: "Q", RUNNING: "R", DONE: "F"}


def qsub(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("qsub")
    control = batch.control()
    if not argv or argv[-1].startswith("-"):
        sys.stderr.write("usage: qsub [-A account_string] ... [script | -- command [arg1 ...]]\n")
        return 2
    try:
        script = Path(argv[-1]).read_text()
    except OSError:
        sys.stderr.write("qsub: script file:: No such file or directory\n")
        return 1
    options: list[str] = []
    for line in script_directives(script, "#PBS"):
        options += line.split()
    options += argv[:-1]
    chosen: dict[str, Any] = {"resources": {}, "variables": {}}
    pairs = iter(options)
    for option in pairs:
        if option in ("-j", "-V"):
            if option == "-j":
                next(pairs, None)
            continue
        value = next(pairs, None)
        if value is None or option not in ("-N", "-q", "-A", "-l", "-o", "-e", "-v"):
            sys.stderr.write(f"qsub: illegal -{option.lstrip('-')[:1]} value\n")
            return 2
        if option == "-l":
            for item in value.split(","):
                name, _, setting = item.partition("=")
                chosen["resources"][name] = setting
        elif option == "-v":
            for item in value.split(","):
                name, _, setting = item.partition("=")
                chosen["variables"][name] = setting
        else:
            chosen[option] = value
    queue = chosen.get("-q", control["default_queue"])
    if queue not in control["queues"]:
        sys.stderr.write("qsub: Unknown queue\n")
        return UNKNOWN_QUEUE
    account = chosen.get("-A")
    if control["accounts"] is not None and account not in control["accounts"]:
        sys.stderr.write(f"qsub: Project {account} has no allocation on this system (queuejob hook)\n")
        return HOOK_REJECTED
    name = chosen.get("-N", Path(argv[-1]).name)
    server = control["server"]
    workdir = os.getcwd()
    walltime = chosen["resources"].get("walltime")

    def named(number: int) -> dict[str, Any]:
        job_id = f"{number}.{server}"
        variables = {
            "PBS_JOBID": job_id,
            "PBS_JOBNAME": name,
            "PBS_QUEUE": queue,
            "PBS_O_WORKDIR": workdir,
            **chosen["variables"],
        }
        output = chosen.get("-o", f"{workdir}/{name}.o{number}")
        return {"id": job_id, "variables": variables, "output": output}

    job = batch.add(
        {
            "kind": "pbs",
            "name": name,
            "queue": queue,
            "account": account,
            "resources": chosen["resources"],
            "walltime_seconds": walltime_seconds(walltime) if walltime else None,
            "owner": f"{getpass.getuser()}@{socket.gethostname()}",
        },
        script,
        named,
    )
    print(job["id"])
    return 0


def _number(job_id: str) -> int | None:
    head = job_id.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _qualified(job_id: str, server: str) -> str:
    return job_id if "." in job_id else f"{job_id}.{server}"


def _pbs_job(batch: FakeBatch, job_id: str) -> dict[str, Any] | None:
    number = _number(job_id)
    job = batch.job(number) if number is not None else None
    return job if job is not None and job.get("kind") == "pbs" else None


def _ctime(epoch: float) -> str:
    return time.ctime(epoch)


def attributes(job: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """The attributes ``qstat -f`` shows for a job, a representative subset."""
    resources = {**job["resources"]}
    document: dict[str, Any] = {
        "Job_Name": job["name"],
        "Job_Owner": job["owner"],
        "job_state": "E" if job["deleted"] and job["state"] == RUNNING else LETTERS[job["state"]],
        "queue": job["queue"],
        "server": control["server"],
        "ctime": _ctime(job["submitted"]),
        "Output_Path": f"{socket.gethostname()}:{job['output']}",
        "Resource_List": resources,
        "substate": {QUEUED: 10, RUNNING: 42, DONE: 92}[job["state"]],
        "Variable_List": job["variables"],
    }
    if job["account"]:
        document["Account_Name"] = job["account"]
    if job["state"] == QUEUED:
        document["comment"] = "Not Running: Insufficient amount of resource: ncpus"
        if control["estimated_start_in"] is not None:
            start = job["submitted"] + float(control["estimated_start_in"])
            document["estimated"] = {"start_time": _ctime(start), "exec_vnode": "(x1000c0s0b0n0:ncpus=64)"}
    if job["started"] is not None:
        document["stime"] = _ctime(job["started"])
        document["comment"] = (
            f"Job run at {time.strftime('%a %b %d at %H:%M', time.localtime(job['started']))}"
        )
    if job["state"] == DONE:
        document["obittime"] = _ctime(job["ended"])
        if job["exit_status"] is not None:
            document["Exit_status"] = job["exit_status"]
        ran = job["started"] is not None
        document["comment"] = (document.get("comment", "") + " and finished") if ran else "Job deleted"
    return document


def qstat(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("qstat")
    control = batch.control()
    history = "-x" in argv
    rest = [arg for arg in argv if arg not in ("-x", "-f")]
    if rest[:2] != ["-F", "json"] or "-f" not in argv:
        sys.stderr.write("fake qstat: only `qstat [-x] -f -F json <job ids>` is imitated\n")
        return 2
    root: dict[str, Any] = {"timestamp": int(time.time()), "pbs_version": PBS_VERSION}
    root["pbs_server"] = control["server"]
    failed = 0
    for given in rest[2:]:
        job_id = _qualified(given, control["server"])
        job = _pbs_job(batch, given)
        if job is None:
            sys.stderr.write(f"qstat: Unknown Job Id {job_id}\n")
            failed = UNKNOWN_JOB
        elif job["state"] == DONE and not history:
            sys.stderr.write(
                f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job information\n"
            )
            failed = FINISHED_JOB
        else:
            root.setdefault("Jobs", {})[job["id"]] = attributes(job, control)
    print(json.dumps(root, indent="\t"))
    return failed


def qdel(argv: list[str]) -> int:
    batch = FakeBatch.from_environment()
    batch.hang_if_asked("qdel")
    control = batch.control()
    failed = 0
    for given in (arg for arg in argv if not arg.startswith("-")):
        job_id = _qualified(given, control["server"])
        job = _pbs_job(batch, given)
        before = batch.cancel(job["number"], DELETED_RUNNING) if job is not None else None
        if before is None:
            sys.stderr.write(f"qdel: Unknown Job Id {job_id}\n")
            failed = UNKNOWN_JOB
        elif before == DONE:
            sys.stderr.write(f"qdel: Job has finished {job_id}\n")
            failed = FINISHED_JOB
    return failed
