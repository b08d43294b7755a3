"""OpenAI's Batch API (`/v1/batches` with an `input_file_id`), run by the gateway's own runner
(proxy/core/batch_runner.py) line by line.

The existing gateway's HPC batches (proxy/edge/batches.py) already own some of these paths; each of
its routes hands a request here when it is OpenAI's (`is_openai_create`, `is_openai_listing`,
`is_openai_batch_id`), so both keep their shapes:
- `POST /{cluster}/{framework}/v1/batches`: OpenAI's when the body has `input_file_id`;
- `GET /v1/batches`: OpenAI's list when the query has `limit` or `after`, or the client is an OpenAI
  SDK (its `X-Stainless-Lang` header); under `/{cluster}/{framework}/v1/batches` always OpenAI's;
- `GET /v1/batches/{id}`: OpenAI's when the id is one (`batch_…`; HPC batch ids are UUIDs).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from aiohttp import web

from proxy.core.batch_lines import BATCH_URLS
from proxy.core.batch_runner import user_json
from proxy.core.identity import USER
from proxy.core.lookup import check_framework, find_cluster
from proxy.core.state import STATE
from proxy.edge.bodies import read_json
from proxy.edge.openai_files import list_limit, owned_file, page
from proxy.edge.store_calls import store_call
from proxy.errors import ApiError
from proxy.records.openai_batch_store import TIMESTAMPS, OpenAIBatchRecord, OpenAIBatchStore

BATCH_ID_PREFIX = "batch_"
WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
MAX_WINDOW_HOURS = 168
MAX_METADATA_KEYS = 16


def add_openai_batch_routes(app: web.Application, base_path: str) -> None:
    """The paths the HPC batches do not use; the others reach here through proxy/edge/batches.py."""
    cluster_path = f"{base_path}/{{cluster}}/{{framework}}/v1/batches"
    app.router.add_post(f"{base_path}/v1/batches", create)
    app.router.add_get(cluster_path, list_batches)
    app.router.add_get(f"{cluster_path}/{{batch_id}}", retrieve)
    for prefix in (f"{base_path}/v1/batches", cluster_path):
        app.router.add_post(f"{prefix}/{{batch_id}}/cancel", cancel)


def is_openai_create(body: object) -> bool:
    return isinstance(body, dict) and "input_file_id" in body


def is_openai_listing(request: web.Request) -> bool:
    return "limit" in request.query or "after" in request.query or "X-Stainless-Lang" in request.headers


def is_openai_batch_id(batch_id: str) -> bool:
    return batch_id.startswith(BATCH_ID_PREFIX)


def batch_store(app: web.Application) -> OpenAIBatchStore:
    """Opened by the database's lifecycle, which runs before the gateway serves its first request."""
    store = app[STATE].openai_batches
    assert store is not None, "batch routes served before the database's lifecycle ran"
    return store


async def create(request: web.Request, body: object = None) -> web.Response:
    """The batch starts `validating`; the runner checks its lines against the endpoint and runs it."""
    if body is None:
        body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    state, user = request.app[STATE], request[USER]
    cluster = framework = None
    if "cluster" in request.match_info:
        cluster = find_cluster(state.registry, request.match_info["cluster"], user).cluster_name
        framework = request.match_info["framework"]
        check_framework(state.registry.clusters[cluster], framework)
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str):
        raise ApiError(400, "'input_file_id' must name an uploaded file.", param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in BATCH_URLS:
        message = f"'endpoint' must be one of {', '.join(sorted(BATCH_URLS))}."
        raise ApiError(400, message, param="endpoint")
    hours = _window_hours(body.get("completion_window"))
    metadata = _metadata(body.get("metadata"))
    input_file = await owned_file(request, input_file_id)
    if input_file.purpose != "batch":
        raise ApiError(
            400, f"File {input_file_id} was not uploaded with purpose 'batch'.", param="input_file_id"
        )
    now = time.time()
    record = OpenAIBatchRecord(
        id=f"{BATCH_ID_PREFIX}{uuid.uuid4().hex}",
        user_id=user.id,
        user_json=user_json(user),
        cluster=cluster,
        framework=framework,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=f"{hours}h",
        metadata=None if metadata is None else json.dumps(metadata),
        status="validating",
        errors=None,
        output_file_id=None,
        error_file_id=None,
        total=0,
        created_at=now,
        expires_at=now + hours * 3600,
    )
    await store_call(batch_store(request.app).add(record))
    return web.json_response(await _batch_object(request.app, record))


def _window_hours(window: object) -> int:
    matched = WINDOW.match(window) if isinstance(window, str) else None
    if matched is None or int(matched.group(1)) > MAX_WINDOW_HOURS:
        message = f"'completion_window' must be a number of hours up to {MAX_WINDOW_HOURS}, such as '24h'."
        raise ApiError(400, message, param="completion_window")
    return int(matched.group(1))


def _metadata(metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA_KEYS
        or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())
    ):
        message = (
            f"'metadata' must map at most {MAX_METADATA_KEYS} keys to strings of at most 512 characters."
        )
        raise ApiError(400, message, param="metadata")
    return metadata


async def list_batches(request: web.Request) -> web.Response:
    limit = list_limit(request.query.get("limit"), default=20, most=100)
    store = batch_store(request.app)
    records, more = await store_call(store.for_user(request[USER].id, request.query.get("after"), limit))
    data = [await _batch_object(request.app, record) for record in records]
    return web.json_response(page(data, more))


async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(await _batch_object(request.app, await _owned(request)))


async def cancel(request: web.Request) -> web.Response:
    """No new line is sent once the runner hears of it; the finished lines' results are kept in
    the output and error files, and the batch ends `cancelled`."""
    record = await _owned(request)
    store = batch_store(request.app)
    moved = await store_call(store.move(record.id, "cancelling", only_from=("validating", "in_progress")))
    if not moved and record.status not in ("cancelling", "cancelled"):
        raise ApiError(
            400, f"A batch that is {record.status} cannot be cancelled.", code="batch_not_cancellable"
        )
    return web.json_response(await _batch_object(request.app, await _owned(request)))


async def _owned(request: web.Request) -> OpenAIBatchRecord:
    batch_id = request.match_info["batch_id"]
    record = await store_call(batch_store(request.app).get(batch_id, request[USER].id))
    if record is None:
        raise ApiError(
            404, f"No such Batch object: {batch_id[:100]}", param="batch_id", code="batch_not_found"
        )
    return record


async def _batch_object(app: web.Application, record: OpenAIBatchRecord) -> dict[str, Any]:
    completed, failed = await store_call(batch_store(app).counts(record.id))
    stamps = {column: _seconds(getattr(record, column)) for column in TIMESTAMPS.values()}
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "errors": None if record.errors is None else json.loads(record.errors),
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": int(record.created_at),
        "expires_at": int(record.expires_at),
        **stamps,
        "request_counts": {"total": record.total, "completed": completed, "failed": failed},
        "metadata": None if record.metadata is None else json.loads(record.metadata),
    }


def _seconds(moment: float | None) -> int | None:
    return None if moment is None else int(moment)
