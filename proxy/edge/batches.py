"""Batch jobs as the existing gateway runs them: an input file on the cluster's file system,
processed by the endpoint's batch function, tracked in the gateway's database.

A background task advances every unfinished batch on its own, so results are saved before the
compute service forgets them, whether or not anyone asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from adaptors import BaseEndpoint
from proxy.core import contract
from proxy.core.identity import USER
from proxy.core.lookup import check_framework, find_cluster, find_endpoint
from proxy.core.registry import Registry
from proxy.core.state import STATE
from proxy.edge.bodies import read_valid
from proxy.errors import ApiError, adaptor_failed
from proxy.records.batch_store import BatchRecord, BatchStore
from proxy.records.database import DatabaseTimeout, DatabaseUnavailable

log = logging.getLogger(__name__)
Result = TypeVar("Result")

STATUSES = ("pending", "running", "completed", "failed")


def add_batch_routes(app: web.Application, base_path: str) -> None:
    app.router.add_post(f"{base_path}/{{cluster}}/{{framework}}/v1/batches", create)
    app.router.add_get(f"{base_path}/v1/batches", list_batches)
    app.router.add_get(f"{base_path}/v1/batches/{{batch_id}}", batch_status)
    app.router.add_get(f"{base_path}/v1/batches/{{batch_id}}/result", batch_result)


async def create(request: web.Request) -> web.Response:
    body = (await read_valid(request, "batches")).fields
    state, user = request.app[STATE], request[USER]
    registry = state.registry
    cluster = find_cluster(registry, request.match_info["cluster"], user)
    state.maintenance.check(cluster)
    framework = request.match_info["framework"]
    check_framework(cluster, framework)
    endpoint = find_endpoint(registry, cluster, framework, body["model"], user)
    if not endpoint.has_batch_enabled():
        raise ApiError(400, f"Batch is not enabled for {endpoint.endpoint_slug}.", code="batch_not_enabled")
    record = _new_record(body, endpoint, user.id, user.username)
    await _reserve(request.app, record)
    submitted = await contract.submit_batch(endpoint, {**body, "batch_id": record.id}, user.username)
    if submitted.error_code is not None or submitted.status is None:
        await _store_call(_batches(request.app).discard(record.id))
        adaptor_failed(submitted.error_code, submitted.error_message or "The batch was not accepted.")
    await _store_call(_batches(request.app).attach(record.id, submitted.task_ids, submitted.status.value))
    return web.json_response(
        {
            "batch_id": record.id,
            "input_file": record.input_file,
            "output_folder_path": record.output_folder_path,
            "task_ids": submitted.task_ids,
            "status": submitted.status.value,
        }
    )


async def list_batches(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(STATUSES)}.", param="status")
    records = await _store_call(_batches(request.app).for_user(request[USER].username, status))
    return web.json_response([_listing(record) for record in records])


async def batch_status(request: web.Request) -> web.Response:
    record = await _owned(request)
    return web.json_response(record.status)


async def batch_result(request: web.Request) -> web.Response:
    record = await _owned(request)
    if record.status == "failed":
        reason = record.error or "no reason given"
        raise ApiError(400, f"Batch {record.id} failed: {reason}", code="batch_failed")
    if record.status != "completed" or record.result is None:
        message = f"Batch {record.id} is {record.status}; its result is not ready."
        raise ApiError(400, message, code="batch_pending")
    return web.Response(text=record.result, content_type="application/json")


def _new_record(body: dict[str, Any], endpoint: BaseEndpoint, user_id: str, username: str) -> BatchRecord:
    now = time.time()
    return BatchRecord(
        id=str(uuid.uuid4()),
        user_id=user_id,
        username=username,
        cluster=endpoint.cluster,
        framework=endpoint.framework,
        model=endpoint.model,
        endpoint_slug=endpoint.endpoint_slug,
        input_file=body["input_file"],
        output_folder_path=body.get("output_folder_path"),
        task_ids=None,
        status="pending",
        result=None,
        error=None,
        created_at=now,
        in_progress_at=None,
        completed_at=None,
        failed_at=None,
        updated_at=now,
    )


async def _reserve(app: web.Application, record: BatchRecord) -> None:
    """Quota and duplicate checks and the insert are one atomic step in the database."""
    limit = app[STATE].batch_settings.max_active_per_user
    outcome = await _store_call(_batches(app).reserve(record, limit))
    if outcome == "quota":
        message = f"You already have {limit} active batches; wait for one to finish."
        raise ApiError(429, message, code="batch_quota", retryable=False)
    if outcome == "duplicate":
        message = f"Input file {record.input_file} is already used by an active batch."
        raise ApiError(409, message, code="batch_ongoing", retryable=False)


async def _owned(request: web.Request) -> BatchRecord:
    """Another user's batch answers exactly like a batch that does not exist."""
    batch_id = request.match_info["batch_id"]
    record: BatchRecord | None = await _store_call(_batches(request.app).get(batch_id))
    if record is None or record.username != request[USER].username:
        raise ApiError(404, f"Batch {batch_id[:64]} does not exist.", code="batch_not_found")
    return record


RETRY_AFTER_SECONDS = 5


def _batches(app: web.Application) -> BatchStore:
    """Opened by the database's lifecycle, which runs before the gateway serves its first request."""
    store = app[STATE].batches
    assert store is not None, "batch routes served before the database's lifecycle ran"
    return store


async def _store_call(call: Awaitable[Result]) -> Result:
    """The database's outages and timeouts are the client's "try again shortly", never a 500."""
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    try:
        return await call
    except DatabaseTimeout as exc:
        log.warning("batch database: %s", exc)
        message = "The batch database did not answer in time (it may be busy); try again shortly."
        raise ApiError(503, message, code="database_timeout", headers=retry) from None
    except DatabaseUnavailable:
        message = "The batch database is unavailable; try again shortly."
        raise ApiError(503, message, code="database_unavailable", headers=retry) from None


def _listing(record: BatchRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "batch_id": record.id,
        "cluster": record.cluster,
        "framework": record.framework,
        "model": record.model,
        "input_file": record.input_file,
        "output_folder_path": record.output_folder_path,
        "created_at": _iso(record.created_at),
        "in_progress_at": _iso(record.in_progress_at),
        "completed_at": _iso(record.completed_at),
        "failed_at": _iso(record.failed_at),
        "status": record.status,
    }


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat()


async def advance_forever(app: web.Application) -> None:
    """Runs for the life of the gateway; a database outage only delays it."""
    state = app[STATE]
    interval = state.batch_settings.poll_seconds
    while True:
        try:
            await advance_batches(_batches(app), state.registry)
        except DatabaseUnavailable:
            log.warning("batch database unavailable; batches will advance when it returns")
        except Exception:
            log.exception("advancing batches failed")
        await asyncio.sleep(interval)


async def advance_batches(store: BatchStore, registry: Registry) -> int:
    """Ask each unfinished batch's endpoint where it is; returns how many changed."""
    changed = 0
    for record in await store.unfinished():
        endpoint = registry.endpoints.get(record.endpoint_slug)
        if endpoint is None:
            continue
        report = await contract.get_batch_status(endpoint, record)
        if report.status is None:
            log.warning("status of batch %s unknown: %s", record.id, report.error_message)
            continue
        status = report.status.value
        if status == record.status and report.result is None:
            continue
        await store.advance(record.id, status, result=report.result, error=report.error_message)
        changed += 1
    return changed
