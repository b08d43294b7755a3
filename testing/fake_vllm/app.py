"""The fake vLLM's routes and the state they share (see the package's docstring for what it serves)."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from testing.fake_vllm.bodies import (
    EMBEDDING_BASE64,
    EMBEDDING_FLOATS,
    GARBAGE_BODY,
    GARBAGE_STREAM,
    JSON_HEADERS,
    REPLY,
    SSE_HEADERS,
    anthropic_error_response,
    choices_json,
    error_body,
    error_response,
    message_object,
    output_message,
    prompt_tokens,
    reply,
    response_object,
    responses_usage,
    usage_json,
)
from testing.fake_vllm.directives import NO_FAULTS, Faults, parse_faults
from testing.fake_vllm.streams import (
    Died,
    Generation,
    IdMaker,
    abort,
    write_completion_events,
    write_message_events,
    write_response_events,
)

RecordedRequest = dict[str, Any]

REQUESTS: Final = web.AppKey[deque[RecordedRequest]]("requests")
DISCONNECTS: Final = web.AppKey[int]("disconnects")
ACTIVE_STREAMS: Final = web.AppKey[int]("active_streams")

_MAX_CHOICES: Final = 128
_MAX_SEEN_MODELS: Final = 1000

_EventWriter = Callable[[web.Request, web.StreamResponse, Generation, IdMaker], Awaitable[None]]
_ErrorResponse = Callable[[int, str], web.Response]


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


def _add(app: web.Application, key: web.AppKey[int], delta: int) -> None:
    """Change a live counter; aiohttp deprecates changing a running app's state in general."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app[key] += delta


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
        error = json.dumps(error_body(400, message))
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
        generation = Generation(
            chat=chat,
            model_json=json.dumps(body.get("model")),
            n=_bounded_int(body.get("n"), 1, _MAX_CHOICES) or 1,
            max_tokens=_bounded_int(max_tokens, len(REPLY), len(REPLY)),
            prompt_tokens=prompt_tokens(chars),
            faults=parse_faults(text),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )
        if body.get("stream") is True:
            return await self._stream(request, generation, write_completion_events)
        faults = generation.faults
        if faults is not NO_FAULTS:
            early = await self._apply_faults(request, faults)
            if early is not None:
                return early
        choices, completion_tokens = choices_json(chat, generation.n, generation.max_tokens)
        prefix, kind = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
        answer = (
            f'{{"id":"{self._next_id(prefix)}","object":"{kind}","created":{int(time.time())},'
            f'"model":{generation.model_json},"choices":{choices},'
            f'"usage":{usage_json(generation.prompt_tokens, completion_tokens)}}}'
        )
        return web.Response(body=answer.encode(), headers=JSON_HEADERS)

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
            abort(request)
            return web.Response()
        if faults.garbage:
            return web.Response(body=GARBAGE_BODY, headers=JSON_HEADERS)
        return None

    async def _stream(
        self,
        request: web.Request,
        generation: Generation,
        write_events: _EventWriter,
        error: _ErrorResponse = error_response,
    ) -> web.StreamResponse:
        """Send server-sent events, each written on its own so that it leaves at once."""
        faults = generation.faults
        response = web.StreamResponse(headers=SSE_HEADERS)
        _add(self._app, ACTIVE_STREAMS, 1)
        try:
            if faults.delay:
                await asyncio.sleep(faults.delay)
            if faults.status is not None:
                return error(faults.status, f"fake backend error {faults.status}")
            await response.prepare(request)
            if faults.garbage:
                for event in GARBAGE_STREAM:
                    await response.write(event)
            else:
                await write_events(request, response, generation, self._next_id)
            return response
        except Died:
            return response
        except ConnectionResetError:
            _add(self._app, DISCONNECTS, 1)
            return response
        except asyncio.CancelledError:
            _add(self._app, DISCONNECTS, 1)
            raise
        finally:
            _add(self._app, ACTIVE_STREAMS, -1)

    def _generation(self, body: dict[str, Any], max_tokens: Any, text: str, chars: int) -> Generation:
        """One reply of the Responses and Messages APIs, which have no `n` and always report usage."""
        return Generation(
            chat=True,
            model_json=json.dumps(body.get("model")),
            n=1,
            max_tokens=_bounded_int(max_tokens, len(REPLY), len(REPLY)),
            prompt_tokens=prompt_tokens(chars),
            faults=parse_faults(text),
            include_usage=False,
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        given = body.get("input")
        text, chars = (given, len(given)) if isinstance(given, str) else _chat_prompt(given)
        generation = self._generation(body, body.get("max_output_tokens"), text, chars)
        if body.get("stream") is True:
            return await self._stream(request, generation, write_response_events)
        early = await self._apply_faults(request, generation.faults)
        if early is not None:
            return early
        text, tokens = reply(generation.max_tokens)
        status = "completed" if tokens == len(REPLY) else "incomplete"
        output = [output_message(self._next_id("msg_"), text)]
        usage = responses_usage(generation.prompt_tokens, tokens)
        model = json.loads(generation.model_json)
        return web.json_response(response_object(self._next_id("resp_"), model, status, output, usage))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        text, chars = _chat_prompt(body.get("messages"))
        generation = self._generation(body, body.get("max_tokens"), text, chars)
        if body.get("stream") is True:
            return await self._stream(request, generation, write_message_events, anthropic_error_response)
        early = await self._apply_faults(request, generation.faults, anthropic_error_response)
        if early is not None:
            return early
        text, tokens = reply(generation.max_tokens)
        stop_reason = "end_turn" if tokens == len(REPLY) else "max_tokens"
        usage = {"input_tokens": generation.prompt_tokens, "output_tokens": tokens}
        model = json.loads(generation.model_json)
        return web.json_response(message_object(self._next_id("msg_"), model, text, stop_reason, usage))

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
        vector = EMBEDDING_BASE64 if body.get("encoding_format") == "base64" else EMBEDDING_FLOATS
        data = ",".join(
            f'{{"object":"embedding","index":{index},"embedding":{vector}}}' for index in range(len(inputs))
        )
        tokens = prompt_tokens(chars)
        answer = (
            f'{{"id":"{self._next_id("embd-")}","object":"list","created":{int(time.time())},'
            f'"model":{json.dumps(body.get("model"))},"data":[{data}],'
            f'"usage":{{"prompt_tokens":{tokens},"completion_tokens":0,"total_tokens":{tokens}}}}}'
        )
        return web.Response(body=answer.encode(), headers=JSON_HEADERS)

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
