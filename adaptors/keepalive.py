"""SSE comment keep-alives while a stream waits for its first chunk.

The gateway sends a stream's headers with its first item. A backend that queues the request, or
loads the model, sends nothing for minutes: the client would see no headers and no bytes, and a
proxy or client read timeout could end the request while the model works. Comments (lines
starting with `:`) are ignored by every SSE client, so they keep the connection alive without
changing the stream. After the first chunk the backend's own pace is relayed untouched, without
the cost of a timer per chunk.

The first chunk is awaited in a task of its own (a comment must go out while it is awaited, and
the wait must not be cancelled to do so). That task hands the chunk over itself, waking the
stream's reader at once: every turn of the event loop between the chunk's arrival and its relay
lets every other stream's ready work go first, which under 16 paced streams cost the first chunk
about 0.25 ms with `asyncio.wait` in between (docs/performance.md, 2026-12-05).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

WAITING = b": waiting for the model\n\n"


class _End:
    """The iterator ended without a chunk."""


_END = _End()


@dataclass
class _First:
    """Where the first chunk (or how the iterator ended) is handed over, and the waiter it wakes."""

    outcome: bytes | _End | BaseException | None = None
    wake: asyncio.Future[None] | None = None

    def settle(self, outcome: bytes | _End | BaseException) -> None:
        self.outcome = outcome
        self.ring()

    def ring(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


async def until_first_chunk(chunks: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """Yields `chunks`, and `WAITING` every `every` seconds until the first of them arrives.
    Closing it closes `chunks`."""
    loop = asyncio.get_running_loop()
    first = _First()
    reader = loop.create_task(_hand_over(chunks, first))
    try:
        try:
            while first.outcome is None:
                first.wake = loop.create_future()
                timer = loop.call_later(every, first.ring)
                try:
                    await first.wake
                finally:
                    timer.cancel()
                if first.outcome is None:
                    yield WAITING
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.wait({reader})
        outcome = first.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, _End):
            return
        yield outcome
        async for chunk in chunks:
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _hand_over(chunks: AsyncIterator[bytes], first: _First) -> None:
    try:
        first.settle(await anext(chunks))
    except StopAsyncIteration:
        first.settle(_END)
    except Exception as exc:  # the stream's reader raises it, as if it had read the chunk itself
        first.settle(exc)
