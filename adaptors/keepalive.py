"""SSE comment keep-alives while a stream waits for its first chunk.

The gateway sends a stream's headers with its first item. A backend that queues the request, or
loads the model, sends nothing for minutes: the client would see no headers and no bytes, and a
proxy or client read timeout could end the request while the model works. Comments (lines
starting with `:`) are ignored by every SSE client, so they keep the connection alive without
changing the stream. After the first chunk the backend's own pace is relayed untouched, without
the cost of a timer per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

WAITING = b": waiting for the model\n\n"


class _End:
    """The iterator ended without a chunk."""


_END = _End()


async def until_first_chunk(chunks: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """Yields `chunks`, and `WAITING` every `every` seconds until the first of them arrives.
    Closing it closes `chunks`."""
    try:
        first = asyncio.ensure_future(_next(chunks))
        try:
            while not (await asyncio.wait({first}, timeout=every))[0]:
                yield WAITING
        finally:
            if not first.done():
                first.cancel()
                await asyncio.wait({first})
        chunk = first.result()
        if isinstance(chunk, _End):
            return
        yield chunk
        async for chunk in chunks:
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _next(chunks: AsyncIterator[bytes]) -> bytes | _End:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return _END
