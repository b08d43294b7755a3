"""The PBS scheduler adaptor against fake qsub, qstat and qdel on PATH that print what OpenPBS
prints (testing/fake_schedulers/pbs.py), keeping their jobs in a table on disk."""

from __future__ import annotations

import asyncio
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adaptors.schedulers.contract import JobSpec, JobState, SchedulerError
from adaptors.schedulers.pbs import PbsScheduler
from testing.fake_schedulers.table import FakeBatch
from tests.scheduler_setup import adaptor_context, batch_on_path, common_config, number, wait_for_state

SERVER = "fake-pbs-01.hsn.cm.example.org"


@pytest.fixture
def batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBatch:
    fake = batch_on_path(tmp_path, monkeypatch)
    fake.configure(queue_seconds=3600)
    return fake


def config(batch: FakeBatch, tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {**common_config(batch, tmp_path), "queue": "debug", "account": "inference", **more}


@pytest.fixture
async def pbs(batch: FakeBatch, tmp_path: Path) -> AsyncIterator[PbsScheduler]:
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, filesystems="home:eagle"))
    async with adaptor_context() as context:
        await scheduler.startup(context)
        yield scheduler
        await scheduler.shutdown()


def pilot(**more: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "name": "pilot-llama-1",
        "command": ("python", "-m", "pilot", "--config", "/staging/pilot-llama-1.json"),
        "walltime_seconds": 2 * 3600 + 30,
    }
    return JobSpec(**{**fields, **more})


async def test_a_job_is_queued_then_runs_then_finishes(pbs: PbsScheduler, batch: FakeBatch) -> None:
    job_id = await pbs.submit(pilot())
    assert job_id == f"1000.{SERVER}"
    status = (await pbs.states([job_id]))[job_id]
    assert status.state is JobState.queued
    assert "job_state=Q" in status.detail and "Not Running" in status.detail
    batch.start(number(job_id))
    assert (await pbs.states([job_id]))[job_id].state is JobState.running
    batch.finish(number(job_id), exit_status=3)
    ended = (await pbs.states([job_id]))[job_id]
    assert ended.state is JobState.ended
    assert "job_state=F" in ended.detail and "Exit_status=3" in ended.detail


async def test_the_script_holds_the_directives_the_environment_and_the_command(
    pbs: PbsScheduler, batch: FakeBatch, tmp_path: Path
) -> None:
    spec = pilot(
        resources={"select": "2:ncpus=64:ngpus=4", "queue": "prod"},
        environment={"PILOT_LOG": "debug it's"},
        working_directory="/lus/eagle/projects/inference",
    )
    job_id = await pbs.submit(spec)
    scripts = sorted((tmp_path / "staging").glob("*.pbs"))
    assert len(scripts) == 1 and stat.S_IMODE(scripts[0].stat().st_mode) == 0o600
    log = str(scripts[0]).removesuffix(".pbs") + ".log"
    assert scripts[0].read_text().splitlines() == [
        "#!/bin/bash",
        "#PBS -N pilot-llama-1",
        "#PBS -l walltime=02:00:30",
        "#PBS -q prod",
        "#PBS -A inference",
        "#PBS -l select=2:ncpus=64:ngpus=4",
        "#PBS -l filesystems=home:eagle",
        "#PBS -j oe",
        f"#PBS -o {log}",
        "export PILOT_LOG='debug it'\"'\"'s'",
        "cd /lus/eagle/projects/inference",
        "exec python -m pilot --config /staging/pilot-llama-1.json",
    ]
    recorded = batch.job(number(job_id))
    assert recorded is not None
    assert (recorded["queue"], recorded["account"], recorded["walltime_seconds"]) == (
        "prod",
        "inference",
        7230,
    )
    assert recorded["resources"]["filesystems"] == "home:eagle"


async def test_a_pilot_script_runs_for_real_and_qdel_stops_it(batch: FakeBatch, tmp_path: Path) -> None:
    """With run_scripts the fake runs the job: the preamble, the environment and the command."""
    batch.configure(run_scripts=True, queue_seconds=0.2)
    marker = tmp_path / "ran"
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, preamble=["export FROM_PREAMBLE=yes"]))
    async with adaptor_context() as context:
        await scheduler.startup(context)
        code = (
            "import os,sys,time; env = os.environ;"
            "open(sys.argv[1],'w').write(env['FROM_PREAMBLE'] + env['GREETING']);"
            "print('pilot up', flush=True); time.sleep(60)"
        )
        spec = pilot(command=(sys.executable, "-c", code, str(marker)), environment={"GREETING": "hi"})
        job_id = await scheduler.submit(spec)
        await wait_for_state(lambda: scheduler.states([job_id]), job_id, JobState.running)
        for _ in range(100):
            if marker.exists() and marker.read_text():
                break
            await asyncio.sleep(0.05)
        assert marker.read_text() == "yeshi"
        await scheduler.end(job_id)
        ended = await wait_for_state(lambda: scheduler.states([job_id]), job_id, JobState.ended)
        assert "Exit_status=271" in ended.detail
        log = next((tmp_path / "staging").glob("*.log"))
        assert "pilot up" in log.read_text()


async def test_qdel_lets_a_pilot_stop_cleanly_then_kills_one_that_does_not(
    batch: FakeBatch, tmp_path: Path
) -> None:
    """SIGTERM first; SIGKILL after kill_delay for a script that ignores it. Until the script has
    exited the job is exiting (E), which already counts as ended."""
    batch.configure(run_scripts=True, queue_seconds=0, kill_delay_seconds=0.5)
    scheduler = PbsScheduler("polaris", config(batch, tmp_path))
    async with adaptor_context() as context:
        await scheduler.startup(context)
        polite = "trap 'echo stopping; exit 0' TERM; echo up; sleep 60 & wait"
        stubborn = "trap '' TERM; echo up; sleep 60 & wait; sleep 60"
        ids = [
            await scheduler.submit(pilot(command=("/bin/bash", "-c", code))) for code in (polite, stubborn)
        ]
        for job_id in ids:
            await wait_for_state(lambda: scheduler.states(ids), job_id, JobState.running)
            await scheduler.end(job_id)
        for job_id, exit_status in zip(ids, (0, 265), strict=True):
            for _ in range(100):
                recorded = batch.job(number(job_id))
                if recorded is not None and recorded["state"] == "done":
                    break
                await asyncio.sleep(0.05)
            ended = (await scheduler.states([job_id]))[job_id]
            assert ended.state is JobState.ended and f"Exit_status={exit_status}" in ended.detail
            assert "job_state=F" in ended.detail


async def test_a_script_that_exits_ends_its_job(batch: FakeBatch, tmp_path: Path) -> None:
    batch.configure(run_scripts=True, queue_seconds=0)
    scheduler = PbsScheduler("polaris", config(batch, tmp_path))
    async with adaptor_context() as context:
        await scheduler.startup(context)
        job_id = await scheduler.submit(pilot(command=("/bin/sh", "-c", "exit 7")))
        ended = await wait_for_state(lambda: scheduler.states([job_id]), job_id, JobState.ended)
        assert "Exit_status=7" in ended.detail


async def test_many_ids_in_one_call_and_an_unknown_id_among_them(pbs: PbsScheduler, batch: FakeBatch) -> None:
    first, second = await pbs.submit(pilot()), await pbs.submit(pilot(name="pilot-llama-2"))
    batch.start(number(second))
    forgotten = await pbs.submit(pilot(name="pilot-old"))
    batch.finish(number(forgotten))
    batch.forget(number(forgotten))
    found = await pbs.states([first, second, forgotten, "4242"])
    assert [found[job_id].state for job_id in (first, second, forgotten, "4242")] == [
        JobState.queued, JobState.running, JobState.unknown, JobState.unknown,
    ]  # fmt: skip
    assert await pbs.states([]) == {}


async def test_qdel_of_a_finished_or_forgotten_job_is_not_an_error(
    pbs: PbsScheduler, batch: FakeBatch
) -> None:
    job_id = await pbs.submit(pilot())
    await pbs.end(job_id)
    assert (await pbs.states([job_id]))[job_id].state is JobState.ended
    await pbs.end(job_id)  # qdel: Job has finished
    batch.forget(number(job_id))
    await pbs.end(job_id)  # qdel: Unknown Job Id


async def test_the_estimated_start_of_a_queued_job(pbs: PbsScheduler, batch: FakeBatch) -> None:
    batch.configure(estimated_start_in=600)
    before = time.time()
    job_id = await pbs.submit(pilot())
    status = (await pbs.states([job_id]))[job_id]
    assert status.estimated_start is not None
    assert before + 600 - 1 <= status.estimated_start <= time.time() + 600


async def test_a_refused_qsub_is_not_retryable_and_says_why(pbs: PbsScheduler, batch: FakeBatch) -> None:
    with pytest.raises(SchedulerError) as refused:
        await pbs.submit(pilot(resources={"queue": "nosuch"}))
    assert not refused.value.retryable
    assert refused.value.message == "qsub failed: qsub: Unknown queue"
    batch.configure(accounts=["other"])
    with pytest.raises(SchedulerError) as rejected:
        await pbs.submit(pilot())
    assert not rejected.value.retryable and "has no allocation" in rejected.value.message


async def test_resources_the_adaptor_does_not_know_or_cannot_write_are_refused(pbs: PbsScheduler) -> None:
    for resources, field in (
        ({"nodes": 2}, "resources.nodes"),
        ({"queue": "debug\n#PBS -l select=100"}, "resources.queue"),
        ({"select": "1 -W x"}, "resources.select"),
    ):
        with pytest.raises(SchedulerError) as refused:
            await pbs.submit(pilot(resources=resources))
        assert refused.value.message.startswith(field) and not refused.value.retryable
    with pytest.raises(SchedulerError, match="environment"):
        await pbs.submit(pilot(environment={"A B": "x"}))
    with pytest.raises(SchedulerError, match="not a PBS job id"):
        await pbs.states(["1; rm -rf /"])


async def test_a_command_that_hangs_is_killed_at_its_deadline(batch: FakeBatch, tmp_path: Path) -> None:
    batch.configure(delay_seconds={"qstat": 30})
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, command_timeout_seconds=0.5))
    started = time.monotonic()
    with pytest.raises(SchedulerError) as late:
        await scheduler.states(["1000"])
    assert late.value.retryable and "did not finish within 0.5 s" in late.value.message
    assert time.monotonic() - started < 5


async def test_commands_wait_their_turn(batch: FakeBatch, tmp_path: Path) -> None:
    """One command at a time on the login node: two qstat calls of 1 s each take 2 s together."""
    batch.configure(delay_seconds={"qstat": 1})
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, max_concurrent_commands=1))
    started = time.monotonic()
    await asyncio.gather(scheduler.states(["1000"]), scheduler.states(["1001"]))
    assert time.monotonic() - started >= 2


async def test_a_flood_of_output_is_cut_and_the_message_bounded(batch: FakeBatch, tmp_path: Path) -> None:
    noisy = tmp_path / "noisy-qstat"
    noisy.write_text("#!/bin/sh\nhead -c 5000000 /dev/zero | tr '\\0' x >&2\nexit 1\n")
    noisy.chmod(0o755)
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, qstat=str(noisy)))
    with pytest.raises(SchedulerError) as failed:
        await scheduler.states(["1000"])
    assert failed.value.message.startswith("qstat failed: xxx") and len(failed.value.message) < 600


async def test_a_child_left_holding_the_output_does_not_hold_the_answer(
    batch: FakeBatch, tmp_path: Path
) -> None:
    """Like ssh's ControlPersist master, a child of the command keeps its pipes open for long."""
    lingering = tmp_path / "lingering-qstat"
    lingering.write_text('#!/bin/sh\nsleep 30 &\necho \'{"timestamp": 1, "pbs_server": "s"}\'\n')
    lingering.chmod(0o755)
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, qstat=str(lingering)))
    started = time.monotonic()
    assert (await scheduler.states(["1000"]))["1000"].state is JobState.unknown
    assert time.monotonic() - started < 10


async def test_a_missing_command_is_not_retryable(batch: FakeBatch, tmp_path: Path) -> None:
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, qstat="/nonexistent/qstat"))
    with pytest.raises(SchedulerError) as missing:
        await scheduler.states(["1000"])
    assert not missing.value.retryable


async def test_stage_writes_a_private_file_at_once(pbs: PbsScheduler, tmp_path: Path) -> None:
    path = await pbs.stage(b'{"replica": 1}', "pilot-llama-1.json")
    assert path == str(tmp_path / "staging" / "pilot-llama-1.json") == pbs.staging_path("pilot-llama-1.json")
    assert Path(path).read_bytes() == b'{"replica": 1}'
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    await pbs.stage(b"second", "pilot-llama-1.json")
    assert Path(path).read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == ["pilot-llama-1.json"]
    with pytest.raises(SchedulerError):
        await pbs.stage(b"x", "../escape.json")


def test_the_job_side_staging_directory_may_differ(batch: FakeBatch, tmp_path: Path) -> None:
    scheduler = PbsScheduler("polaris", config(batch, tmp_path, job_staging_directory="/lus/eagle/pilots/"))
    assert scheduler.staging_path("a.json") == "/lus/eagle/pilots/a.json"


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({}, "config.staging_directory"),
        ({"staging_directory": "relative/dir"}, "config.staging_directory"),
        ({"staging_directory": "/s", "queu": "debug"}, "config.queu"),
        ({"staging_directory": "/s", "command_timeout_seconds": 0}, "config.command_timeout_seconds"),
        ({"staging_directory": "/s", "preamble": ["module load x\nrm -rf ~"]}, "config.preamble"),
    ],
)
def test_config_errors_name_the_field(given: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PbsScheduler("polaris", given)
