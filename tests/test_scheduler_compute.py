"""The Globus Compute scheduler adaptor: the real SDKs against the fake Globus Auth and Compute
services, whose endpoint runs compute-functions/pilot_scheduler.py for real, which runs the fake
qsub, qstat and qdel on PATH (as the login node's would)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from adaptors.schedulers.contract import JobSpec, JobState, SchedulerError
from adaptors.schedulers.globus_compute import GlobusComputeScheduler
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_schedulers import BIN
from testing.fake_schedulers.table import DIRECTORY_VARIABLE, FakeBatch
from tests.compute_setup import ROOT, SERVICE_ID, SERVICE_SECRET
from tests.scheduler_setup import adaptor_context, number

ENDPOINT = "5c3f1a2b-7d4e-4f60-8a91-0b2c3d4e5f60"
FUNCTION = "22222222-aaaa-4bbb-8ccc-000000000001"
SERVER = "fake-pbs-01.hsn.cm.example.org"


def load_function() -> Callable[[dict[str, Any]], Any]:
    spec = importlib.util.spec_from_file_location(
        "pilot_scheduler", ROOT / "compute-functions" / "pilot_scheduler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pilot_scheduler  # type: ignore[no-any-return]


def shipped_alone() -> Callable[[dict[str, Any]], Any]:
    """The function as a source-text registration ships it: its own text, run in an empty namespace."""
    namespace: dict[str, Any] = {}
    exec(inspect.getsource(load_function()), namespace)
    return namespace["pilot_scheduler"]  # type: ignore[no-any-return]


@pytest.fixture
def batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBatch:
    """The login node's environment: the fake commands on PATH, their job table."""
    fake = FakeBatch(tmp_path / "batch")
    fake.configure(queue_seconds=3600)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(DIRECTORY_VARIABLE, str(fake.directory))
    return fake


@pytest.fixture
async def compute(globus: FakeGlobus) -> AsyncIterator[FakeCompute]:
    async with FakeCompute(accepted_tokens=lambda token: token in globus.issued_tokens) as fake:
        fake.add_endpoint(ENDPOINT)
        fake.register_function(FUNCTION, shipped_alone())
        yield fake


def config(compute: FakeCompute, globus: FakeGlobus, tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {
        "endpoint_uuid": ENDPOINT,
        "function_uuid": FUNCTION,
        "client_id": SERVICE_ID,
        "client_secret": SERVICE_SECRET,
        "compute_url": compute.url,
        "auth_url": globus.auth_url,
        "poll_interval_seconds": 0.05,
        "staging_directory": str(tmp_path / "staging"),
        "queue": "debug",
        "account": "inference",
        "filesystems": "home:eagle",
        **more,
    }


@pytest.fixture
async def scheduler(
    batch: FakeBatch, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> AsyncIterator[GlobusComputeScheduler]:
    adaptor = GlobusComputeScheduler("polaris", config(compute, globus, tmp_path))
    async with adaptor_context() as context:
        await adaptor.startup(context)
        yield adaptor
        await adaptor.shutdown()


def pilot(**more: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "name": "pilot-llama-1",
        "command": ("python", "-m", "pilot", "--config", "/staging/pilot-llama-1.json"),
        "walltime_seconds": 3600,
    }
    return JobSpec(**{**fields, **more})


async def test_a_job_through_compute_is_queued_runs_and_is_deleted(
    scheduler: GlobusComputeScheduler, batch: FakeBatch, compute: FakeCompute, tmp_path: Path
) -> None:
    job_id = await scheduler.submit(pilot())
    assert job_id == f"1000.{SERVER}"
    script = next((tmp_path / "staging").glob("*.pbs"))
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    assert "#PBS -l filesystems=home:eagle" in script.read_text().splitlines()
    assert (await scheduler.states([job_id, "4242"]))[job_id].state is JobState.queued
    batch.start(number(job_id))
    found = await scheduler.states([job_id, "4242"])
    assert (found[job_id].state, found["4242"].state) == (JobState.running, JobState.unknown)
    await scheduler.end(job_id)
    ended = (await scheduler.states([job_id]))[job_id]
    assert ended.state is JobState.ended and "Exit_status=271" in ended.detail
    await scheduler.end(job_id)  # qdel: Job has finished
    actions = [task.args[0]["action"] for task in compute.tasks.values()]
    assert actions == ["stage", "submit", "states", "states", "end", "states", "end"]


async def test_stage_through_compute(scheduler: GlobusComputeScheduler, tmp_path: Path) -> None:
    path = await scheduler.stage(b'{"replica": 1}', "pilot-llama-1.json")
    assert (
        path
        == str(tmp_path / "staging" / "pilot-llama-1.json")
        == scheduler.staging_path("pilot-llama-1.json")
    )
    assert Path(path).read_bytes() == b'{"replica": 1}'
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600


async def test_the_endpoint_may_pin_the_staging_directory(
    scheduler: GlobusComputeScheduler, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PILOT_STAGING_DIRECTORY", str(tmp_path / "elsewhere"))
    with pytest.raises(SchedulerError) as refused:
        await scheduler.stage(b"x", "a.json")
    assert not refused.value.retryable and "stages files in" in refused.value.message


async def test_a_refused_qsub_through_compute(scheduler: GlobusComputeScheduler) -> None:
    with pytest.raises(SchedulerError) as refused:
        await scheduler.submit(pilot(resources={"queue": "nosuch"}))
    assert refused.value.message == "qsub failed: qsub: Unknown queue" and not refused.value.retryable


async def test_an_unknown_function_is_not_retryable_and_an_outage_is(
    batch: FakeBatch, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> None:
    other = "33333333-aaaa-4bbb-8ccc-000000000009"
    adaptor = GlobusComputeScheduler("polaris", config(compute, globus, tmp_path, function_uuid=other))
    async with adaptor_context() as context:
        await adaptor.startup(context)
        with pytest.raises(SchedulerError) as unknown:
            await adaptor.states(["1000"])
        assert not unknown.value.retryable and "404" in unknown.value.message
        await adaptor.shutdown()
    adaptor = GlobusComputeScheduler("polaris", config(compute, globus, tmp_path))
    compute.fail_status = 503
    async with adaptor_context() as context:
        await adaptor.startup(context)
        with pytest.raises(SchedulerError) as outage:
            await adaptor.states(["1000"])
        assert outage.value.retryable
        await adaptor.shutdown()


async def test_a_task_that_does_not_finish_in_time_is_retryable(
    batch: FakeBatch, compute: FakeCompute, globus: FakeGlobus, tmp_path: Path
) -> None:
    compute.queue_delay = 5
    adaptor = GlobusComputeScheduler("polaris", config(compute, globus, tmp_path, task_timeout_seconds=0.3))
    async with adaptor_context() as context:
        await adaptor.startup(context)
        with pytest.raises(SchedulerError) as late:
            await adaptor.states(["1000"])
        assert late.value.retryable and "did not finish within 0.3 s" in late.value.message
        await adaptor.shutdown()


def test_config_errors_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVICE_ACCOUNT_ID", raising=False)
    base = {"endpoint_uuid": ENDPOINT, "function_uuid": FUNCTION, "staging_directory": "/s"}
    with pytest.raises(ValueError, match=r"config\.function_uuid"):
        GlobusComputeScheduler(
            "polaris", {**base, "client_id": "a", "client_secret": "b", "function_uuid": "x"}
        )
    with pytest.raises(ValueError, match="SERVICE_ACCOUNT_ID"):
        GlobusComputeScheduler("polaris", base)
