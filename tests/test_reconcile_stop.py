"""A stopping gateway waits for the jobs it is ending once, not once per job: with the deployed
wait (30 s), three jobs whose end takes a minute each hold the stop for 30 s, not 60 or more.

Real parts: the SQLite deployment store, the local scheduler and its job wrapper, jobs whose
command ignores SIGTERM (as a model server busy writing a checkpoint may), so that each end takes
the scheduler's whole grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from adaptors.schedulers.contract import JobSpec
from adaptors.schedulers.local import LocalScheduler
from proxy.core.deployments.reconcile import ENDING_WAIT_SECONDS, Reconciler
from proxy.core.deployments.replicas import ConfiguredScheduler, Parts
from proxy.metrics.prometheus import Metrics
from proxy.records.deployment_store import DeploymentStore, ReplicaRecord
from proxy.records.schema import connect
from proxy.settings.on_demand import OnDemandSettings, SchedulerSettings

STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').close(); time.sleep(300)"
)
"""A job that ignores SIGTERM; it says so by creating the file its argument names."""
END_GRACE_SECONDS = 60


async def _stubborn_job(scheduler: LocalScheduler, marker: Path) -> str:
    job_id = await scheduler.submit(
        JobSpec(name="stubborn", command=(sys.executable, "-c", STUBBORN, str(marker)), walltime_seconds=600)
    )
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the stubborn job never started"
        await asyncio.sleep(0.05)
    return job_id


def _kill_jobs(state_dir: Path) -> None:
    """What the scheduler would do after its grace: every job's session, SIGKILL."""
    for pid_file in state_dir.glob("jobs/*/pid.json"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(json.loads(pid_file.read_text())["pid"], signal.SIGKILL)


async def test_a_stopping_gateway_waits_for_the_jobs_it_ends_once_not_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "jobs"
    config = {"state_dir": str(state_dir), "end_grace_seconds": END_GRACE_SECONDS}
    scheduler = LocalScheduler("local", config)
    entry = SchedulerSettings(
        adapter="adaptors.schedulers.local.LocalScheduler",
        config=config,
        pilot_command=("unused",),
        pilot_certificate="unused",
        pilot_key="unused",
        pilot_ca="unused",
    )
    database = await connect(f"sqlite:///{tmp_path / 'gw.db'}")
    try:
        store = DeploymentStore(database)
        for number in range(3):
            job_id = await _stubborn_job(scheduler, tmp_path / f"started-{number}")
            replica = ReplicaRecord(
                replica_id=f"replica-{number}",
                deployment="llama",
                cluster="local",
                scheduler="local",
                job_id=job_id,
                phase="ready",
                token_hash=f"hash-{number}",
                created=time.time(),
            )
            await store.add(replica)
        parts = Parts(
            OnDemandSettings(undeclared_grace_seconds=0),
            {"local": ConfiguredScheduler(entry, scheduler)},
            store,
            Metrics(),
            "http://127.0.0.1:9/pilots",
            ("CN=gateway,O=Test Lab",),
        )
        reconciler = Reconciler(parts, dict, dict, "this-process")
        assert await reconciler.run_once()  # "llama" is declared nowhere: its replicas are ended
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            await reconciler.resign()
        took = time.monotonic() - started
        assert ENDING_WAIT_SECONDS - 1 < took < ENDING_WAIT_SECONDS + 5, took
        assert "3 jobs still ending after 30 s, left to their pilots" in caplog.text
        assert await store.live() == [], "each replica was marked ended before its job was"
    finally:
        _kill_jobs(state_dir)
        await database.close()
