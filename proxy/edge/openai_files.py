"""OpenAI's Files API (`/v1/files`), for batch input files: uploaded as multipart and streamed to
storage as they arrive, checked line by line, and each visible to its uploader only (another user's
file answers 404, like a file that does not exist).

The same routes are served under `/v1` and under `/{cluster}/{framework}/v1`, so that a client whose
base URL names a cluster finds them too; files do not belong to a cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from proxy.core.batch_lines import check_file
from proxy.core.body_limits import BodyDeadline
from proxy.core.identity import USER
from proxy.core.state import STATE
from proxy.edge.store_calls import store_call
from proxy.errors import ApiError
from proxy.records.file_store import FileRecord, FileStore, TooLarge, new_file_id

CHUNK_BYTES = 64 * 1024
MAX_PURPOSE_BYTES = 100


def add_file_routes(app: web.Application, base_path: str) -> None:
    for prefix in (f"{base_path}/v1", f"{base_path}/{{cluster}}/{{framework}}/v1"):
        app.router.add_post(f"{prefix}/files", upload)
        app.router.add_get(f"{prefix}/files", list_files)
        app.router.add_get(f"{prefix}/files/{{file_id}}", retrieve)
        app.router.add_get(f"{prefix}/files/{{file_id}}/content", content)
        app.router.add_delete(f"{prefix}/files/{{file_id}}", delete)


def file_store(app: web.Application) -> FileStore:
    """Opened by the database's lifecycle, which runs before the gateway serves its first request."""
    store = app[STATE].files
    assert store is not None, "file routes served before the database's lifecycle ran"
    return store


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def owned_file(request: web.Request, file_id: str) -> FileRecord:
    record = await store_call(file_store(request.app).get(file_id, request[USER].id))
    if record is None:
        raise ApiError(404, f"No such File object: {file_id[:100]}", param="id", code="file_not_found")
    return record


async def upload(request: web.Request) -> web.Response:
    """The file is written to a temporary name part by part; only a complete, checked upload within
    the user's quota is kept."""
    state = request.app[STATE]
    settings, storage = state.openai_batch_settings, state.file_storage
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "Upload the file as multipart/form-data.", code="invalid_content_type")
    purpose: str | None = None
    received: tuple[Path, int] | None = None
    filename = "upload.jsonl"
    deadline = state.body_deadline
    started = asyncio.get_running_loop().time()
    arrived = 0

    def note(count: int) -> None:
        """An upload may be far larger than a request body, so only the body rate bounds it (no
        total): after the grace, at least `body_min_bytes_per_second` on average, or 408."""
        nonlocal arrived
        arrived += count
        timer.reschedule(started + deadline.grace_seconds + arrived / deadline.min_bytes_per_second)

    try:
        try:
            async with asyncio.timeout_at(started + deadline.grace_seconds) as timer:
                async for part in await request.multipart():
                    if not isinstance(part, BodyPartReader):
                        continue
                    if part.name == "purpose":
                        text = await part.read_chunk(MAX_PURPOSE_BYTES)
                        purpose = text.decode(errors="replace").strip()
                    elif part.name == "file" and received is None:
                        filename = (part.filename or filename)[:255]
                        received = await storage.receive(_chunks(part, note), settings.max_file_bytes)
                    await part.release()
        except TimeoutError:
            raise _too_slow(deadline, arrived) from None
        return web.json_response(file_object(await _keep(request, purpose, filename, received)))
    except TooLarge:
        message = f"The file is larger than the gateway's limit of {settings.max_file_bytes} bytes."
        raise ApiError(413, message, param="file", code="file_too_large") from None
    finally:
        if received is not None:
            storage.discard(received[0])  # committed files were renamed away: nothing to remove


def _too_slow(deadline: BodyDeadline, arrived: int) -> ApiError:
    return ApiError(
        408,
        f"The upload did not arrive in time ({arrived} bytes received): after the first "
        f"{deadline.grace_seconds:g} s it must arrive at {deadline.min_bytes_per_second:g} bytes/s or more.",
        code="request_timeout",
        close=True,
    )


async def _keep(
    request: web.Request, purpose: str | None, filename: str, received: tuple[Path, int] | None
) -> FileRecord:
    state, user = request.app[STATE], request[USER]
    settings, storage = state.openai_batch_settings, state.file_storage
    if purpose != "batch":
        message = "'purpose' must be 'batch': this gateway keeps files for the Batch API only."
        raise ApiError(400, message, param="purpose", code="invalid_purpose")
    if received is None:
        raise ApiError(400, "The upload has no 'file' part.", param="file", code="missing_file")
    temporary, size = received
    store = file_store(request.app)
    used = await store_call(store.bytes_of(user.id))
    if used + size > settings.max_user_bytes:
        quota = settings.max_user_bytes
        message = f"Your files would take more than your quota of {quota} bytes; delete some first."
        raise ApiError(413, message, param="file", code="file_quota_exceeded")
    _, problems = await asyncio.to_thread(check_file, temporary, settings.max_lines)
    if problems:
        message = "The batch input file has problems: " + "; ".join(problems)
        raise ApiError(400, message, param="file", code="invalid_batch_file")
    file_id = new_file_id()
    record = FileRecord(file_id, user.id, filename, "batch", size, time.time(), file_id)
    storage.commit(temporary, record.storage_key)
    try:
        await store_call(store.add(record))
    except BaseException:
        storage.discard(record.storage_key)
        raise
    return record


async def _chunks(part: BodyPartReader, note: Callable[[int], None]) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_BYTES):
        note(len(chunk))
        yield chunk


async def list_files(request: web.Request) -> web.Response:
    query = request.query
    limit = list_limit(query.get("limit"), default=10_000, most=10_000)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "'order' must be 'asc' or 'desc'.", param="order")
    records, more = await store_call(
        file_store(request.app).for_user(
            request[USER].id,
            purpose=query.get("purpose"),
            after=query.get("after"),
            limit=limit,
            newest_first=order == "desc",
        )
    )
    return web.json_response(page([file_object(record) for record in records], more))


def page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: the SDK asks for the next one `after` the last id while `has_more`."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


def list_limit(value: str | None, *, default: int, most: int) -> int:
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise ApiError(400, f"'limit' must be an integer from 1 to {most}.", param="limit")
    return limit


async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(file_object(await owned_file(request, request.match_info["file_id"])))


async def content(request: web.Request) -> web.FileResponse:
    record = await owned_file(request, request.match_info["file_id"])
    path = request.app[STATE].file_storage.path(record.storage_key)
    return web.FileResponse(path, headers={"Content-Type": "application/jsonl"})


async def delete(request: web.Request) -> web.Response:
    record = await owned_file(request, request.match_info["file_id"])
    deleted = await store_call(file_store(request.app).delete(record.id, record.user_id))
    if deleted:
        request.app[STATE].file_storage.discard(record.storage_key)
    return web.json_response({"id": record.id, "object": "file", "deleted": deleted})
