"""The routes pilots call (pilot/protocol.py): `POST {base}/pilots/register` and
`POST {base}/pilots/heartbeat`.

They sit outside user authentication, like the stream callbacks: a pilot is no user. Its bearer
token is its replica's, issued by the controller in the staged configuration and checked against
the stored hash in constant time before the body is read. A wrong token learns nothing (401, the
same answer for every failure); a body that is too large or not the protocol's is a 400 or 413.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from pilot.protocol import Heartbeat, Registration
from proxy.core.deployments.controller import Controller
from proxy.core.deployments.pilots import PilotDesk
from proxy.edge.bodies import read_body
from proxy.errors import ApiError
from proxy.records.database import DatabaseUnavailable
from proxy.records.deployment_store import ReplicaRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

CONTROLLER = web.AppKey("deployments_controller", Controller)
PILOT_ROUTES = frozenset({"pilot-register", "pilot-heartbeat"})
QUIET_PILOT_ROUTES = frozenset({"pilot-heartbeat"})
"""Like health probes, every few seconds per replica: not request records (refusals are logged)."""
BODY_LIMIT = 64 * 1024
_LONGEST_TOKEN = 512


def add_pilot_routes(app: web.Application, base_path: str, controller: Controller) -> None:
    app[CONTROLLER] = controller
    app.router.add_post(f"{base_path}/pilots/register", register, name="pilot-register")
    app.router.add_post(f"{base_path}/pilots/heartbeat", heartbeat, name="pilot-heartbeat")


async def register(request: web.Request) -> web.Response:
    desk, replica = await _authenticated(request)
    registration = await _body(request, Registration)
    _same_replica(replica, registration.replica_id)
    orders = await _stored(desk.register(replica, registration))
    return web.json_response(orders.model_dump())


async def heartbeat(request: web.Request) -> web.Response:
    desk, replica = await _authenticated(request)
    beat = await _body(request, Heartbeat)
    _same_replica(replica, beat.replica_id)
    orders = await _stored(desk.heartbeat(replica, beat))
    return web.json_response(orders.model_dump())


def _refused() -> ApiError:
    return ApiError(401, "Invalid pilot token.", code="invalid_pilot_token")


async def _authenticated(request: web.Request) -> tuple[PilotDesk, ReplicaRecord]:
    desk = request.app[CONTROLLER].desk
    if desk is None:
        raise ApiError(503, "The deployments controller is not running yet.", code="not_ready")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _LONGEST_TOKEN or not token.isascii():
        raise _refused()
    replica = await _stored(desk.authenticate(token))
    if replica is None:
        log.warning("a pilot call from %s was refused: unknown token", request.remote)
        raise _refused()
    return desk, replica


def _same_replica(replica: ReplicaRecord, claimed: str) -> None:
    if claimed != replica.replica_id:
        log.warning("replica %s's token was sent for replica %r", replica.replica_id, claimed[:64])
        raise _refused()


async def _body(request: web.Request, model: type[M]) -> M:
    try:
        body = await read_body(request, BODY_LIMIT)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, f"Pilot bodies are limited to {BODY_LIMIT} bytes.", code="request_too_large"
        ) from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "(body)"
        raise ApiError(
            400, f"Invalid {model.__name__}: {where}: {problem['msg']}", code="invalid_body"
        ) from None


async def _stored(call: Awaitable[T]) -> T:
    """The database away is a 503 the pilot retries, not a 500."""
    try:
        return await call
    except DatabaseUnavailable:
        raise ApiError(503, "The gateway's database is unavailable.", code="database_unavailable") from None
