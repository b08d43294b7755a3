"""Token usage from backends' own `usage`; estimated only for a stream that ended without it.

Chat and completions streams report usage only when asked (`stream_options.include_usage`): the
gateway asks (`ask_for_usage`, a step of every stream's dispatch), and when the client did not,
takes the usage-only event out of what the client sees, so the client's stream is what it asked for
and the accounting is still exact. Responses and
Messages streams always report usage, as input and output tokens: nothing is added to those
requests or taken out of those streams.

A stream cut short (the client hung up, the backend broke off) never reaches its usage event, yet its
tokens were generated and delivered: otherwise a client could escape every token limit by hanging up
before the last chunk. Such a stream is charged an estimate, marked as one (`Usage.estimated`): one
token per event delivered (vLLM sends a token or a few per event), and a prompt of a token per four
bytes of its JSON.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.core import json_codec
from proxy.records.storable import MAX_TOKENS

TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
REPORTS_USAGE = frozenset({"responses", "messages"})
"""The APIs whose streams report usage unasked, in input and output tokens."""

_OPENAI_NAMES = {field: field for field in TOKEN_FIELDS}
_INPUT_OUTPUT_NAMES = {
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "total_tokens": "total_tokens",
}


@dataclass
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    estimated: bool = False
    """True when some count was estimated because the backend never reported it."""

    @classmethod
    def of(cls, document: Any, openai_path: str) -> Usage | None:
        """From a whole answer: every API puts `usage` at its top."""
        usage = document.get("usage") if isinstance(document, dict) else None
        return cls.counted(_counts(usage, _names(openai_path)))

    @classmethod
    def counted(cls, counts: Mapping[str, int], *, estimated: bool = False) -> Usage | None:
        """Anthropic reports no total, and the rate limits count totals: it is the sum then."""
        if not counts:
            return None
        usage = cls(
            counts.get("prompt_tokens"),
            counts.get("completion_tokens"),
            counts.get("total_tokens"),
            estimated,
        )
        if usage.total_tokens is None and usage.prompt_tokens is not None:
            usage.total_tokens = min(usage.prompt_tokens + (usage.completion_tokens or 0), MAX_TOKENS)
        return usage


def _names(openai_path: str) -> Mapping[str, str]:
    return _INPUT_OUTPUT_NAMES if openai_path in REPORTS_USAGE else _OPENAI_NAMES


def _counts(usage: Any, names: Mapping[str, str]) -> dict[str, int]:
    """A negative count is no count: stored, it would lower usage reports and refund rate limits."""
    counts: dict[str, int] = {}
    if isinstance(usage, dict):
        for theirs, ours in names.items():
            count = usage.get(theirs)
            if type(count) is int and count >= 0:  # JSON's true and false are not counts
                counts[ours] = min(count, MAX_TOKENS)
    return counts


def ask_for_usage(model_params: dict[str, Any]) -> bool:
    """Asks a chat or completions stream for its usage (`stream_options.include_usage`), which token
    limits and records need; True when the client had not asked, so that the usage-only event is
    taken out of its stream. Responses and Messages streams report usage unasked: nothing is added."""
    if model_params["openai_endpoint"] in REPORTS_USAGE:
        return False
    options = model_params.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    model_params["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def usage_scanner(openai_path: str, *, strip_usage_event: bool) -> UsageScanner:
    """The scanner of a stream of the API at `openai_path`, which reads its usage in that API's names."""
    return UsageScanner(_names(openai_path), strip_usage_event=strip_usage_event)


EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
"""A blank line ends an event, in any of SSE's line endings (sse-starlette, for one, sends CRLF)."""
_LF_ENDS = (b"\n\n",)
"""The only end of an event in a read without CR, as most backends write them."""
_USAGE = b'"usage"'
MAX_HELD_BYTES = 1 << 20
"""A longer unfinished event is passed on unscanned: a backend whose event never ends must not make
the gateway hold everything it sends."""


def _end_of_last_event(data: bytes) -> int:
    """Where the last complete event in `data` ends; 0 when none has ended yet. A read usually ends
    with an event's end (a backend writes whole events), which the first test finds without a search."""
    if data.endswith(EVENT_ENDS):
        return len(data)
    return _after_last_end(data, 0, len(data), EVENT_ENDS)


def _after_last_end(data: bytes, start: int, stop: int, ends: tuple[bytes, ...]) -> int:
    """Just after the last event end that lies whole in `data[start:stop]`; `start` when none does.
    With `stop` inside an event, where that event starts."""
    after = start
    for end in ends:
        found = data.rfind(end, start, stop)
        if found >= 0 and found + len(end) > after:
            after = found + len(end)
    return after


def _end_of_event(data: bytes, at: int, ends: tuple[bytes, ...]) -> int:
    """Where the event holding position `at` ends, its blank line included; `data` ends with an
    event's end, so there is one."""
    return min(found + len(end) for end in ends if (found := data.find(end, at)) >= 0)


class UsageScanner:
    """Reads usage out of an SSE stream as it passes, without holding back complete events.

    Only an event still incomplete at the end of a read is held until its end arrives; the client
    could not use half an event anyway. Counts from later events replace earlier ones: Anthropic
    sends input tokens at the start and the output so far with each `message_delta`.
    """

    def __init__(self, names: Mapping[str, str], *, strip_usage_event: bool) -> None:
        self.usage: Usage | None = None
        self._names = names
        self._counts: dict[str, int] = {}
        self._strip = strip_usage_event
        self._tail = b""
        self.events = 0
        """Events passed to the client that carried data, the measure of a stream cut short."""

    def final_usage(self, request_body: Mapping[str, Any]) -> Usage | None:
        """The backend's usage when it reported all of it; else an estimate, if anything was delivered."""
        counts = self._counts
        if self.events == 0 or ("prompt_tokens" in counts and "completion_tokens" in counts):
            return self.usage
        estimated = dict(counts)
        estimated.setdefault("completion_tokens", self.events)
        estimated.setdefault("prompt_tokens", estimate_prompt_tokens(request_body))
        estimated.pop("total_tokens", None)
        return Usage.counted(estimated, estimated=True)

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
        self.events += _data_events(complete)
        if _USAGE not in complete:
            return complete
        return self._read_usage(complete)

    def _read_usage(self, complete: bytes) -> bytes:
        """Only the events that name `usage` are parsed (usually one, the last before `[DONE]`),
        each found around a mention of it; every other byte passes as it came."""
        kept: list[bytes] = []
        passed = start = 0
        ends = EVENT_ENDS if b"\r" in complete else _LF_ENDS
        at = complete.find(_USAGE)
        while at >= 0:
            start = _after_last_end(complete, start, at, ends)
            end = _end_of_event(complete, at, ends)
            if self._read_event(complete[start:end]):
                kept.append(complete[passed:start])
                passed = end
            start = end
            at = complete.find(_USAGE, end)
        if not kept:
            return complete
        kept.append(complete[passed:])
        return b"".join(kept)

    def _read_event(self, event: bytes) -> bool:
        """Reads the usage the event reports; True when it is the usage-only event that the client
        did not ask for, to be taken out."""
        payload = _data_of(event)
        if payload is None or _USAGE not in payload:
            return False
        try:
            document, _ = json_codec.loads(payload)
        except (ValueError, RecursionError):
            return False
        if not isinstance(document, dict):
            return False
        counts = _counts(_streamed_usage(document), self._names)
        if not counts:
            return False
        self._counts.update(counts)
        self.usage = Usage.counted(self._counts)
        return self._strip and not document.get("choices")


def _data_events(complete: bytes) -> int:
    """Data lines (an event has one or a few), other than the final `[DONE]`. JSON escapes newlines
    in strings, so a line that starts with `data:` is always a field, never text inside one; a line
    may end in CR alone."""
    count = complete.count(b"\ndata:") + complete.count(b"\rdata:") + complete.startswith(b"data:")
    return count - complete.count(b"data: [DONE]")


def estimate_prompt_tokens(request_body: Mapping[str, Any]) -> int:
    """A token per four bytes of what the prompt holds, the usual ratio for English text."""
    prompt = {key: value for key, value in request_body.items() if key in _PROMPT_FIELDS}
    return max(1, len(json.dumps(prompt, ensure_ascii=False).encode()) // 4)


_PROMPT_FIELDS = frozenset({"messages", "prompt", "input", "instructions", "system", "tools"})


def _data_of(event: bytes) -> bytes | None:
    """The payload of an event's `data:` lines; Responses and Messages events name themselves in
    an `event:` line first."""
    line = event.rstrip(b"\r\n")
    if line.startswith(b"data:") and b"\n" not in line and b"\r" not in line:
        return line[5:]  # the usual event: one data line
    lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _streamed_usage(document: dict[str, Any]) -> Any:
    """Chat chunks and Anthropic's `message_delta` carry `usage` at their top; the Responses final
    event and Anthropic's `message_start` carry it in the object they describe."""
    for holder in (document, document.get("response"), document.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            return holder["usage"]
    return None
