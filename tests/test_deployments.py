"""The on-demand controller with real parts: the gateway's real pilot routes, the local scheduler
starting a stand-in pilot as a real process (tests/standin_pilot.py), mTLS on loopback, and the
database. Scale from zero, the idle timeout, a killed job replaced on the next want, back-off,
adoption by a restarted gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from adaptors.deployments import Phase
from adaptors.schedulers.contract import JobState
from proxy.core.deployments.controller import Controller
from proxy.records.deployment_store import DeploymentStore
from tests.deployment_setup import (
    Site,
    call_replica,
    on_demand_site,
    scheduler_entry,
    spec,
    start_on_demand,
    until,
    until_routed,
    write_on_demand_config,
)
from tests.support import free_port


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from on_demand_site(tmp_path)


def store_of(controller: Controller) -> DeploymentStore:
    assert controller.reconciler is not None
    return controller.reconciler.parts.store


async def job_state(controller: Controller, replica_id: str) -> JobState:
    record = await store_of(controller).get(replica_id)
    assert record is not None and record.job_id is not None
    scheduler = controller.reconciler.parts.schedulers[record.scheduler].scheduler  # type: ignore[union-attr]
    return (await scheduler.states([record.job_id]))[record.job_id].state


async def test_a_want_starts_a_replica_that_serves_then_idles_out(tmp_path: Path, site: Site) -> None:
    config = write_on_demand_config(tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", free_port())
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec(idle_timeout_seconds=2))
        await asyncio.sleep(0.5)
        assert controller.progress("llama").phase is Phase.idle
        assert controller.route("llama") is None
        controller.want("llama")
        assert controller.progress("llama").phase is Phase.queued
        replica = await until_routed(controller, "llama")
        answer = await call_replica(controller, replica)
        assert answer == {"replica": replica.replica_id, "model": "llama", "path": "v1/models"}
        progress = controller.progress("llama")
        assert (progress.phase, progress.ready_replicas) == (Phase.ready, 1)
        with controller.in_flight("llama", replica):
            await asyncio.sleep(3)  # longer than the idle timeout, but a request is in flight
            assert controller.route("llama") == replica
        await until(lambda: _routed_none(controller), within=10, what="the idle timeout")
        await until(lambda: _ended(controller, replica.replica_id), within=15, what="the job to end")
        record = await store_of(controller).get(replica.replica_id)
        assert record is not None and record.end_reason is not None and "idle" in record.end_reason
        assert controller.progress("llama").phase is Phase.idle
    finally:
        await runner.cleanup()


async def _routed_none(controller: Controller) -> bool:
    return controller.route("llama") is None


async def _ended(controller: Controller, replica_id: str) -> bool:
    return await job_state(controller, replica_id) is JobState.ended


async def test_with_the_deployed_defaults_a_want_is_served_within_seconds(tmp_path: Path, site: Site) -> None:
    """Registration, not the first heartbeat (10 s), makes a replica whose model is up ready."""
    config = write_on_demand_config(
        tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", free_port(), deployed_defaults=True
    )
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec(model_command=("ready-after", "0")))
        started = time.monotonic()
        controller.want("llama")
        replica = await until_routed(controller, "llama", within=15)
        assert time.monotonic() - started < 8
        assert (await call_replica(controller, replica))["replica"] == replica.replica_id
    finally:
        await runner.cleanup()


async def test_a_killed_pilot_is_replaced_on_the_next_want(tmp_path: Path, site: Site) -> None:
    config = write_on_demand_config(tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", free_port())
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec())
        controller.want("llama")
        first = await until_routed(controller, "llama")
        record = await store_of(controller).get(first.replica_id)
        assert record is not None and record.job_id is not None
        pid = json.loads((site.directory / "jobs" / "jobs" / record.job_id / "pid.json").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)
        await until(lambda: _routed_none(controller), within=10, what="the dead replica to leave the map")
        ended = await store_of(controller).get(first.replica_id)
        assert ended is not None and ended.ended is not None
        await asyncio.sleep(1)
        # The first want still counts as demand (for idle_timeout_seconds), so a replacement may be
        # on its way already; the dead replica never comes back into the map. Ready once, then
        # killed, it is no failed start: no back-off (checked below).
        assert controller.route("llama") != first
        controller.want("llama")
        second = await until_routed(controller, "llama")
        assert second.replica_id != first.replica_id
        assert (await call_replica(controller, second))["replica"] == second.replica_id
        assert await store_of(controller).backoffs() == {}
    finally:
        await runner.cleanup()


async def test_a_spec_whose_starts_fail_backs_off_exponentially(tmp_path: Path, site: Site) -> None:
    broken = {
        **scheduler_entry(site, site.directory / "jobs"),
        "pilot_command": [sys.executable, "-c", "raise SystemExit(3)"],
    }
    config = write_on_demand_config(
        tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", free_port(), schedulers={"local": broken}
    )
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec())
        controller.want("llama")
        await until(lambda: _failures(controller, 1), within=15, what="the first failure")
        first = (await store_of(controller).backoffs())["llama"]
        assert 0 < first.retry_at - time.time() <= 1  # start_backoff_seconds
        await until(lambda: _phase_is(controller, Phase.backing_off), within=5, what="backing_off")
        progress = controller.progress("llama")
        assert progress.eta_seconds is not None and progress.eta_seconds > 0
        assert "failed starts" in progress.detail and "exit status 3" in progress.detail
        await until(lambda: _failures(controller, 2), within=15, what="the second failure")
        second = (await store_of(controller).backoffs())["llama"]
        assert 1 < second.retry_at - time.time() <= 2  # doubled
        assert second.retry_at - first.retry_at > 2
    finally:
        await runner.cleanup()


async def _failures(controller: Controller, count: int) -> bool:
    backoff = (await store_of(controller).backoffs()).get("llama")
    return backoff is not None and backoff.failures >= count


async def _phase_is(controller: Controller, phase: Phase) -> bool:
    return controller.progress("llama").phase is phase


async def test_a_restarted_gateway_adopts_the_running_replica(tmp_path: Path, site: Site) -> None:
    port = free_port()
    config = write_on_demand_config(tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", port)
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec())
        controller.want("llama")
        replica = await until_routed(controller, "llama")
    finally:
        await runner.cleanup()
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec())
        adopted = await until_routed(controller, "llama", within=10)
        assert adopted == replica
        before = await store_of(controller).get(replica.replica_id)
        assert before is not None and before.last_heartbeat is not None
        await asyncio.sleep(2)
        after = await store_of(controller).get(replica.replica_id)
        assert after is not None and after.last_heartbeat is not None
        assert after.last_heartbeat > before.last_heartbeat  # it heartbeats to the new gateway
        assert after.ended is None and len(await store_of(controller).live()) == 1
        assert (await call_replica(controller, adopted))["replica"] == replica.replica_id
    finally:
        await runner.cleanup()


async def test_a_restarted_gateway_ends_the_replicas_of_a_deployment_it_no_longer_declares(
    tmp_path: Path, site: Site
) -> None:
    port = free_port()
    config = write_on_demand_config(
        tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", port, undeclared_grace_seconds=1
    )
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec())
        controller.want("llama")
        replica = await until_routed(controller, "llama")
    finally:
        await runner.cleanup()
    runner, _, controller = await start_on_demand(config)
    try:
        await until(lambda: _ended(controller, replica.replica_id), within=15, what="the orphan's job to end")
        record = await store_of(controller).get(replica.replica_id)
        assert record is not None and record.end_reason == "deployment 'llama' is no longer declared"
        assert controller.progress("llama").phase is Phase.unavailable
    finally:
        await runner.cleanup()


async def test_pilot_routes_refuse_a_wrong_token_and_a_bad_body(tmp_path: Path, site: Site) -> None:
    config = write_on_demand_config(
        tmp_path / "gw",
        site,
        f"sqlite:///{tmp_path / 'gw.db'}",
        free_port(),
        schedulers={"local": scheduler_entry(site, site.directory / "jobs", queue_delay_seconds=60)},
    )
    runner, server, controller = await start_on_demand(config)
    try:
        controller.declare(spec())
        controller.want("llama")
        await until(lambda: _staged(site), within=10, what="the staged configuration")
        staged = json.loads(next((site.directory / "jobs" / "staging").glob("pilot-*.json")).read_text())
        token, replica_id = staged["token"], staged["replica_id"]
        async with aiohttp.ClientSession() as http:
            for url in (f"{server.url}/pilots/register", f"{server.url}/pilots/heartbeat"):
                async with http.post(url, json={}, headers={"Authorization": "Bearer " + "x" * 43}) as answer:
                    assert answer.status == 401
                    body = await answer.json()
                    assert body["error"]["message"] == "Invalid pilot token."
                    assert replica_id not in json.dumps(body)
            async with http.post(f"{server.url}/pilots/register", json={}) as answer:
                assert answer.status == 401
            bearer = {"Authorization": f"Bearer {token}"}
            async with http.post(
                f"{server.url}/pilots/register", json={"port": "x"}, headers=bearer
            ) as answer:
                assert answer.status == 400
                assert (await answer.json())["error"]["code"] == "invalid_body"
            other = {"replica_id": "someone-else", "models": []}
            async with http.post(f"{server.url}/pilots/heartbeat", json=other, headers=bearer) as answer:
                assert answer.status == 401
            mine = {"replica_id": replica_id, "models": []}
            async with http.post(f"{server.url}/pilots/heartbeat", json=mine, headers=bearer) as answer:
                assert answer.status == 200
                assert (await answer.json())["stop"] is True  # a heartbeat before registering
            big = {"replica_id": replica_id, "models": [], "pad": "x" * 100_000}
            async with http.post(f"{server.url}/pilots/heartbeat", json=big, headers=bearer) as answer:
                assert answer.status == 413
        assert token not in (tmp_path / "gw").joinpath("gateway.yaml").read_text()
    finally:
        await runner.cleanup()


async def _staged(site: object) -> bool:
    return any((Path(site.directory) / "jobs" / "staging").glob("pilot-*.json"))  # type: ignore[attr-defined]


async def test_load_above_the_target_starts_another_replica(tmp_path: Path, site: Site) -> None:
    config = write_on_demand_config(tmp_path / "gw", site, f"sqlite:///{tmp_path / 'gw.db'}", free_port())
    runner, server, controller = await start_on_demand(config)
    try:
        controller.declare(spec(target_in_flight=1, max_replicas=2))
        controller.want("llama")
        first = await until_routed(controller, "llama")
        with controller.in_flight("llama", first), controller.in_flight("llama", first):
            await until(lambda: _routed_elsewhere(controller, first), within=30, what="a second replica")
            second = controller.route("llama")
            assert (
                second is not None
                and (await call_replica(controller, second))["replica"] == second.replica_id
            )
            await asyncio.sleep(1)
            assert len(await store_of(controller).live()) == 2  # max_replicas
        assert controller.progress("llama").ready_replicas == 2
        origin = server.url.removesuffix("/resource_server")
        async with aiohttp.ClientSession() as http, http.get(f"{origin}/metrics") as answer:
            text = await answer.text()
        assert 'gateway_deployment_replicas{deployment="llama",phase="ready"} 2.0' in text
        assert 'gateway_deployment_starts_total{deployment="llama"} 2.0' in text
    finally:
        await runner.cleanup()


async def _routed_elsewhere(controller: Controller, replica: object) -> bool:
    routed = controller.route("llama")
    return routed is not None and routed != replica


async def test_a_replica_near_its_walltime_is_replaced_before_it_ends(tmp_path: Path, site: Site) -> None:
    config = write_on_demand_config(
        tmp_path / "gw",
        site,
        f"sqlite:///{tmp_path / 'gw.db'}",
        free_port(),
        replace_before_walltime_seconds=16,
    )
    runner, _, controller = await start_on_demand(config)
    try:
        controller.declare(spec(walltime_seconds=20))
        controller.want("llama")
        first = await until_routed(controller, "llama")
        while (routed := controller.route("llama")) == first:
            assert routed is not None  # the old replica serves until its replacement is ready
            await controller.changed("llama", 0.1)
        assert routed is not None and routed != first
        await until(lambda: _ended(controller, first.replica_id), within=15, what="the old job to end")
        record = await store_of(controller).get(first.replica_id)
        assert record is not None and record.end_reason == "near its walltime"
    finally:
        await runner.cleanup()
