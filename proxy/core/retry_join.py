"""A client's retry joins the work still running for its earlier attempt instead of starting it again.

The openai and anthropic SDKs retry a request whose answer did not come within their timeout.
The gateway cannot call a Globus Compute task back, so each retry used to queue the same work
again while the first task went on. Here a non-streamed request from such a client runs its
adaptor call apart from its own handler: when the client leaves, the call goes on for
`join_seconds`, and a retry of it (same user, endpoint and body, marked by the SDK's
`x-stainless-retry-count` of 1 or more, or the same `Idempotency-Key`) awaits that call instead of
submitting a new one. A result that finished with nobody waiting is kept `keep_seconds` for the
retry that is on its way.

Only retries join: two identical first attempts (a researcher sampling twice) each run. Work is
never shared across users. Requests from other clients (curl) are cancelled with their connection,
as before. Memory is bounded by `max_entries` and, for kept results, `max_kept_bytes`.

Streams are not joined: their headers and keep-alive comments reach the client within the
keep-alive interval, so an SDK's read timeout does not fire while the model works, and a stream
whose client left is ended at the backend; a retried stream starts anew.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from adaptors import SubmitTaskResponse
from proxy.settings.traffic import RetrySettings

log = logging.getLogger(__name__)

RETRY_COUNT_HEADER = "x-stainless-retry-count"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 256

JoinKey = tuple[str, str, str]
"""user id, endpoint slug, digest of the body (and of the idempotency key when there is one)"""
Start = Callable[[], Coroutine[Any, Any, SubmitTaskResponse]]


@dataclass(frozen=True)
class Joining:
    """How one request takes part: its key, and whether it may join work already running."""

    key: JoinKey
    may_join: bool


def joining_of(
    request: web.Request, user_id: str, endpoint_slug: str, params: dict[str, Any]
) -> Joining | None:
    """None for a request from a client that does not retry (nothing to join later)."""
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER, "")[:MAX_IDEMPOTENCY_KEY_CHARS]
    count = request.headers.get(RETRY_COUNT_HEADER)
    if not idempotency_key and count is None:
        return None
    digest = hashlib.sha256(_canonical(params))
    digest.update(b"\0" + idempotency_key.encode())
    attempt = (count or "").strip()
    retry = attempt.isascii() and attempt.isdigit() and attempt.strip("0") != ""
    return Joining((user_id, endpoint_slug, digest.hexdigest()), may_join=retry or bool(idempotency_key))


def _canonical(params: dict[str, Any]) -> bytes:
    """The fields in one spelling whatever their order, to digest. The openai and anthropic SDKs
    mark every request with a retry count, so every request of theirs is digested, on the event
    loop: orjson spells a short chat body in 0.3 µs against the standard library's 4.5 µs, and a
    100 kB prompt in 9 µs against 320 µs. What orjson cannot encode (integers beyond 64 bits, lone
    surrogates, deep nesting) the standard library spells, marked apart so that the two spellings
    never meet."""
    try:
        return b"o" + orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return b"j" + json.dumps(params, sort_keys=True).encode()


@dataclass(eq=False)
class _Work:
    task: asyncio.Task[SubmitTaskResponse]
    waiters: int = 0
    orphaned: asyncio.TimerHandle | None = None
    kept_bytes: int = 0


class RetryJoins:
    def __init__(self, settings: RetrySettings) -> None:
        self._settings = settings
        self._works: OrderedDict[JoinKey, _Work] = OrderedDict()
        self._kept_bytes = 0

    def __len__(self) -> int:
        return len(self._works)

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    async def run(self, joining: Joining | None, start: Start) -> tuple[SubmitTaskResponse, bool]:
        """The adaptor's answer, and whether it came from work started by an earlier attempt."""
        if joining is None or self._settings.join_seconds == 0:
            return await start(), False
        work = self._works.get(joining.key) if joining.may_join else None
        joined = work is not None
        if work is None:
            work = self._begin(joining.key, start)
        else:
            log.info("a retry joined the work of its earlier attempt on %s", joining.key[1])
        if work.orphaned is not None:
            work.orphaned.cancel()
            work.orphaned = None
        work.waiters += 1
        try:
            return await asyncio.shield(work.task), joined
        finally:
            work.waiters -= 1
            if work.waiters == 0 and not work.task.done():
                loop = asyncio.get_running_loop()
                work.orphaned = loop.call_later(self._settings.join_seconds, self._abandon, joining.key, work)

    async def close(self) -> None:
        """At shutdown: work nobody waits for is not worth finishing."""
        for work in list(self._works.values()):
            if work.waiters == 0:
                work.task.cancel()
        self._works.clear()
        self._kept_bytes = 0

    def _begin(self, key: JoinKey, start: Start) -> _Work:
        """A new work replaces an older one of the same key (which goes on for its own waiters)."""
        self._forget(key)
        while len(self._works) >= self._settings.max_entries:
            self._forget(next(iter(self._works)))
        work = _Work(asyncio.ensure_future(start()))
        self._works[key] = work
        work.task.add_done_callback(lambda _: self._finished(key, work))
        return work

    def _finished(self, key: JoinKey, work: _Work) -> None:
        """Delivered to a waiter, the result is done with; finished with nobody waiting (the client
        left, its retry is on its way), it is kept a while, within the bytes allowed."""
        if work.task.cancelled() or work.task.exception() is not None or work.waiters > 0:
            self._forget(key, work)
            return
        if self._works.get(key) is not work:
            return
        size = len(work.task.result().result or "")
        if size > self._settings.max_kept_bytes:
            self._forget(key, work)
            return
        work.kept_bytes = size
        self._kept_bytes += size
        self._works.move_to_end(key)
        while self._kept_bytes > self._settings.max_kept_bytes:
            self._forget(next(k for k, w in self._works.items() if w.kept_bytes))
        asyncio.get_running_loop().call_later(self._settings.keep_seconds, self._forget, key, work)

    def _abandon(self, key: JoinKey, work: _Work) -> None:
        """No retry came within `join_seconds` of the last client leaving."""
        if work.waiters == 0 and not work.task.done():
            work.task.cancel()
            self._forget(key, work)

    def _forget(self, key: JoinKey, work: _Work | None = None) -> None:
        """Drops the entry of `key` (only if it is still `work`, when given)."""
        current = self._works.get(key)
        if current is None or (work is not None and current is not work):
            return
        del self._works[key]
        self._kept_bytes -= current.kept_bytes
        current.kept_bytes = 0
