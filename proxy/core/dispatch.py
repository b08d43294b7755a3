"""Handing a checked request to its adaptor, and measuring it to the end of the response.

`dispatch` is the story of one request to the endpoint chosen, in order: its prompt kept (when the
operator asks), the endpoint's token limits checked, the backend asked for the stream's usage, the
adaptor called and the request measured to its end (`_task` or `_stream`, which return what it
produced, `Served`, whether it succeeded or not), its tokens charged from what it produced, and then
the answer, or the error. The tokens are charged from the `Served` returned, not read back from the
request; the observe middleware finds that `Served` on the request's exchange.

The adaptor latency runs to the last byte (for a stream, its last chunk), split in phases:
submission (until the adaptor answers or its stream starts), first byte and total.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from adaptors import CLIENT_JSON, BaseEndpoint, SubmitTaskResponse
from proxy.core import contract, json_codec
from proxy.core.exchange import EXCHANGE, Exchange, Served
from proxy.core.identity import AUTH_SECONDS, USER
from proxy.core.limits import NO_LEASE, Lease, Limited, Limiter
from proxy.core.registry import GenerationHolds, TokenLimits
from proxy.core.retry_join import joining_of
from proxy.core.state import STATE, GatewayState
from proxy.core.streaming import write_stream
from proxy.core.usage import Usage, UsageScanner, ask_for_usage, usage_scanner
from proxy.errors import ApiError, adaptor_failed
from proxy.metrics.prometheus import EndpointMeters

STREAMING_PATHS = frozenset({"chat/completions", "completions", "responses", "messages"})
NO_TOKEN_LIMITS = TokenLimits(None, None)


class UserAdmission:
    """The user's request rate and requests in flight, before the body is read: a user over them
    costs no body read or parse. Released at the end of the response (a stream's last chunk).
    A class rather than a generator: it is on every inference request's path, and costs a fifth."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._lease: Lease = NO_LEASE

    async def __aenter__(self) -> None:
        request = self._request
        try:
            self._lease = await request.app[STATE].limiter.admit(request[USER].id)
        except Limited as exc:
            raise _too_many(request, exc) from None

    async def __aexit__(self, *exc_info: object) -> None:
        await self._lease.release()


@dataclass(frozen=True)
class ClientBody:
    """A request's body: its fields, checked, and the bytes they were read from when an adaptor may
    send those on as they came (strict UTF-8 JSON that means exactly `fields`, json_codec.loads)."""

    fields: dict[str, Any]
    json: bytes | None = None


async def dispatch(
    request: web.Request, endpoint: BaseEndpoint, openai_path: str, body: ClientBody
) -> web.StreamResponse:
    """A checked request to the endpoint chosen, whichever route chose it (within `UserAdmission`).
    For a federated request, each attempt is one dispatch."""
    state, exchange = request.app[STATE], request[EXCHANGE]
    fields = body.fields
    if state.recorder.store_prompts:
        exchange.prompt = json.dumps(fields.get("messages", fields.get("prompt", fields.get("input"))))
    model_params = {**fields, "openai_endpoint": openai_path}
    data: dict[str, Any] = {"model_params": model_params}
    streamed = fields.get("stream") is True and openai_path in STREAMING_PATHS
    async with EndpointAdmission(request, endpoint):
        exchange.serving(endpoint, stream=streamed)
        meters = state.metrics.endpoint(exchange.adaptor, *exchange.endpoint_labels)
        meters.authentication.observe(request.get(AUTH_SECONDS, 0.0))
        strip_usage_event = streamed and ask_for_usage(model_params)  # token limits and records need it
        if body.json is not None and not strip_usage_event and endpoint.forwards_client_json:
            data[CLIENT_JSON] = body.json  # unchanged: sent on without being encoded again
        if streamed:
            scanner = usage_scanner(openai_path, strip_usage_event=strip_usage_event)
            served = await _stream(request, state, endpoint, data, scanner, meters)
        else:
            served = await _task(request, state, endpoint, data, meters)
        exchange.served = served  # for the observe middleware: the request's metrics and record
        await charge_tokens(state.limiter, endpoint, request[USER].id, served.usage)
        return served.answer()


class EndpointAdmission:
    """The endpoint's token limits, checked before the adaptor is called (within `UserAdmission`).
    The request also holds the adaptors' generation, so that a reload cannot shut it down now.
    A class rather than a generator, as `UserAdmission`: an async generator costs every request
    the event loop's bookkeeping of generators besides the generator itself."""

    def __init__(self, request: web.Request, endpoint: BaseEndpoint) -> None:
        self._request = request
        self._endpoint = endpoint
        self._generation: GenerationHolds | None = None

    async def __aenter__(self) -> None:
        request, endpoint = self._request, self._endpoint
        state = request.app[STATE]
        registry = state.registry
        if registry.endpoints.get(endpoint.endpoint_slug) is not endpoint:
            raise ApiError(503, "The gateway's endpoints were just reloaded; please retry.", code="reloaded")
        generation = registry.holds
        generation.take()
        try:
            await check_token_limits(state, endpoint, request[USER].id)
        except Limited as exc:
            generation.release()
            raise _too_many(request, exc) from None
        except BaseException:
            generation.release()
            raise
        self._generation = generation

    async def __aexit__(self, *exc_info: object) -> None:
        if self._generation is not None:
            self._generation.release()
            self._generation = None


async def check_token_limits(state: GatewayState, endpoint: BaseEndpoint, user_id: str) -> None:
    """The endpoint's tokens-per-minute windows, for the model and for this user; raises `Limited`."""
    limits = state.registry.token_limits.get(endpoint.endpoint_slug, NO_TOKEN_LIMITS)
    await state.limiter.check_tokens(endpoint.endpoint_slug, user_id, limits.model, limits.user)


async def charge_tokens(limiter: Limiter, endpoint: BaseEndpoint, user_id: str, usage: Usage | None) -> None:
    """The tokens a request used count against the endpoint's windows once its response has ended,
    however it ended (a stream cut short is charged its estimate)."""
    if usage is not None and usage.total_tokens:
        await limiter.record_tokens(endpoint.endpoint_slug, user_id, usage.total_tokens)


def _too_many(request: web.Request, exc: Limited) -> ApiError:
    request.app[STATE].metrics.rate_limited(exc.kind).inc()
    retry_after = str(max(1, math.ceil(exc.retry_after)))
    return ApiError(429, exc.message, code="rate_limit_exceeded", headers={"Retry-After": retry_after})


async def _task(
    request: web.Request,
    state: GatewayState,
    endpoint: BaseEndpoint,
    data: dict[str, Any],
    meters: EndpointMeters,
) -> Served:
    """The whole answer at once; a client's retry may join the work of its earlier attempt."""
    served = Served()
    started = time.monotonic()
    model_params = data["model_params"]
    joining = joining_of(request, request[USER].id, endpoint.endpoint_slug, model_params)
    try:
        task, _ = await state.retry_joins.run(joining, lambda: contract.submit_task(endpoint, data))
        served.task_id = task.task_id
        served.response = _answer(task, served, state.recorder.store_prompts, model_params["openai_endpoint"])
        served.outcome = "ok"
    except (Exception, asyncio.CancelledError) as exc:
        served.failure, served.outcome = exc, _failed(request, exc)
    _measured(meters, served, started, first_byte=None)
    return served


async def _stream(
    request: web.Request,
    state: GatewayState,
    endpoint: BaseEndpoint,
    data: dict[str, Any],
    scanner: UsageScanner,
    meters: EndpointMeters,
) -> Served:
    """Relayed chunk by chunk as the backend sends it, its usage read on the way."""
    served = Served()
    started = time.monotonic()
    streams_in_flight = state.metrics.streams_in_flight
    streams_in_flight.inc()
    try:
        opened = await contract.submit_streaming_task(endpoint, data, request[EXCHANGE].request_id)
        served.task_id = opened.task_id
        meters.phase("submission").observe(time.monotonic() - started)
        if opened.error_code is not None or opened.response is None:
            adaptor_failed(
                opened.error_code,
                opened.error_message or "The backend sent no stream.",
                opened.retryable,
                opened.retry_after,
                opened.error_detail,
            )
        stream = cast(AsyncIterator[bytes], opened.response)  # contract turned any stream into bytes
        ended = await write_stream(
            request,
            scanner.scan(stream),
            on_first_chunk=lambda: _first(served),
            keepalive_seconds=opened.keepalive_seconds,
        )
        served.response = ended.response
        if ended.error is not None:
            served.error = ended.error.detail or ended.error.message
        served.client_closed = not ended.completed
        error_status = None if ended.error is None else ended.error.status
        served.outcome = "client_gone" if served.client_closed else _outcome(error_status)
    except (Exception, asyncio.CancelledError) as exc:
        served.failure, served.outcome = exc, _failed(request, exc)
    finally:
        streams_in_flight.dec()
    served.usage = scanner.final_usage(data["model_params"])
    first = None if served.first_chunk is None else served.first_chunk - started
    _measured(meters, served, started, first_byte=first)
    return served


def _answer(task: SubmitTaskResponse, served: Served, store_result: bool, openai_path: str) -> web.Response:
    """Every adaptor's result is checked here, once: it must be JSON, and its usage is read from it."""
    if task.error_code is not None or task.result is None:
        adaptor_failed(
            task.error_code,
            task.error_message or "The backend sent no result.",
            task.retryable,
            task.retry_after,
            task.error_detail,
        )
    try:
        document, _ = json_codec.loads(task.result)
    except (ValueError, RecursionError):
        message = "The backend answered with invalid JSON."
        raise ApiError(502, message, code="backend_error", retryable=False) from None
    served.usage = Usage.of(document, openai_path)
    if store_result:
        served.result = task.result
    return web.Response(body=task.result.encode(), content_type="application/json")


def _first(served: Served) -> None:
    served.first_chunk = time.monotonic()


def _outcome(code: int | None) -> str:
    if code is None:
        return "ok"
    return "client_error" if code < 500 else "backend_error"


def _failed(request: web.Request, exc: BaseException) -> str:
    """An error's status says whose fault it was. aiohttp cancels the handler of a client that went
    away (its connection is gone); any other end counts as the gateway giving up on the request."""
    if isinstance(exc, ApiError):
        return _outcome(exc.status)
    if isinstance(exc, asyncio.CancelledError) and request.transport is None:
        return "client_gone"
    return "cancelled"


def _measured(meters: EndpointMeters, served: Served, started: float, first_byte: float | None) -> None:
    """Called once the response has ended, whatever the way it ended."""
    total = time.monotonic() - started
    meters.outcome(served.outcome).observe(total)
    meters.total.observe(total)
    if first_byte is not None:
        meters.phase("first_byte").observe(first_byte)
        meters.first_chunk().observe(first_byte)
    usage = served.usage
    if usage is not None:
        if usage.prompt_tokens:
            meters.tokens("prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            meters.tokens("completion").inc(usage.completion_tokens)


async def run_line(
    state: GatewayState, endpoint: BaseEndpoint, openai_path: str, body: dict[str, Any], exchange: Exchange
) -> Served:
    """A batch line (proxy/core/batch_runner.py): for a user with no HTTP request, the same steps
    as `dispatch` (the endpoint's token limits, the adaptor, usage, metrics, the tokens charged),
    never streamed. Limits raise `Limited` for the runner to wait on; the caller makes its record."""
    assert exchange.user is not None
    model_params = {**body, "openai_endpoint": openai_path}
    model_params.pop("stream", None)
    registry = state.registry
    generation = registry.holds
    generation.take()
    try:
        await check_token_limits(state, endpoint, exchange.user.id)
        exchange.serving(endpoint, stream=False)
        meters = state.metrics.endpoint(exchange.adaptor, *exchange.endpoint_labels)
        served = Served()
        started = time.monotonic()
        try:
            task = await contract.submit_task(endpoint, {"model_params": model_params})
            served.task_id = task.task_id
            served.response = _answer(task, served, state.recorder.store_prompts, openai_path)
            served.outcome = "ok"
        except ApiError as exc:
            served.failure, served.outcome = exc, _outcome(exc.status)
        _measured(meters, served, started, first_byte=None)
        await charge_tokens(state.limiter, endpoint, exchange.user.id, served.usage)
        return served
    finally:
        generation.release()
