"""The Slurm scheduler adaptor against fake sbatch, squeue, sacct and scancel on PATH that print
what Slurm prints (testing/fake_schedulers/slurm.py)."""

from __future__ import annotations

import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adaptors.schedulers.contract import JobSpec, JobState, SchedulerError
from adaptors.schedulers.slurm import SlurmScheduler
from testing.fake_schedulers.table import FakeBatch
from tests.scheduler_setup import adaptor_context, batch_on_path, common_config, fake_ssh, wait_for_state


@pytest.fixture
def batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBatch:
    fake = batch_on_path(tmp_path, monkeypatch)
    fake.configure(queue_seconds=3600)
    return fake


def config(batch: FakeBatch, tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {**common_config(batch, tmp_path), "partition": "debug", "account": "inference", **more}


@pytest.fixture
async def slurm(batch: FakeBatch, tmp_path: Path) -> AsyncIterator[SlurmScheduler]:
    scheduler = SlurmScheduler("cluster", config(batch, tmp_path))
    async with adaptor_context() as context:
        await scheduler.startup(context)
        yield scheduler


def pilot(**more: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "name": "pilot-llama-1",
        "command": ("python", "-m", "pilot", "--config", "/staging/pilot-llama-1.json"),
        "walltime_seconds": 26 * 3600,
    }
    return JobSpec(**{**fields, **more})


async def test_a_job_is_pending_then_runs_then_completes(slurm: SlurmScheduler, batch: FakeBatch) -> None:
    job_id = await slurm.submit(pilot())
    assert job_id == "1000"
    status = (await slurm.states([job_id]))[job_id]
    assert (status.state, status.detail, status.estimated_start) == (
        JobState.queued, "PENDING; reason=Priority", None,
    )  # fmt: skip
    batch.start(1000)
    assert (await slurm.states([job_id]))[job_id].state is JobState.running
    batch.finish(1000, exit_status=1)
    assert (await slurm.states([job_id]))[job_id].detail == "FAILED"


async def test_jobs_squeue_forgot_are_asked_of_sacct(slurm: SlurmScheduler, batch: FakeBatch) -> None:
    """Past MinJobAge squeue no longer lists a job; sacct remembers how it ended."""
    done, cancelled = await slurm.submit(pilot()), await slurm.submit(pilot())
    batch.finish(int(done), exit_status=0)
    await slurm.end(cancelled)
    for job_id in (done, cancelled):
        batch.update(int(job_id), ended=time.time() - 600)
    found = await slurm.states([done, cancelled, "4242"])
    assert found[done].state is JobState.ended and found[done].detail == "COMPLETED; ExitCode=0:0"
    assert found[cancelled].state is JobState.ended and found[cancelled].detail.startswith("CANCELLED by ")
    assert found["4242"].state is JobState.unknown
    assert (await slurm.states(["4242"]))["4242"].state is JobState.unknown  # squeue: Invalid job id
    batch.configure(accounting=False)
    assert (await slurm.states([done]))[done].state is JobState.unknown


async def test_timeout_and_node_failure_are_ended(slurm: SlurmScheduler, batch: FakeBatch) -> None:
    first, second = await slurm.submit(pilot()), await slurm.submit(pilot())
    batch.finish(int(first), exit_status=0, ended_by="walltime")
    batch.finish(int(second), exit_status=1, ended_by="node_fail")
    found = await slurm.states([first, second])
    assert [found[first].detail, found[second].detail] == ["TIMEOUT", "NODE_FAIL"]
    assert {found[first].state, found[second].state} == {JobState.ended}


async def test_the_expected_start_is_read_in_epoch_seconds(slurm: SlurmScheduler, batch: FakeBatch) -> None:
    batch.configure(estimated_start_in=900)
    before = time.time()
    job_id = await slurm.submit(pilot())
    start = (await slurm.states([job_id]))[job_id].estimated_start
    assert start is not None and before + 899 <= start <= time.time() + 900


async def test_the_script_as_written(slurm: SlurmScheduler, batch: FakeBatch, tmp_path: Path) -> None:
    job_id = await slurm.submit(pilot(resources={"nodes": 2, "gres": "gpu:4"}))
    script = next((tmp_path / "staging").glob("*.sbatch"))
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    log = str(script).removesuffix(".sbatch") + ".log"
    assert script.read_text().splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=pilot-llama-1",
        "#SBATCH --time=26:00:00",
        "#SBATCH --partition=debug",
        "#SBATCH --account=inference",
        "#SBATCH --nodes=2",
        "#SBATCH --gres=gpu:4",
        f"#SBATCH --output={log}",
        f"cd {tmp_path / 'staging'}",
        "exec python -m pilot --config /staging/pilot-llama-1.json",
    ]
    recorded = batch.job(int(job_id))
    assert recorded is not None and recorded["walltime_seconds"] == 26 * 3600
    assert recorded["resources"] == {"nodes": "2", "gres": "gpu:4"}


async def test_a_pilot_script_runs_for_real_and_scancel_stops_it(batch: FakeBatch, tmp_path: Path) -> None:
    batch.configure(run_scripts=True, queue_seconds=0)
    scheduler = SlurmScheduler("cluster", config(batch, tmp_path))
    async with adaptor_context() as context:
        await scheduler.startup(context)
        code = "import os,time; print('job', os.environ['SLURM_JOB_ID'], flush=True); time.sleep(60)"
        job_id = await scheduler.submit(pilot(command=(sys.executable, "-c", code)))
        await wait_for_state(lambda: scheduler.states([job_id]), job_id, JobState.running)
        await scheduler.end(job_id)
        ended = await wait_for_state(lambda: scheduler.states([job_id]), job_id, JobState.ended)
        assert ended.detail == "CANCELLED"
        await scheduler.end(job_id)  # already ended: silent
        await scheduler.end("4242")  # forgotten: Invalid job id specified


async def test_refusals_say_why_and_are_not_retryable(slurm: SlurmScheduler, batch: FakeBatch) -> None:
    with pytest.raises(SchedulerError) as refused:
        await slurm.submit(pilot(resources={"partition": "gpu"}))
    assert not refused.value.retryable
    assert refused.value.message == (
        "sbatch failed: sbatch: error: Batch job submission failed: Invalid partition name specified"
    )
    with pytest.raises(SchedulerError, match=r"resources\.queue"):
        await slurm.submit(pilot(resources={"queue": "debug"}))


async def test_commands_through_ssh_are_quoted_for_its_shell(batch: FakeBatch, tmp_path: Path) -> None:
    """ssh hands the words to a shell: squeue's `%i|%T|...` format must reach squeue intact."""
    ssh = fake_ssh(tmp_path)
    scheduler = SlurmScheduler(
        "cluster", config(batch, tmp_path, command_prefix=[ssh, "login-node"], prefix_runs_shell=True)
    )
    job_id = await scheduler.submit(pilot())
    assert (await scheduler.states([job_id]))[job_id].state is JobState.queued
    await scheduler.end(job_id)
    assert (await scheduler.states([job_id]))[job_id].state is JobState.ended


async def test_an_unreachable_login_node_is_retryable(batch: FakeBatch, tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, exit_status=255)
    scheduler = SlurmScheduler(
        "cluster", config(batch, tmp_path, command_prefix=[ssh, "login-node"], prefix_runs_shell=True)
    )
    with pytest.raises(SchedulerError) as unreachable:
        await scheduler.states(["1000"])
    assert unreachable.value.retryable and "Connection refused" in unreachable.value.message


async def test_a_hung_squeue_is_killed_at_its_deadline(batch: FakeBatch, tmp_path: Path) -> None:
    batch.configure(delay_seconds={"squeue": 30})
    scheduler = SlurmScheduler("cluster", config(batch, tmp_path, command_timeout_seconds=0.5))
    started = time.monotonic()
    with pytest.raises(SchedulerError) as late:
        await scheduler.states(["1000"])
    assert late.value.retryable and time.monotonic() - started < 5


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.nodes"):
        SlurmScheduler("cluster", {"staging_directory": "/s", "nodes": "many"})
    with pytest.raises(ValueError, match=r"config\.partiton"):
        SlurmScheduler("cluster", {"staging_directory": "/s", "partiton": "debug"})
