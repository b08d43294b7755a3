"""Token usage from backends' own `usage`, never estimated.

For a stream the gateway asks the backend to report usage (`stream_options.include_usage`); when
the client did not ask for it, the usage-only event is taken out of what the client sees, so the
client's stream is what it asked for and the accounting is still exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    @classmethod
    def of(cls, document: Any) -> Usage | None:
        usage = document.get("usage") if isinstance(document, dict) else None
        if not isinstance(usage, dict):
            return None
        counts = {key: usage[key] for key in TOKEN_FIELDS if isinstance(usage.get(key), int)}
        return cls(**counts) if counts else None


def ask_for_usage(model_params: dict[str, Any]) -> bool:
    """Adds `include_usage` to a stream request; True when the client had not asked for it."""
    options = model_params.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    model_params["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
"""A blank line ends an event, in any of SSE's line endings (sse-starlette, for one, sends CRLF)."""
_EVENT_END = re.compile(b"(" + b"|".join(re.escape(end) for end in EVENT_ENDS) + b")")
MAX_HELD_BYTES = 1 << 20
"""A longer unfinished event is passed on unscanned: a backend whose event never ends must not make
the gateway hold everything it sends."""


def _end_of_last_event(data: bytes) -> int:
    """Where the last complete event in `data` ends; 0 when none has ended yet."""
    return max(at + len(end) if (at := data.rfind(end)) >= 0 else 0 for end in EVENT_ENDS)


class UsageScanner:
    """Reads usage out of an SSE stream as it passes, without holding back complete events.

    Only an event still incomplete at the end of a read is held until its end arrives; the client
    could not use half an event anyway.
    """

    def __init__(self, strip_usage_event: bool) -> None:
        self.usage: Usage | None = None
        self._strip = strip_usage_event
        self._tail = b""

    async def scan(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                passed = self._feed(chunk)
                if passed:
                    yield passed
            if self._tail:
                yield self._tail
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk
        end = _end_of_last_event(data)
        if end == 0:
            if len(data) > MAX_HELD_BYTES:
                self._tail = b""
                return data
            self._tail = data
            return b""
        complete, self._tail = data[:end], data[end:]
        if b'"usage"' not in complete:
            return complete
        pieces = _EVENT_END.split(complete)
        return b"".join(
            self._event(event + end) for event, end in zip(pieces[::2], pieces[1::2], strict=False)
        )

    def _event(self, event: bytes) -> bytes:
        payload = event.strip()
        if not payload.startswith(b"data:") or b'"usage"' not in payload:
            return event
        try:
            document = json.loads(payload[5:])
        except ValueError:
            return event
        usage = Usage.of(document)
        if usage is None:
            return event
        self.usage = usage
        usage_only = isinstance(document, dict) and not document.get("choices")
        return b"" if self._strip and usage_only else event
