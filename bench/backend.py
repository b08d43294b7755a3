"""A fake OpenAI-compatible inference backend (like vLLM) for tests, `make run` and benchmarks.

It answers at once with realistic response shapes, so that a benchmark measures the gateway and
not the backend. Like vLLM, it also serves OpenAI's Responses API and Anthropic's Messages API,
streams included, with their named events. Faults are injected through directives in the prompt
text (the last chat, Anthropic or Responses input message, a string `prompt`, or a string
embeddings or Responses `input`):

    [[status=N]]        answer status N with a vLLM-style error body
    [[delay=S]]         wait S seconds before sending the headers
    [[chunks=N]]        number of content chunks in a stream (default 5, or fewer if max_tokens)
    [[chunk_delay=S]]   seconds between two stream chunks (default 0)
    [[die_after=N]]     abort the connection after N content chunks (at once when not streaming)
    [[garbage]]         answer 200 with a body that is neither JSON nor server-sent events

Tests that run the app in-process can read, through these application keys:

    app[REQUESTS]        the last 1,000 POST requests, as {"path", "headers", "body", "raw"}
    app[DISCONNECTS]     how many streams lost their client before they ended
    app[ACTIVE_STREAMS]  how many streams are in progress

Run it with `python -m bench.backend --host 127.0.0.1 --port 8001 [--cluster local]
[--model NAME ...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import itertools
import json
import re
import secrets
import struct
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

RecordedRequest = dict[str, Any]

REQUESTS: Final = web.AppKey[deque[RecordedRequest]]("requests")
DISCONNECTS: Final = web.AppKey[int]("disconnects")
ACTIVE_STREAMS: Final = web.AppKey[int]("active_streams")

_REPLY: Final = ("Hello", "!", " This", " is", " a", " reply", " from", " the", " fake", " backend.")
_STREAM_CHUNKS: Final = 5
_MAX_CHOICES: Final = 128
_MAX_SEEN_MODELS: Final = 1000
_EMBEDDING: Final = (0.125, -0.25, 0.375, -0.5, 0.0625, 0.5, -0.125, 0.25)
_EMBEDDING_FLOATS: Final = json.dumps(_EMBEDDING)
_EMBEDDING_BASE64: Final = json.dumps(
    base64.b64encode(struct.pack(f"<{len(_EMBEDDING)}f", *_EMBEDDING)).decode()
)
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE: Final = b"data: [DONE]\n\n"
_GARBAGE_BODY: Final = b"<html><body>this is not JSON</body></html>"
_GARBAGE_STREAM: Final = (b"this is not server-sent events\n\n", b'data: {"choices": [\n\n', _DONE)
_DIRECTIVE: Final = re.compile(r"\[\[(\w+)(?:=([0-9.]+))?\]\]")
_INT_DIRECTIVES: Final = frozenset({"status", "chunks", "die_after"})
_FLOAT_DIRECTIVES: Final = frozenset({"delay", "chunk_delay"})


@dataclass(frozen=True, slots=True)
class Faults:
    """The directives found in one prompt."""

    status: int | None = None
    delay: float = 0.0
    chunks: int | None = None
    chunk_delay: float = 0.0
    die_after: int | None = None
    garbage: bool = False


NO_FAULTS: Final = Faults()


def parse_faults(text: str) -> Faults:
    """Read the directives of a prompt; the `[[` test keeps ordinary prompts off the regex."""
    if "[[" not in text:
        return NO_FAULTS
    values: dict[str, Any] = {}
    for name, value in _DIRECTIVE.findall(text):
        try:
            if name == "garbage":
                values[name] = True
            elif name in _INT_DIRECTIVES:
                values[name] = int(value)
            elif name in _FLOAT_DIRECTIVES:
                values[name] = float(value)
        except ValueError:
            continue
    return Faults(**values) if values else NO_FAULTS


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


def error_response(status: int, message: str) -> web.Response:
    """An error in vLLM's format, which the gateway must pass on or translate."""
    return web.json_response(_error_body(status, message), status=status)


def anthropic_error_response(status: int, message: str) -> web.Response:
    """vLLM answers its Messages route's errors in Anthropic's format."""
    kind = "api_error" if status >= 500 else "invalid_request_error"
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status)


def _bounded_int(value: Any, default: int, upper: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, upper)
    return default


def _chat_prompt(messages: Any) -> tuple[str, int]:
    """The text that may hold directives (the last message with text) and the prompt's length."""
    if not isinstance(messages, list):
        return "", 0
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.append(
                " ".join(
                    part["text"]
                    for part in content
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
            )
    return (texts[-1] if texts else ""), sum(map(len, texts))


def _prompt_tokens(chars: int) -> int:
    return chars // 4 + 1


@functools.lru_cache(maxsize=256)
def _choices_json(chat: bool, n: int, max_tokens: int) -> tuple[str, int]:
    """The serialized choices of a non-streaming answer, and the completion tokens they count."""
    tokens = min(max_tokens, len(_REPLY))
    text = "".join(_REPLY[:tokens])
    finish = "stop" if tokens == len(_REPLY) else "length"
    output: dict[str, Any] = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    choices = [{"index": index, **output, "logprobs": None, "finish_reason": finish} for index in range(n)]
    return json.dumps(choices, separators=(",", ":")), tokens * n


@functools.lru_cache(maxsize=4096)
def _chunk_choice(chat: bool, index: int, position: int, finish: str | None) -> bytes:
    """One choice of a stream chunk: a token at `position`, or the end when `finish` is set."""
    if finish is not None:
        output: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
    else:
        token = _REPLY[position % len(_REPLY)]
        delta = {"role": "assistant", "content": token} if position == 0 else {"content": token}
        output = {"delta": delta} if chat else {"text": token}
    choice = {"index": index, **output, "logprobs": None, "finish_reason": finish}
    return json.dumps(choice, separators=(",", ":")).encode()


def _usage(prompt: int, completion: int) -> str:
    return (
        f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{prompt + completion}}}'
    )


def _stream_length(faults: Faults, max_tokens: int) -> tuple[int, bool]:
    """How many content chunks a stream sends, and whether they end it early (at max_tokens)."""
    if faults.chunks is not None:
        return faults.chunks, False
    chunks = min(max_tokens, _STREAM_CHUNKS)
    return chunks, chunks < _STREAM_CHUNKS


class _Died(Exception):
    """The stream cut its connection on purpose (`[[die_after=N]]`)."""


async def _paced(request: web.Request, faults: Faults, chunks: int) -> AsyncIterator[int]:
    """The positions of a stream's content chunks, `chunk_delay` apart. With `die_after` the
    connection is cut after that many, or after the last one, and `_Died` ends the writer."""
    for position in range(chunks):
        if faults.die_after is not None and position >= faults.die_after:
            break
        if position and faults.chunk_delay:
            await asyncio.sleep(faults.chunk_delay)
        yield position
    if faults.die_after is not None:
        _abort(request)
        raise _Died


def _named_event(kind: str, payload: dict[str, Any]) -> bytes:
    """The framing of the Responses and Messages streams: each event names its type."""
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _reply(max_tokens: int) -> tuple[str, int]:
    """A non-streaming answer's text and its completion tokens."""
    tokens = min(max_tokens, len(_REPLY))
    return "".join(_REPLY[:tokens]), tokens


def _response_object(
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


def _output_message(item_id: str, text: str | None) -> dict[str, Any]:
    """The Responses output item of the reply; `None` while it is still being generated."""
    if text is None:
        return {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}


def _responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _message_object(
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


def _add(app: web.Application, key: web.AppKey[int], delta: int) -> None:
    """Change a live counter; aiohttp deprecates changing a running app's state in general."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app[key] += delta


@dataclass(frozen=True, slots=True)
class _Generation:
    """What one completion request asks for, read once from its body."""

    chat: bool
    model_json: str
    n: int
    max_tokens: int
    prompt_tokens: int
    faults: Faults
    include_usage: bool


_EventWriter = Callable[[web.Request, web.StreamResponse, _Generation], Awaitable[None]]
_ErrorResponse = Callable[[int, str], web.Response]


class _Backend:
    """The route handlers and the state they share."""

    def __init__(self, app: web.Application, cluster: str, models: list[str]) -> None:
        self._app = app
        self._cluster = cluster
        self._models = models
        self._seen: dict[str, None] = {}
        self._requests = app[REQUESTS]
        self._ids = itertools.count()
        self._id_prefix = secrets.token_hex(4)
        self._started = int(time.time())

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            raise self._bad_request("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise self._bad_request("the request body must be a JSON object")
        self._requests.append(
            {"path": request.path, "headers": dict(request.headers), "body": body, "raw": raw}
        )
        model = body.get("model")
        if isinstance(model, str) and len(self._seen) < _MAX_SEEN_MODELS:
            self._seen.setdefault(model)
        return body

    @staticmethod
    def _bad_request(message: str) -> web.HTTPBadRequest:
        error = json.dumps(_error_body(400, message))
        return web.HTTPBadRequest(text=error, content_type="application/json")

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):x}"

    def _model_names(self) -> list[str]:
        return self._models or list(self._seen)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        text, chars = _chat_prompt(body.get("messages"))
        return await self._generate(request, body, True, text, chars)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else ""
        return await self._generate(request, body, False, text, len(text))

    async def _generate(
        self, request: web.Request, body: dict[str, Any], chat: bool, text: str, chars: int
    ) -> web.StreamResponse:
        options = body.get("stream_options")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        generation = _Generation(
            chat=chat,
            model_json=json.dumps(body.get("model")),
            n=_bounded_int(body.get("n"), 1, _MAX_CHOICES) or 1,
            max_tokens=_bounded_int(max_tokens, len(_REPLY), len(_REPLY)),
            prompt_tokens=_prompt_tokens(chars),
            faults=parse_faults(text),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )
        if body.get("stream") is True:
            return await self._stream(request, generation, self._write_events)
        faults = generation.faults
        if faults is not NO_FAULTS:
            early = await self._apply_faults(request, faults)
            if early is not None:
                return early
        choices, completion_tokens = _choices_json(chat, generation.n, generation.max_tokens)
        prefix, kind = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
        answer = (
            f'{{"id":"{self._next_id(prefix)}","object":"{kind}","created":{int(time.time())},'
            f'"model":{generation.model_json},"choices":{choices},'
            f'"usage":{_usage(generation.prompt_tokens, completion_tokens)}}}'
        )
        return web.Response(body=answer.encode(), headers=_JSON_HEADERS)

    @staticmethod
    async def _apply_faults(
        request: web.Request, faults: Faults, error: _ErrorResponse = error_response
    ) -> web.StreamResponse | None:
        """The answer that replaces a normal non-streaming one, if the directives ask for it."""
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.status is not None:
            return error(faults.status, f"fake backend error {faults.status}")
        if faults.die_after is not None:
            _abort(request)
            return web.Response()
        if faults.garbage:
            return web.Response(body=_GARBAGE_BODY, headers=_JSON_HEADERS)
        return None

    async def _stream(
        self,
        request: web.Request,
        generation: _Generation,
        write_events: _EventWriter,
        error: _ErrorResponse = error_response,
    ) -> web.StreamResponse:
        """Send server-sent events, each written on its own so that it leaves at once."""
        faults = generation.faults
        response = web.StreamResponse(headers=_SSE_HEADERS)
        _add(self._app, ACTIVE_STREAMS, 1)
        try:
            if faults.delay:
                await asyncio.sleep(faults.delay)
            if faults.status is not None:
                return error(faults.status, f"fake backend error {faults.status}")
            await response.prepare(request)
            if faults.garbage:
                for event in _GARBAGE_STREAM:
                    await response.write(event)
            else:
                await write_events(request, response, generation)
            return response
        except _Died:
            return response
        except ConnectionResetError:
            _add(self._app, DISCONNECTS, 1)
            return response
        except asyncio.CancelledError:
            _add(self._app, DISCONNECTS, 1)
            raise
        finally:
            _add(self._app, ACTIVE_STREAMS, -1)

    async def _write_events(
        self, request: web.Request, response: web.StreamResponse, generation: _Generation
    ) -> None:
        faults = generation.faults
        chat = generation.chat
        prefix, kind = ("chatcmpl-", "chat.completion.chunk") if chat else ("cmpl-", "text_completion")
        head = (
            f'data: {{"id":"{self._next_id(prefix)}","object":"{kind}",'
            f'"created":{int(time.time())},"model":{generation.model_json},"choices":['
        ).encode()
        chunks, cut_short = _stream_length(faults, generation.max_tokens)
        choices = range(generation.n)
        async for position in _paced(request, faults, chunks):
            for index in choices:
                await response.write(head + _chunk_choice(chat, index, position, None) + b"]}\n\n")
        finish = "length" if cut_short else "stop"
        for index in choices:
            await response.write(head + _chunk_choice(chat, index, chunks, finish) + b"]}\n\n")
        if generation.include_usage:
            usage = _usage(generation.prompt_tokens, chunks * generation.n)
            await response.write(head + f'],"usage":{usage}}}\n\n'.encode())
        await response.write(_DONE)
        await response.write_eof()

    def _generation(self, body: dict[str, Any], max_tokens: Any, text: str, chars: int) -> _Generation:
        """One reply of the Responses and Messages APIs, which have no `n` and always report usage."""
        return _Generation(
            chat=True,
            model_json=json.dumps(body.get("model")),
            n=1,
            max_tokens=_bounded_int(max_tokens, len(_REPLY), len(_REPLY)),
            prompt_tokens=_prompt_tokens(chars),
            faults=parse_faults(text),
            include_usage=False,
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        given = body.get("input")
        text, chars = (given, len(given)) if isinstance(given, str) else _chat_prompt(given)
        generation = self._generation(body, body.get("max_output_tokens"), text, chars)
        if body.get("stream") is True:
            return await self._stream(request, generation, self._write_response_events)
        early = await self._apply_faults(request, generation.faults)
        if early is not None:
            return early
        reply, tokens = _reply(generation.max_tokens)
        status = "completed" if tokens == len(_REPLY) else "incomplete"
        output = [_output_message(self._next_id("msg_"), reply)]
        usage = _responses_usage(generation.prompt_tokens, tokens)
        answer = _response_object(
            self._next_id("resp_"), json.loads(generation.model_json), status, output, usage
        )
        return web.json_response(answer)

    async def _write_response_events(
        self, request: web.Request, response: web.StreamResponse, generation: _Generation
    ) -> None:
        """The events OpenAI's Responses API streams for a text reply, in its order."""
        sequence = itertools.count()

        async def send(kind: str, **fields: Any) -> None:
            payload = {"type": kind, "sequence_number": next(sequence), **fields}
            await response.write(_named_event(kind, payload))

        response_id, item_id = self._next_id("resp_"), self._next_id("msg_")
        model = json.loads(generation.model_json)
        started = _response_object(response_id, model, "in_progress", [], None)
        await send("response.created", response=started)
        await send("response.in_progress", response=started)
        await send("response.output_item.added", output_index=0, item=_output_message(item_id, None))
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        await send("response.content_part.added", **where, part=part)
        chunks, cut_short = _stream_length(generation.faults, generation.max_tokens)
        tokens = []
        async for position in _paced(request, generation.faults, chunks):
            tokens.append(_REPLY[position % len(_REPLY)])
            await send("response.output_text.delta", **where, delta=tokens[-1], logprobs=[])
        item = _output_message(item_id, "".join(tokens))
        await send("response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[])
        await send("response.content_part.done", **where, part=item["content"][0])
        await send("response.output_item.done", output_index=0, item=item)
        status = "incomplete" if cut_short else "completed"
        usage = _responses_usage(generation.prompt_tokens, chunks)
        await send(f"response.{status}", response=_response_object(response_id, model, status, [item], usage))
        await response.write_eof()

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        text, chars = _chat_prompt(body.get("messages"))
        generation = self._generation(body, body.get("max_tokens"), text, chars)
        if body.get("stream") is True:
            return await self._stream(
                request, generation, self._write_message_events, anthropic_error_response
            )
        early = await self._apply_faults(request, generation.faults, anthropic_error_response)
        if early is not None:
            return early
        reply, tokens = _reply(generation.max_tokens)
        stop_reason = "end_turn" if tokens == len(_REPLY) else "max_tokens"
        usage = {"input_tokens": generation.prompt_tokens, "output_tokens": tokens}
        model = json.loads(generation.model_json)
        return web.json_response(_message_object(self._next_id("msg_"), model, reply, stop_reason, usage))

    async def _write_message_events(
        self, request: web.Request, response: web.StreamResponse, generation: _Generation
    ) -> None:
        """The events Anthropic's Messages API streams for a text reply: input tokens come with
        `message_start`, the output count with `message_delta`."""

        async def send(kind: str, **fields: Any) -> None:
            await response.write(_named_event(kind, {"type": kind, **fields}))

        model = json.loads(generation.model_json)
        usage = {"input_tokens": generation.prompt_tokens, "output_tokens": 1}
        await send("message_start", message=_message_object(self._next_id("msg_"), model, None, None, usage))
        await send("content_block_start", index=0, content_block={"type": "text", "text": ""})
        await send("ping")
        chunks, cut_short = _stream_length(generation.faults, generation.max_tokens)
        async for position in _paced(request, generation.faults, chunks):
            delta = {"type": "text_delta", "text": _REPLY[position % len(_REPLY)]}
            await send("content_block_delta", index=0, delta=delta)
        await send("content_block_stop", index=0)
        stop = {"stop_reason": "max_tokens" if cut_short else "end_turn", "stop_sequence": None}
        await send("message_delta", delta=stop, usage={"output_tokens": chunks})
        await send("message_stop")
        await response.write_eof()

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        value = body.get("input")
        faults = parse_faults(value) if isinstance(value, str) else NO_FAULTS
        if faults is not NO_FAULTS:
            early = await self._apply_faults(request, faults)
            if early is not None:
                return early
        inputs = value if isinstance(value, list) and value and not _is_token(value[0]) else [value]
        chars = sum(len(item) if isinstance(item, str | list) else 1 for item in inputs)
        vector = _EMBEDDING_BASE64 if body.get("encoding_format") == "base64" else _EMBEDDING_FLOATS
        data = ",".join(
            f'{{"object":"embedding","index":{index},"embedding":{vector}}}' for index in range(len(inputs))
        )
        tokens = _prompt_tokens(chars)
        answer = (
            f'{{"id":"{self._next_id("embd-")}","object":"list","created":{int(time.time())},'
            f'"model":{json.dumps(body.get("model"))},"data":[{data}],'
            f'"usage":{{"prompt_tokens":{tokens},"completion_tokens":0,"total_tokens":{tokens}}}}}'
        )
        return web.Response(body=answer.encode(), headers=_JSON_HEADERS)

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self._started,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
            }
            for name in self._model_names()
        ]
        return web.json_response({"object": "list", "data": data})

    async def jobs(self, request: web.Request) -> web.Response:
        names = self._model_names()
        running = [
            {"Models": name, "Framework": "vllm", "Cluster": self._cluster, "Model Status": "running"}
            for name in names
        ]
        status = {
            "cluster": self._cluster,
            "total_models": len(names),
            "live_models": len(names),
            "stopped_models": 0,
        }
        empty: list[Any] = []
        return web.json_response(
            {
                "running": running,
                "queued": empty,
                "stopped": empty,
                "others": empty,
                "private_batch_running": empty,
                "private_batch_queued": empty,
                "cluster_status": status,
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()


def _is_token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def create_backend_app(*, cluster: str = "local", models: list[str] | None = None) -> web.Application:
    """Build the fake backend; without `models` it lists the model names it has been asked for."""
    app = web.Application()
    app[REQUESTS] = deque(maxlen=1000)
    app[DISCONNECTS] = 0
    app[ACTIVE_STREAMS] = 0
    backend = _Backend(app, cluster, list(models or []))
    app.router.add_post("/v1/chat/completions", backend.chat_completions)
    app.router.add_post("/v1/completions", backend.completions)
    app.router.add_post("/v1/embeddings", backend.embeddings)
    app.router.add_post("/v1/responses", backend.responses)
    app.router.add_post("/v1/messages", backend.messages)
    app.router.add_get("/v1/models", backend.models)
    app.router.add_get("/health", backend.health)
    app.router.add_get("/jobs", backend.jobs)
    return app


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, since the backend must never be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--cluster", default="local", help="cluster name reported by /jobs")
    parser.add_argument("--model", action="append", default=[], help="a model to list (repeatable)")
    args = parser.parse_args(argv)
    web.run_app(
        create_backend_app(cluster=args.cluster, models=args.model),
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        backlog=4096,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
