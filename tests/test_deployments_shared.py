"""Two gateway processes (two apps, each with its own controller, sharing the database): one
holds the lease and starts the replica another process asked for; both route to it, through the
database's periodic refresh, or at once through Redis when the refresh is far off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.deployments.controller import Controller
from tests.deployment_setup import (
    Site,
    call_replica,
    on_demand_site,
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


async def _leads(controller: Controller) -> bool:
    return controller.reconciler is not None and controller.reconciler.leader


async def test_a_want_in_one_process_is_served_by_the_leader_in_another(
    tmp_path: Path, site: Site, database_url: str
) -> None:
    first = await start_on_demand(write_on_demand_config(tmp_path / "a", site, database_url, free_port()))
    second = None
    try:
        leader = first[2]
        leader.declare(spec())
        await until(lambda: _leads(leader), within=10, what="the first process to lead")
        second = await start_on_demand(
            write_on_demand_config(tmp_path / "b", site, database_url, free_port())
        )
        follower = second[2]
        follower.declare(spec())
        follower.want("llama")
        replica = await until_routed(follower, "llama")
        assert not await _leads(follower)
        assert leader.route("llama") == replica or (await until_routed(leader, "llama")) == replica
        assert (await call_replica(follower, replica))["replica"] == replica.replica_id
    finally:
        if second is not None:
            await second[0].cleanup()
        await first[0].cleanup()


async def test_redis_tells_another_host_at_once(tmp_path: Path, site: Site, redis_url: str) -> None:
    """With the periodic refresh 60 s away, only the Redis channel can carry the want to the
    leader and the new replica back to the process that asked."""
    database_url = f"sqlite:///{tmp_path / 'gw.db'}"
    settings = {
        "redis_url": redis_url,
        "refresh_seconds": 60,
        "usage_report_seconds": 60,
        "lease_seconds": 300,
    }
    first = await start_on_demand(
        write_on_demand_config(tmp_path / "a", site, database_url, free_port(), **settings)
    )
    second = None
    try:
        leader = first[2]
        leader.declare(spec())
        await until(lambda: _leads(leader), within=10, what="the first process to lead")
        second = await start_on_demand(
            write_on_demand_config(tmp_path / "b", site, database_url, free_port(), **settings)
        )
        follower = second[2]
        follower.declare(spec())
        await until(lambda: _subscribed(follower), within=5, what="the follower to subscribe")
        follower.want("llama")
        replica = await until_routed(follower, "llama", within=20)
        assert not await _leads(follower)
        assert (await call_replica(follower, replica))["replica"] == replica.replica_id
    finally:
        if second is not None:
            await second[0].cleanup()
        await first[0].cleanup()


async def _subscribed(controller: Controller) -> bool:
    broadcast = controller.broadcast
    return broadcast is not None and broadcast.subscribed
