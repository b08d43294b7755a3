"""Handing a checked request to its adaptor, and measuring it to the end of the response.

The adaptor latency runs to the last byte (for a stream, its last chunk), split in phases:
submission (until the adaptor answers or its stream starts), first byte and total.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web

from adaptors import BaseEndpoint, SubmitTaskResponse
from proxy.core import contract
from proxy.core.exchange import INFO, RequestInfo
from proxy.core.identity import AUTH_SECONDS, USER
from proxy.core.limits import NO_LEASE, Lease, Limited, Limiter
from proxy.core.recorder import REQUEST_LOG, RequestLog
from proxy.core.registry import REGISTRY, TokenLimits
from proxy.core.retry_join import RETRY_JOINS, joining_of
from proxy.core.streaming import relay
from proxy.core.usage import Usage, scanner_for
from proxy.errors import ApiError, adaptor_failed
from proxy.metrics.prometheus import METRICS, EndpointMeters

LIMITER = web.AppKey("limiter", Limiter)


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
            self._lease = await request.app[LIMITER].admit(request[USER].id)
        except Limited as exc:
            raise _too_many(request, exc) from None

    async def __aexit__(self, *exc_info: object) -> None:
        await self._lease.release()


@contextlib.asynccontextmanager
async def admitted(request: web.Request, endpoint: BaseEndpoint) -> AsyncIterator[None]:
    """The endpoint's token limits around one request (within `UserAdmission`): checked before the
    adaptor, with the tokens it used counted against its windows at the end of the response.
    The request also holds the adaptors' generation, so that a reload cannot shut it down now."""
    registry = request.app[REGISTRY]
    if registry.endpoints.get(endpoint.endpoint_slug) is not endpoint:
        raise ApiError(503, "The gateway's endpoints were just reloaded; please retry.", code="reloaded")
    generation = registry.leases
    generation.take()
    try:
        limits = registry.token_limits.get(endpoint.endpoint_slug, TokenLimits(None, None))
        async with _rate_limited(request, endpoint.endpoint_slug, limits):
            yield
    finally:
        generation.release()


@contextlib.asynccontextmanager
async def _rate_limited(request: web.Request, slug: str, limits: TokenLimits) -> AsyncIterator[None]:
    limiter, user = request.app[LIMITER], request[USER]
    try:
        await limiter.check_tokens(slug, user.id, limits.model, limits.user)
    except Limited as exc:
        raise _too_many(request, exc) from None
    try:
        yield
    finally:
        usage = request[INFO].usage
        if usage is not None and usage.total_tokens:
            await limiter.record_tokens(slug, user.id, usage.total_tokens)


def _too_many(request: web.Request, exc: Limited) -> ApiError:
    request.app[METRICS].rate_limited(exc.kind).inc()
    retry_after = str(max(1, math.ceil(exc.retry_after)))
    return ApiError(429, exc.message, code="rate_limit_exceeded", headers={"Retry-After": retry_after})


async def run_task(request: web.Request, endpoint: BaseEndpoint, data: dict[str, Any]) -> web.Response:
    info, meters = _describe(request, endpoint, stream=False)
    started = time.monotonic()
    outcome = "cancelled"
    joining = joining_of(request, request[USER].id, endpoint.endpoint_slug, data["model_params"])
    try:
        task, _ = await request.app[RETRY_JOINS].run(joining, lambda: contract.submit_task(endpoint, data))
        info.task_id = task.task_id
        response = _answer(task, info, request.app[REQUEST_LOG], data["model_params"]["openai_endpoint"])
        outcome = "ok"
        return response
    except ApiError as exc:
        outcome = _outcome(exc.status)
        raise
    except asyncio.CancelledError:
        outcome = _cancelled(request)
        raise
    finally:
        _measured(meters, info, started, outcome, first_byte=None)


async def run_stream(
    request: web.Request, endpoint: BaseEndpoint, data: dict[str, Any]
) -> web.StreamResponse:
    info, meters = _describe(request, endpoint, stream=True)
    scanner = scanner_for(data["model_params"])
    started = time.monotonic()
    outcome = "cancelled"
    streams_in_flight = request.app[METRICS].streams_in_flight
    streams_in_flight.inc()
    try:
        opened = await contract.submit_streaming_task(endpoint, data, info.request_id)
        info.task_id = opened.task_id
        meters.phase("submission").observe(time.monotonic() - started)
        if opened.error_code is not None or opened.response is None:
            outcome = _outcome(opened.error_code or 502)
            adaptor_failed(
                opened.error_code,
                opened.error_message or "The backend sent no stream.",
                opened.retryable,
                opened.retry_after,
                opened.error_detail,
            )
        stream = cast(AsyncIterator[bytes], opened.response)  # contract turned any stream into bytes
        ended = await relay(request, scanner.scan(stream), on_first_chunk=lambda: _first(info))
        if ended.error is not None:
            info.error = ended.error.detail or ended.error.message
        outcome = _outcome(ended.error.status if ended.error else None) if ended.completed else "client_gone"
        info.client_closed = not ended.completed
        return ended.response
    except ApiError as exc:
        outcome = _outcome(exc.status)
        raise
    except asyncio.CancelledError:
        outcome = _cancelled(request)
        raise
    finally:
        streams_in_flight.dec()
        info.usage = scanner.final_usage(data["model_params"])
        first = None if info.first_chunk is None else info.first_chunk - started
        _measured(meters, info, started, outcome, first_byte=first)


def _describe(
    request: web.Request, endpoint: BaseEndpoint, stream: bool
) -> tuple[RequestInfo, EndpointMeters]:
    info = request[INFO]
    info.cluster, info.framework, info.model = endpoint.cluster, endpoint.framework, endpoint.model
    info.endpoint_slug, info.adaptor, info.stream = endpoint.endpoint_slug, type(endpoint).__name__, stream
    meters = request.app[METRICS].endpoint(info.adaptor, *info.endpoint_labels)
    meters.authentication.observe(request.get(AUTH_SECONDS, 0.0))
    return info, meters


def _answer(
    task: SubmitTaskResponse, info: RequestInfo, request_log: RequestLog, openai_path: str
) -> web.Response:
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
        document = json.loads(task.result)
    except (ValueError, RecursionError):
        message = "The backend answered with invalid JSON."
        raise ApiError(502, message, code="backend_error", retryable=False) from None
    info.usage = Usage.of(document, openai_path)
    if request_log.store_prompts:
        info.result = task.result
    return web.Response(body=task.result.encode(), content_type="application/json")


def _first(info: RequestInfo) -> None:
    info.first_chunk = time.monotonic()


def _outcome(code: int | None) -> str:
    if code is None:
        return "ok"
    return "client_error" if code < 500 else "backend_error"


def _cancelled(request: web.Request) -> str:
    """aiohttp cancels the handler of a client that went away (its connection is gone); otherwise
    the gateway itself gave up on the request, stopping."""
    return "client_gone" if request.transport is None else "cancelled"


def _measured(
    meters: EndpointMeters, info: RequestInfo, started: float, outcome: str, first_byte: float | None
) -> None:
    """Called once the response has ended, whatever the way it ended."""
    total = time.monotonic() - started
    meters.outcome(outcome).observe(total)
    meters.total.observe(total)
    if first_byte is not None:
        meters.phase("first_byte").observe(first_byte)
        meters.first_chunk().observe(first_byte)
    usage = info.usage
    if usage is not None:
        if usage.prompt_tokens:
            meters.tokens("prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            meters.tokens("completion").inc(usage.completion_tokens)
