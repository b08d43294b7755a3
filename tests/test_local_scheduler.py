"""The local scheduler adaptor with real processes: jobs run detached, are read back from their
state directory (also by a new adaptor, as after a gateway restart), end on request or at their
walltime, and the simulated queue shows `queued`."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from adaptors.schedulers.contract import JobSpec, JobState, SchedulerError
from adaptors.schedulers.local import LocalScheduler


def scheduler(tmp_path: Path, **config: object) -> LocalScheduler:
    return LocalScheduler("local", {"state_dir": str(tmp_path / "jobs-state"), **config})


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


async def wait_for_state(local: LocalScheduler, job_id: str, state: JobState, within: float = 10) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = (await local.states([job_id]))[job_id]
        if status.state is state:
            return status.detail
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} never reached {state}: {status}")


async def test_a_job_runs_detached_with_its_environment_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_SECRET", "not for jobs")
    local = scheduler(tmp_path)
    spec = JobSpec(
        "pilot-x",
        python(
            "import os, time; "
            "print(os.environ['PILOT_GREETING'], 'GATEWAY_SECRET' in os.environ, flush=True); "
            "time.sleep(60)"
        ),
        walltime_seconds=600,
        environment={"PILOT_GREETING": "hello from the job"},
    )
    job_id = await local.submit(spec)
    await wait_for_state(local, job_id, JobState.running)
    log = tmp_path / "jobs-state" / "jobs" / job_id / "output.log"
    deadline = time.monotonic() + 5
    while b"hello from the job" not in log.read_bytes() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert b"hello from the job False" in log.read_bytes()  # the gateway's environment stays home
    assert b"not for jobs" not in (log.parent / "job.json").read_bytes()
    pid = json.loads((log.parent / "pid.json").read_text())["pid"]
    assert os.getsid(pid) == pid  # its own session: a gateway's signals do not reach it
    await local.end(job_id)
    detail = await wait_for_state(local, job_id, JobState.ended)
    assert "ended" in detail


async def test_a_restarted_gateway_reads_and_ends_the_jobs_of_the_last_one(tmp_path: Path) -> None:
    job_id = await scheduler(tmp_path).submit(JobSpec("pilot", python("import time; time.sleep(60)"), 600))
    again = scheduler(tmp_path)
    await wait_for_state(again, job_id, JobState.running)
    await again.end(job_id)
    await wait_for_state(again, job_id, JobState.ended)


async def test_a_finished_job_reports_its_exit_status(tmp_path: Path) -> None:
    local = scheduler(tmp_path)
    job_id = await local.submit(JobSpec("pilot", python("raise SystemExit(3)"), 600))
    assert "exit status 3" in await wait_for_state(local, job_id, JobState.ended)


async def test_a_job_past_its_walltime_is_ended(tmp_path: Path) -> None:
    local = scheduler(tmp_path)
    started = time.monotonic()
    job_id = await local.submit(JobSpec("pilot", python("import time; time.sleep(60)"), walltime_seconds=1))
    assert "walltime exceeded" in await wait_for_state(local, job_id, JobState.ended)
    assert 1 <= time.monotonic() - started < 5


async def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    local = scheduler(tmp_path, end_grace_seconds=0.5)
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    job_id = await local.submit(JobSpec("pilot", python(code), 600))
    await wait_for_state(local, job_id, JobState.running)
    log = tmp_path / "jobs-state" / "jobs" / job_id / "output.log"
    while b"up" not in log.read_bytes():
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await local.end(job_id)
    assert time.monotonic() - started < 5
    await wait_for_state(local, job_id, JobState.ended)


async def test_the_simulated_queue_shows_queued_with_an_estimated_start(tmp_path: Path) -> None:
    local = scheduler(tmp_path, queue_delay_seconds=1)
    before = time.time()
    job_id = await local.submit(JobSpec("pilot", python("import time; time.sleep(60)"), 600))
    status = (await local.states([job_id]))[job_id]
    assert status.state is JobState.queued
    assert status.estimated_start is not None and before + 0.9 < status.estimated_start < time.time() + 1.1
    await wait_for_state(local, job_id, JobState.running)
    await local.end(job_id)


async def test_ending_a_queued_job_ends_it(tmp_path: Path) -> None:
    local = scheduler(tmp_path, queue_delay_seconds=30)
    job_id = await local.submit(JobSpec("pilot", python("import time; time.sleep(60)"), 600))
    await local.end(job_id)
    assert "ended" in await wait_for_state(local, job_id, JobState.ended)


async def test_a_reused_pid_does_not_pass_for_the_job(tmp_path: Path) -> None:
    local = scheduler(tmp_path)
    job_id = await local.submit(JobSpec("pilot", python("import time; time.sleep(60)"), 600))
    await wait_for_state(local, job_id, JobState.running)
    pid_file = tmp_path / "jobs-state" / "jobs" / job_id / "pid.json"
    recorded = json.loads(pid_file.read_text())
    pid_file.write_text(json.dumps({**recorded, "start_time": recorded["start_time"] + 1}))
    assert (await local.states([job_id]))[job_id].state is JobState.ended
    pid_file.write_text(json.dumps(recorded))
    await local.end(job_id)


async def test_staged_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    local = scheduler(tmp_path)
    path = await local.stage(b'{"token": "secret"}', "pilot-abc.json")
    assert path == local.staging_path("pilot-abc.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Path(path).read_bytes() == b'{"token": "secret"}'
    with pytest.raises(SchedulerError):
        await local.stage(b"", "../escape.json")


async def test_unknown_jobs_are_ended_and_foreign_ids_refused(tmp_path: Path) -> None:
    local = scheduler(tmp_path)
    assert (await local.states(["local-0123456789abcdef"]))["local-0123456789abcdef"].state is JobState.ended
    with pytest.raises(SchedulerError):
        await local.states(["local-../../etc"])


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "config.state_dir"),
        ({"state_dir": "relative/dir"}, "config.state_dir"),
        ({"state_dir": "/tmp/x", "queue_delay_seconds": -1}, "config.queue_delay_seconds"),
        ({"state_dir": "/tmp/x", "end_grace_seconds": "soon"}, "config.end_grace_seconds"),
        ({"state_dir": "/tmp/x", "queue": "debug"}, "config.queue"),
    ],
)
def test_a_wrong_config_names_its_field(config: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalScheduler("local", config)
