"""What a pilot's registration and heartbeats change (proxy/edge/pilots.py receives them).

Any gateway process may receive them: they write the replica's row, and the process that saw a
change refreshes its routing map and tells the others. A replica whose model reports ready goes
into the routing map only once this gateway has reached the pilot's port over mTLS itself
(`GET /pilot/status` with the gateway's client certificate): the address the pilot gave is one
the gateway can dial, and the pilot holds a certificate of the site CA.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import aiohttp
from pydantic import ValidationError

from pilot.protocol import Heartbeat, ModelReport, ModelState, PilotOrders, Registration
from proxy.core.deployments.replicas import Parts, token_hash
from proxy.core.deployments.routing import origin
from proxy.records.deployment_store import ReplicaRecord

log = logging.getLogger(__name__)

STATUS_TIMEOUT_SECONDS = 10.0
STATUS_MAX_BYTES = 64 * 1024
_NO_TOKEN_HASH = token_hash("no replica has this token")


class PilotDesk:
    def __init__(
        self, parts: Parts, client_ssl: ssl.SSLContext, changed: Callable[[str], Awaitable[None]]
    ) -> None:
        self.parts = parts
        self._client_ssl = client_ssl
        self._changed = changed
        self._verifying: dict[str, asyncio.Task[None]] = {}

    async def authenticate(self, token: str) -> ReplicaRecord | None:
        """The replica whose token this is, compared in constant time against the stored hash."""
        given = token_hash(token)
        replica = await self.parts.store.by_token_hash(given)
        stored = replica.token_hash if replica is not None else _NO_TOKEN_HASH
        if not hmac.compare_digest(given, stored) or replica is None:
            return None
        return replica

    def orders(self, replica: ReplicaRecord) -> PilotOrders:
        stop = replica.ended is not None or bool(replica.stop_requested)
        return PilotOrders(stop=stop, heartbeat_seconds=self.parts.settings.heartbeat_seconds)

    async def register(self, replica: ReplicaRecord, registration: Registration) -> PilotOrders:
        if replica.ended is not None or replica.stop_requested:
            return self.orders(replica)
        now = time.time()
        phase = "ready" if replica.phase == "ready" else "loading"
        await self.parts.store.update(
            replica.replica_id,
            address=registration.address,
            port=registration.port,
            walltime_end=registration.walltime_end,
            registered=replica.registered or now,
            last_heartbeat=now,
            phase=phase,
            detail="registered",
        )
        replica.address, replica.port, replica.phase = registration.address, registration.port, phase
        log.info(
            "deployment %s: replica %s registered from %s:%d",
            replica.deployment,
            replica.replica_id,
            registration.address,
            registration.port,
        )
        await self._models(replica, registration.models)
        await self._changed(replica.deployment)
        return self.orders(replica)

    async def heartbeat(self, replica: ReplicaRecord, heartbeat: Heartbeat) -> PilotOrders:
        if replica.ended is not None or replica.stop_requested:
            return self.orders(replica)
        if replica.registered is None:
            return PilotOrders(stop=True)  # a pilot must register before it heartbeats
        await self.parts.store.update(
            replica.replica_id, last_heartbeat=time.time(), in_flight=heartbeat.in_flight
        )
        await self._models(replica, heartbeat.models)
        return self.orders(replica)

    async def _models(self, replica: ReplicaRecord, models: tuple[ModelReport, ...]) -> None:
        report = next((model for model in models if model.name == replica.deployment), None)
        if report is None or report.state is ModelState.failed:
            detail = "the pilot does not run the model" if report is None else report.detail
            await self.parts.store.update(
                replica.replica_id, stop_requested=1, detail=f"model failed: {detail}"[:500]
            )
            replica.stop_requested = 1
            await self._changed(replica.deployment)
        elif report.state is ModelState.ready and replica.phase != "ready":
            if replica.replica_id not in self._verifying:
                task = asyncio.create_task(self._verify(replica))
                self._verifying[replica.replica_id] = task
                task.add_done_callback(lambda _: self._verifying.pop(replica.replica_id, None))
        elif report.state is ModelState.loading and replica.phase == "ready":
            await self.parts.store.update(
                replica.replica_id, phase="loading", detail="loading the model again"
            )
            await self._changed(replica.deployment)

    async def _verify(self, replica: ReplicaRecord) -> None:
        url = f"{origin(replica.address, replica.port)}/pilot/status"
        try:
            timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_SECONDS)
            connector = aiohttp.TCPConnector(ssl=self._client_ssl)
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                session.get(url) as response,
            ):
                body = await response.content.read(STATUS_MAX_BYTES + 1)
                if response.status != 200 or len(body) > STATUS_MAX_BYTES:
                    raise ValueError(f"answered {response.status}")
                Heartbeat.model_validate_json(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError, OSError) as exc:
            log.warning(
                "deployment %s: replica %s reports ready but %s is not reachable over mTLS: %s",
                replica.deployment,
                replica.replica_id,
                url,
                exc,
            )
            return
        now = time.time()
        await self.parts.store.update(
            replica.replica_id, phase="ready", ready_at=replica.ready_at or now, detail="ready"
        )
        await self.parts.store.set_backoff(replica.deployment, None)
        log.info("deployment %s: replica %s ready at %s", replica.deployment, replica.replica_id, url)
        await self._changed(replica.deployment)

    async def close(self) -> None:
        for task in list(self._verifying.values()):
            task.cancel()
