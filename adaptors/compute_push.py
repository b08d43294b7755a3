"""Answers of non-streamed Globus Compute requests pushed by the function through the relay.

Polling the Compute service cannot answer an instant task within 10 ms: at the service's budget of
status calls (adaptors/compute_service.py) every request needs at least one call. A function that
knows the gateway's callback route (compute-functions/vllm_inference.py, given the same callback
details as a stream) POSTs its answer to `/api/streaming/data/` as one `data:` line as soon as it has
it, and returns it as its task result as well. The adaptor takes whichever comes first, the pushed
answer or the polled result: once pushed, the task is no longer polled. Only while few requests
wait for theirs (`PUSH_WHILE_WAITING_FOR`): under load one status call answers for many tasks at
less cost than a push each.

A pushed answer is trusted no more than a polled one: it arrived through the callback route, which
checked the shared secret, the slot's token and the relay's size limit, and it goes through the same
JSON check as a polled result. Anything else (no push before the relay's first-chunk limit, a refused
callback ending the slot, several lines, a body that is not one JSON answer) leaves the request to
the poll, never to an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from adaptors.compute_results import as_json_text
from adaptors.compute_streams import close
from adaptors.endpoint import StreamError
from adaptors.relay import RelayStream, StreamRelay

log = logging.getLogger(__name__)

PUSH_WHILE_WAITING_FOR = 16
"""Answers are pushed only while fewer requests than this wait for theirs (per set of
credentials). A push costs the gateway a request of its own (a connection, the callback route, a
record), about 2.5 ms of CPU in the bench against 0.7 ms for a whole polled request, while one
status call answers for every task pending: with 100 requests in flight, pushing every answer cut
the gateway's requests a second from 1,142 to 306 (docs/performance.md, 2026-12-04 19:22). With
few in flight, the status-call budget is what a request waits for, and pushing removes that wait."""
PREFIX = b"data: "
END = b"\n\n"


async def open_slot(relay: StreamRelay) -> RelayStream | None:
    """A relay slot for the answer, or None when the relay has no room (its `max_streams`) or does
    not answer: the request is then answered by polling alone, as a function that does not push."""
    try:
        return await relay.open()
    except Exception as exc:  # the server's RelayFull or RelayUnavailable, which adaptors cannot import
        log.debug("no relay slot for a pushed answer (%s): polling only", type(exc).__name__)
        return None


async def release_slot(slot: RelayStream) -> None:
    """Release a slot whose task was never submitted."""
    await slot.finish()
    await pushed_answer(slot)


async def pushed_answer(slot: RelayStream) -> str | None:
    """The answer the function pushed, as JSON text; None when none usable came. The slot is
    released when this returns or is cancelled, so later callbacks for it are answered 410."""
    events = slot.events()
    try:
        async for chunk in events:
            if chunk.startswith(b":"):  # the relay's keep-alive comments
                continue
            return _answer(chunk)
    except StreamError:  # the relay's first-chunk limit, or a refused callback (wrong secret or token)
        return None
    finally:
        await close(events)
    return None


def _answer(chunk: bytes) -> str | None:
    """One `data:` line holding one JSON document; anything else is not a pushed answer."""
    if not (chunk.startswith(PREFIX) and chunk.endswith(END)) or chunk.count(b"\n") != 2:
        log.warning("a pushed Compute answer was not one data line; waiting for the task's result")
        return None
    try:
        return as_json_text(chunk[len(PREFIX) : -len(END)].decode())
    except (UnicodeDecodeError, ValueError):
        log.warning("a pushed Compute answer was not JSON; waiting for the task's result")
        return None


async def first_answer(slot: RelayStream, polled: Awaitable[Any]) -> Any:
    """The pushed answer or the polled value, whichever comes first; raises what the poll raises.
    The loser is cancelled: the poll stops looking at the task, the slot is released."""
    poll = asyncio.ensure_future(polled)
    push = asyncio.ensure_future(pushed_answer(slot))
    try:
        done, _ = await asyncio.wait({poll, push}, return_when=asyncio.FIRST_COMPLETED)
        if push in done and push.exception() is None and push.result() is not None:
            return push.result()
        return await poll
    finally:
        poll.cancel()
        push.cancel()
        await asyncio.wait({poll, push})
        for waiter in (poll, push):
            if not waiter.cancelled():
                waiter.exception()  # retrieved: what the other one brought is what counts
