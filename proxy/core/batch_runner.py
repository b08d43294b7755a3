"""The runner of OpenAI batches: a background task in each gateway process that answers every line
of a batch through the same steps as a live request (`proxy.core.dispatch.run_line`) and writes the
answers to the output and error files.

Progress is durable: each answered line is a row in the database (`OpenAIBatchStore.record_line`),
and a runner resuming a batch skips the lines that have one, so a gateway restarted or killed
mid-batch sends no finished line again. A batch is run by whichever runner holds its lease; the
lease is renewed while it runs, and the renewal is also how the runner hears of a cancel.

Concurrency is bounded per batch, per user and in total (`openai_batches` settings), so that a batch
takes only its share of the backends and of this process, and live requests keep the rest.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from adaptors import BaseEndpoint
from proxy.core.batch_lines import BatchLine, read_lines
from proxy.core.batch_results import expired_line, result_file, result_line
from proxy.core.dispatch import run_line
from proxy.core.exchange import Exchange
from proxy.core.federation import worth_another_endpoint
from proxy.core.identity import User
from proxy.core.limits import Limited
from proxy.core.lookup import check_framework, check_openai_path, find_cluster, find_endpoint
from proxy.core.state import GatewayState
from proxy.errors import ApiError, error_body
from proxy.records.database import DatabaseUnavailable
from proxy.records.file_store import FileStore, LocalFileStorage
from proxy.records.openai_batch_store import LineResult, OpenAIBatchRecord, OpenAIBatchStore
from proxy.settings.openai_batches import OpenAIBatchSettings

log = logging.getLogger(__name__)

READ_AHEAD = 256
"""Lines read from the input file per step (in a thread): never the whole file in memory."""


def user_of(batch: OpenAIBatchRecord) -> User:
    """The batch's owner as they were when they created it: a line is served with their access."""
    fields = json.loads(batch.user_json)
    return User(**{**fields, "groups": frozenset(fields.get("groups", ()))})


def user_json(user: User) -> str:
    return json.dumps({**user.__dict__, "groups": sorted(user.groups)})


@dataclass
class _Run:
    batch: OpenAIBatchRecord
    stopping: str | None = None
    """"cancelled" or "expired" once the runner must send no new line."""


class BatchRunner:
    def __init__(
        self,
        state: GatewayState,
        batches: OpenAIBatchStore,
        files: FileStore,
        storage: LocalFileStorage,
        settings: OpenAIBatchSettings,
    ) -> None:
        self.owner = uuid.uuid4().hex
        self._state, self._batches, self._files, self._storage = state, batches, files, storage
        self._settings = settings
        self._total = asyncio.Semaphore(settings.concurrent_total)
        self._per_user: dict[str, asyncio.Semaphore] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run_forever(self) -> None:
        """For the life of the gateway; a database outage only delays the batches."""
        while True:
            try:
                await self.look_once()
            except DatabaseUnavailable:
                log.warning("batch database unavailable; batches will run when it returns")
            except Exception:
                log.exception("looking for batches to run failed")
            await asyncio.sleep(self._settings.poll_seconds)

    async def look_once(self) -> None:
        """Take the lease of every batch waiting for a runner, and run each."""
        now = time.time()
        for batch_id in await self._batches.claimable(now, self.owner):
            if batch_id in self._running:
                continue
            if (
                await self._batches.lease(batch_id, self.owner, now + self._settings.lease_seconds, now)
                is None
            ):
                continue
            task = asyncio.create_task(self._own(batch_id))
            self._running[batch_id] = task
            task.add_done_callback(functools.partial(self._forget, batch_id))

    def _forget(self, batch_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(batch_id, None)

    async def close(self) -> None:
        """Stops every batch this process runs; their finished lines are kept, and their leases freed
        so that another process takes them over at once."""
        running = list(self._running.items())
        for _, task in running:
            task.cancel()
        await asyncio.gather(*(task for _, task in running), return_exceptions=True)
        for batch_id, _ in running:
            try:
                await self._batches.release(batch_id, self.owner)
            except DatabaseUnavailable:
                log.warning("could not release the lease of batch %s; it lapses on its own", batch_id)

    async def _own(self, batch_id: str) -> None:
        """Runs the batch while renewing its lease; a lease lost (this process was too slow to renew
        it, and another took it) stops the batch here."""
        batch = await self._batches.get(batch_id)
        if batch is None:
            return
        run = _Run(batch, stopping="cancelled" if batch.status == "cancelling" else None)
        work = asyncio.create_task(self._run(run))
        renew_every = min(self._settings.lease_seconds / 3, self._settings.poll_seconds)
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=renew_every)
                if work.done():
                    break
                now = time.time()
                try:
                    leased = await self._batches.lease(
                        batch_id, self.owner, now + self._settings.lease_seconds, now
                    )
                except DatabaseUnavailable:
                    continue
                if leased is None:
                    log.warning("lost the lease of batch %s; another runner continues it", batch_id)
                    work.cancel()
                    continue
                run.batch.expires_at = leased.expires_at
                if leased.status == "cancelling":
                    run.stopping = "cancelled"
            await work
            await self._batches.release(batch_id, self.owner)
        except asyncio.CancelledError:
            work.cancel()
            raise
        except Exception:
            log.exception("batch %s stopped; it is resumed when its lease lapses", batch_id)

    async def _run(self, run: _Run) -> None:
        batch = run.batch
        if batch.status == "validating" and not await self._validate(run):
            return
        if batch.status == "in_progress" and run.stopping is None:
            await self._lines(run)
        await self._finish(run)

    async def _validate(self, run: _Run) -> bool:
        """Every line's url is the batch's endpoint and its model one the user may use there; the
        problems become the batch's `errors`, each with its line."""
        batch, user = run.batch, user_of(run.batch)
        problems: list[dict[str, Any]] = []
        checked: dict[str, ApiError | None] = {}
        total = 0
        async for line in self._input(batch):
            total += 1
            if line.url != batch.endpoint:
                message = f"The url {line.url} differs from the batch's endpoint {batch.endpoint}."
                problems.append(
                    {"code": "invalid_url", "message": message, "param": "url", "line": line.number}
                )
                continue
            model = line.body["model"]
            if model not in checked:
                checked[model] = await self._refused(user, batch, line.openai_path, model)
            refused = checked[model]
            if refused is not None:
                problems.append(
                    {
                        "code": refused.code,
                        "message": refused.message,
                        "param": "body.model",
                        "line": line.number,
                    }
                )
        if problems:
            errors = json.dumps({"object": "list", "data": problems[:1000]})
            await self._batches.move(
                batch.id, "failed", only_from=("validating",), errors=errors, total=total
            )
            return False
        if not await self._batches.move(batch.id, "in_progress", only_from=("validating",), total=total):
            run.stopping = "cancelled"
            return True
        batch.status, batch.total = "in_progress", total
        return True

    async def _refused(
        self, user: User, batch: OpenAIBatchRecord, openai_path: str, model: str
    ) -> ApiError | None:
        """A model refused for good (a 4xx); an endpoint only unavailable now is tried line by line."""
        try:
            await self._endpoints(user, batch, openai_path, model)
        except ApiError as exc:
            return exc if exc.status < 500 else None
        return None

    async def _endpoints(
        self, user: User, batch: OpenAIBatchRecord, openai_path: str, model: str
    ) -> list[BaseEndpoint]:
        """As a live request picks them: the cluster of the batch's base URL, or federation."""
        state = self._state
        if batch.cluster is None or batch.framework is None:
            return await state.federation.ranked_endpoints(user, openai_path, model)
        cluster = find_cluster(state.registry, batch.cluster, user)
        state.maintenance.check(cluster)
        check_framework(cluster, batch.framework)
        check_openai_path(cluster, openai_path)
        return [find_endpoint(state.registry, cluster, batch.framework, model, user)]

    async def _input(self, batch: OpenAIBatchRecord) -> AsyncIterator[BatchLine]:
        record = await self._files.get(batch.input_file_id, batch.user_id)
        if record is None:
            return
        lines = read_lines(self._storage.path(record.storage_key))
        while chunk := await asyncio.to_thread(list, itertools.islice(lines, READ_AHEAD)):
            for line in chunk:
                yield line

    async def _lines(self, run: _Run) -> None:
        batch, user = run.batch, user_of(run.batch)
        answered = await self._batches.answered_lines(batch.id)
        per_batch = asyncio.Semaphore(self._settings.concurrent_per_batch)
        per_user = self._per_user.setdefault(user.id, asyncio.Semaphore(self._settings.concurrent_per_user))
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for line in self._input(batch):
                if line.number in answered:
                    continue
                await per_batch.acquire()
                if time.time() > batch.expires_at:
                    run.stopping = "expired"
                if run.stopping is not None:
                    per_batch.release()
                    break
                task = asyncio.create_task(self._line(batch, user, line, per_user))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                task.add_done_callback(lambda _: per_batch.release())
            await asyncio.gather(*in_flight)
        except BaseException:
            for task in in_flight:
                task.cancel()
            raise

    async def _line(
        self, batch: OpenAIBatchRecord, user: User, line: BatchLine, per_user: asyncio.Semaphore
    ) -> None:
        async with per_user, self._total:
            exchange = Exchange(
                request_id=f"batch_req_{uuid.uuid4().hex}",
                started=time.monotonic(),
                started_at=time.time(),
                route="batch_line",
                user=user,
                method="POST",
                path=line.url,
            )
            status, body = await self._answer(batch, user, line, exchange)
            exchange.status = status
            self._state.recorder.emit_line(exchange)
            result = LineResult(line.number, line.custom_id, exchange.request_id, status, body, None)
            await self._batches.record_line(batch.id, result)

    async def _answer(
        self, batch: OpenAIBatchRecord, user: User, line: BatchLine, exchange: Exchange
    ) -> tuple[int, str]:
        """The line's status and JSON body; a federated line fails over as a live request does."""
        try:
            endpoints = await self._endpoints(user, batch, line.openai_path, line.body["model"])
            failure = ApiError(503, "No endpoint could serve the request.", code="model_unavailable")
            for endpoint in endpoints:
                while True:
                    try:
                        served = await run_line(self._state, endpoint, line.openai_path, line.body, exchange)
                        break
                    except Limited as exc:
                        await asyncio.sleep(max(exc.retry_after, 0.05))
                exchange.served = served
                if served.failure is None and served.response is not None:
                    return 200, cast(bytes, cast(web.Response, served.response).body).decode()
                failure = cast(ApiError, served.failure)
                if not worth_another_endpoint(failure):
                    break
        except ApiError as exc:
            failure = exc
        except Exception as exc:
            log.exception("batch %s line %d failed", batch.id, line.number)
            failure = ApiError(500, f"The gateway failed to send the request: {type(exc).__name__}")
        exchange.error = failure.message
        return failure.status, json.dumps(
            error_body(failure.status, failure.message, failure.param, failure.code)
        )

    async def _finish(self, run: _Run) -> None:
        """The result files, then the final status; resumable, since the files are written again
        under the same ids by a runner that resumes a batch stopped here."""
        batch = run.batch
        final = run.stopping or "completed"
        if final == "completed":
            await self._batches.move(batch.id, "finalizing", only_from=("in_progress",))
            current = await self._batches.get(batch.id)
            if current is not None and current.status == "cancelling":
                final = "cancelled"
        results = await self._batches.results(batch.id)
        ok = [result_line(result) for result in results if result.status_code == 200]
        failed = [result_line(result) for result in results if result.status_code != 200]
        if final == "expired":
            answered = {result.line for result in results}
            async for line in self._input(batch):
                if line.number not in answered:
                    failed.append(expired_line(line))
        columns: dict[str, Any] = {}
        for kind, lines in (("output", ok), ("error", failed)):
            if lines:
                record = result_file(batch, kind)
                record.bytes = await asyncio.to_thread(
                    self._storage.write_lines, record.storage_key, iter(lines)
                )
                await self._files.replace(record)
                columns[f"{kind}_file_id"] = record.id
        moved = await self._batches.move(
            batch.id, final, only_from=("in_progress", "finalizing", "cancelling"), **columns
        )
        if not moved:
            log.info("batch %s was finished elsewhere", batch.id)
