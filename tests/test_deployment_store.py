"""The deployment store on SQLite and PostgreSQL: replicas, usage summed across processes, the
back-off, and a controller lease that exactly one owner holds until it lapses."""

from __future__ import annotations

import time

from proxy.records.deployment_store import Backoff, DeploymentStore, ReplicaRecord
from proxy.records.schema import connect


def replica(replica_id: str, deployment: str = "llama", created: float = 1000.0) -> ReplicaRecord:
    return ReplicaRecord(
        replica_id=replica_id,
        deployment=deployment,
        cluster="local",
        scheduler="local",
        job_id=None,
        phase="queued",
        token_hash=f"hash-{replica_id}",
        created=created,
    )


async def test_replicas_move_through_their_phases_and_end_once(database_url: str) -> None:
    database = await connect(database_url)
    try:
        store = DeploymentStore(database)
        await store.add(replica("r1"))
        await store.add(replica("r2", "other", created=1001))
        assert [r.replica_id for r in await store.live()] == ["r1", "r2"]
        assert await store.update("r1", job_id="local-1", phase="starting")
        assert await store.update("r1", phase="ready", address="10.0.0.5", port=8443, ready_at=1090.0)
        found = await store.by_token_hash("hash-r1")
        assert found is not None and (found.phase, found.port, found.job_id) == ("ready", 8443, "local-1")
        assert await store.end("r1", "idle", 1200.0)
        assert not await store.end("r1", "again", 1300.0)
        assert not await store.update("r1", phase="ready")  # an ended replica stays ended
        ended = await store.get("r1")
        assert ended is not None and (ended.phase, ended.end_reason, ended.stop_requested) == (
            "ended",
            "idle",
            1,
        )
        assert [r.replica_id for r in await store.live()] == ["r2"]
        assert await store.start_durations() == {"llama": [90.0]}
    finally:
        await database.close()


async def test_usage_sums_processes_and_forgets_the_load_of_silent_ones(database_url: str) -> None:
    database = await connect(database_url)
    try:
        store = DeploymentStore(database)
        await store.report_usage("host-a:1", "llama", 3, 500.0, None)
        await store.report_usage("host-b:2", "llama", 2, 700.0, 650.0)
        await store.report_usage("host-b:2", "llama", 4, 800.0, 650.0)
        usage = (await store.usage(time.time() - 60))["llama"]
        assert (usage.in_flight, usage.last_used, usage.wanted) == (7, 800.0, 650.0)
        later = (await store.usage(time.time() + 60))["llama"]
        assert (later.in_flight, later.last_used) == (0, 800.0)
    finally:
        await database.close()


async def test_the_backoff_is_replaced_and_cleared(database_url: str) -> None:
    database = await connect(database_url)
    try:
        store = DeploymentStore(database)
        await store.set_backoff("llama", Backoff(1, 100.0, "job ended"))
        await store.set_backoff("llama", Backoff(2, 200.0, "job ended again"))
        assert await store.backoffs() == {"llama": Backoff(2, 200.0, "job ended again")}
        await store.set_backoff("llama", None)
        assert await store.backoffs() == {}
    finally:
        await database.close()


async def test_one_owner_holds_the_lease_until_it_lapses_or_is_released(database_url: str) -> None:
    database = await connect(database_url)
    try:
        store = DeploymentStore(database)
        assert await store.lease("a", until=110.0, now=100.0)
        assert not await store.lease("b", until=115.0, now=105.0)
        assert await store.lease("a", until=120.0, now=108.0)  # renewed
        assert not await store.lease("b", until=125.0, now=119.0)
        assert await store.lease("b", until=135.0, now=121.0)  # lapsed: taken over
        assert not await store.lease("a", until=140.0, now=122.0)
        await store.release("b")
        assert await store.lease("a", until=150.0, now=123.0)
    finally:
        await database.close()


async def test_pruning_forgets_ended_replicas_and_silent_processes(database_url: str) -> None:
    database = await connect(database_url)
    try:
        store = DeploymentStore(database)
        await store.add(replica("old"))
        await store.add(replica("live"))
        await store.end("old", "idle", 1000.0)
        await store.report_usage("gone:1", "llama", 0, 900.0, None)
        await store.prune(time.time() + 1)
        assert await store.get("old") is None
        assert [r.replica_id for r in await store.live()] == ["live"]  # a live replica is never pruned
        assert (await store.usage(0)) == {}
    finally:
        await database.close()
