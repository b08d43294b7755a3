"""What a Globus Compute stream looks like to the client, whichever function feeds the relay.

Two functions speak the callback protocol. The existing gateway's function never forwards vLLM's
`data: [DONE]` (it posts `/done/` instead), sends its last lines only on `[DONE]` (so the Responses
and Messages streams, which end otherwise, lose their end), and reports a failed stream in its
result rather than by raising. `compute-functions/vllm_inference.py` forwards every line, `[DONE]`
included, and raises on failure. The client sees the same stream from both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeGuard

from adaptors.endpoint import StreamError
from adaptors.relay import RelayStream
from adaptors.remote_errors import remote_error

log = logging.getLogger(__name__)

CallbackProtocol = Literal["existing", "gateway"]
"""`existing`: the existing gateway's function; `gateway`: compute-functions/vllm_inference.py."""

DONE_EVENT = b"data: [DONE]\n\n"
_DONE = re.compile(rb"^data: ?\[DONE\]\n\n?", re.MULTILINE)
ENDS_WITH_DONE = frozenset({"chat/completions", "completions"})
"""The APIs whose streams end with `data: [DONE]`; the Responses and Messages APIs end with an event."""
NAMED_EVENT_APIS = frozenset({"responses", "messages"})


def unsupported_stream(protocol: CallbackProtocol, openai_endpoint: str) -> str | None:
    """Why this endpoint's function cannot stream this API, or None when it can."""
    if protocol != "existing" or openai_endpoint not in NAMED_EVENT_APIS:
        return None
    return (
        f"Streaming /v1/{openai_endpoint} is not available on this endpoint: its compute function sends "
        "the last events of a stream only on 'data: [DONE]', which this API never sends, so the stream "
        "would be cut short. Send the request with 'stream': false, or ask the site to register "
        "compute-functions/vllm_inference.py and set 'callback_protocol: gateway' on this endpoint."
    )


def client_events(stream: RelayStream, openai_endpoint: str) -> AsyncIterator[bytes]:
    """The relay's events for the client: for chat and completions, whatever `[DONE]` a function
    forwarded is dropped and exactly one ends a stream that ended well."""
    if openai_endpoint not in ENDS_WITH_DONE:
        return stream.events()
    return _one_done(stream.events())


async def _one_done(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in events:
            if b"[DONE]" in chunk:
                chunk = _DONE.sub(b"", chunk)
                if not chunk:
                    continue
            yield chunk
    finally:
        await close(events)
    yield DONE_EVENT


async def with_watcher(events: AsyncIterator[bytes], watcher: asyncio.Task[None]) -> AsyncIterator[bytes]:
    """The client's events while `watcher` follows the task. A failure before the first chunk is
    the task's (it failed, or it is still running after the first-chunk limit): a retry would run
    it again. Only an unavailable relay (503) is worth one."""
    try:
        async for chunk in events:
            yield chunk
    except StreamError as exc:
        if exc.code == 503:
            raise
        raise StreamError(exc.message, exc.code, retryable=False) from exc
    finally:
        watcher.cancel()
        await close(events)


async def drain(stream: RelayStream) -> None:
    """Release a stream that never reached a client."""
    events = stream.events()
    try:
        async for _ in events:
            pass
    except StreamError:
        pass


async def close(events: AsyncIterator[bytes]) -> None:
    """Close a stream now (not when it is collected), so the relay knows the client left now."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def stream_failure(value: Any) -> tuple[int, str] | None:
    """(status, message) when a finished task's result says its stream failed.

    The existing function returns `{"status": "error", "error": ...}`, or `"completed"` with fewer
    `chunks_sent_to_server` than `total_chunks` (callbacks refused or lost, or the last lines never
    sent because the stream had no `[DONE]`). Our function's results have neither field."""
    try:
        document = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    if document.get("status") == "error":
        failure = remote_error(str(document.get("error") or "The compute function's stream failed."))
        if failure.detail is not None:
            log.warning("a compute function's stream failed: %s", failure.detail[:2000])
        return failure.status, failure.message
    total, sent = document.get("total_chunks"), document.get("chunks_sent_to_server")
    if not (_count(total) and _count(sent)):
        return None
    if sent >= total:
        return None
    warning = document.get("warning")
    if sent == 0 and warning:
        return 502, (
            f"None of the model's output reached the gateway ({str(warning)[:200]}): the compute "
            "function's callbacks failed or were refused. Check that streaming.callback_url is "
            "reachable from the compute endpoint and that INTERNAL_STREAMING_SECRET matches."
        )
    if warning:
        return 502, f"The stream is incomplete: the compute function reported {str(warning)[:200]}."
    return 502, (
        f"The stream is incomplete: the compute function relayed {sent} of {total} lines and never "
        "sent the rest (the existing function sends its last lines only on 'data: [DONE]')."
    )


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
