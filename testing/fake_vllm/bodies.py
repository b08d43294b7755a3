"""What the fake vLLM answers, shaped as vLLM answers it: the bodies and stream chunks of the OpenAI,
Responses and Anthropic Messages APIs, the usage each reports, and vLLM's errors. Serialized pieces
are cached, since the fake must never be the bottleneck of a benchmark."""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
from typing import Any, Final

from aiohttp import web

from testing.fake_vllm.directives import Faults

REPLY: Final = ("Hello", "!", " This", " is", " a", " reply", " from", " the", " fake", " backend.")
_STREAM_CHUNKS: Final = 5
_EMBEDDING: Final = (0.125, -0.25, 0.375, -0.5, 0.0625, 0.5, -0.125, 0.25)
EMBEDDING_FLOATS: Final = json.dumps(_EMBEDDING)
EMBEDDING_BASE64: Final = json.dumps(
    base64.b64encode(struct.pack(f"<{len(_EMBEDDING)}f", *_EMBEDDING)).decode()
)
JSON_HEADERS: Final = {"Content-Type": "application/json"}
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE: Final = b"data: [DONE]\n\n"
GARBAGE_BODY: Final = b"<html><body>this is not JSON</body></html>"
GARBAGE_STREAM: Final = (b"this is not server-sent events\n\n", b'data: {"choices": [\n\n', DONE)


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


def error_response(status: int, message: str) -> web.Response:
    """An error in vLLM's format, which the gateway must pass on or translate."""
    return web.json_response(error_body(status, message), status=status)


def anthropic_error_response(status: int, message: str) -> web.Response:
    """vLLM answers its Messages route's errors in Anthropic's format."""
    kind = "api_error" if status >= 500 else "invalid_request_error"
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status)


def prompt_tokens(chars: int) -> int:
    return chars // 4 + 1


@functools.lru_cache(maxsize=256)
def choices_json(chat: bool, n: int, max_tokens: int) -> tuple[str, int]:
    """The serialized choices of a non-streaming answer, and the completion tokens they count."""
    tokens = min(max_tokens, len(REPLY))
    text = "".join(REPLY[:tokens])
    finish = "stop" if tokens == len(REPLY) else "length"
    output: dict[str, Any] = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    choices = [{"index": index, **output, "logprobs": None, "finish_reason": finish} for index in range(n)]
    return json.dumps(choices, separators=(",", ":")), tokens * n


@functools.lru_cache(maxsize=4096)
def chunk_choice(chat: bool, index: int, position: int, finish: str | None) -> bytes:
    """One choice of a stream chunk: a token at `position`, or the end when `finish` is set."""
    if finish is not None:
        output: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
    else:
        token = REPLY[position % len(REPLY)]
        delta = {"role": "assistant", "content": token} if position == 0 else {"content": token}
        output = {"delta": delta} if chat else {"text": token}
    choice = {"index": index, **output, "logprobs": None, "finish_reason": finish}
    return json.dumps(choice, separators=(",", ":")).encode()


def usage_json(prompt: int, completion: int) -> str:
    return (
        f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{prompt + completion}}}'
    )


def stream_length(faults: Faults, max_tokens: int) -> tuple[int, bool]:
    """How many content chunks a stream sends, and whether they end it early (at max_tokens)."""
    if faults.chunks is not None:
        return faults.chunks, False
    chunks = min(max_tokens, _STREAM_CHUNKS)
    return chunks, chunks < _STREAM_CHUNKS


def named_event(kind: str, payload: dict[str, Any]) -> bytes:
    """The framing of the Responses and Messages streams: each event names its type."""
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def reply(max_tokens: int) -> tuple[str, int]:
    """A non-streaming answer's text and its completion tokens."""
    tokens = min(max_tokens, len(REPLY))
    return "".join(REPLY[:tokens]), tokens


def response_object(
    response_id: str, model: Any, status: str, output: list[Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """A Responses API `response`, in the shape OpenAI's SDK reads."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None,
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
    }


def output_message(item_id: str, text: str | None) -> dict[str, Any]:
    """The Responses output item of the reply; `None` while it is still being generated."""
    if text is None:
        return {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}


def responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def message_object(
    message_id: str, model: Any, text: str | None, stop_reason: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    """An Anthropic Messages `message`; `text` is None in `message_start`, before any content."""
    content = [] if text is None else [{"type": "text", "text": text}]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }
