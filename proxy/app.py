"""Builds the aiohttp application from validated settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from adaptors import AdaptorContext
from proxy.auth import Authenticator, StaticAuthenticator, auth_middleware
from proxy.jobs import JobsCache
from proxy.middleware import openai_errors
from proxy.registry import Registry, load_registry
from proxy.routes import BASE_PATH, JOBS, PUBLIC_ROUTES, REGISTRY, STARTED_AT, add_routes
from proxy.settings import GatewaySettings


def build_authenticator(settings: GatewaySettings) -> Authenticator:
    static = settings.auth.static
    assert static is not None, "load_settings requires auth.static for the static provider"
    return StaticAuthenticator.from_file(static.tokens_file)


def load_parts(settings: GatewaySettings) -> tuple[Registry, Authenticator]:
    """Everything that can fail on configuration, so that `--check-config` runs exactly this."""
    registry = load_registry(settings.endpoints_file, settings.clusters_file)
    return registry, build_authenticator(settings)


def create_app(
    settings: GatewaySettings, registry: Registry, authenticator: Authenticator
) -> web.Application:
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[openai_errors, auth_middleware(authenticator, PUBLIC_ROUTES)],
    )
    app[REGISTRY] = registry
    app[JOBS] = JobsCache(settings.timeouts.jobs_cache_seconds)
    app[BASE_PATH] = settings.server.base_path
    app[STARTED_AT] = int(time.time())
    add_routes(app, settings.server.base_path)
    app.cleanup_ctx.append(_adaptor_lifecycle(settings.server.adaptor_threads))
    return app


def _adaptor_lifecycle(threads: int) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        adaptors = list(app[REGISTRY].adaptors())
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adaptor") as executor:
            context = AdaptorContext(executor=executor)
            await asyncio.gather(*(adaptor.startup(context) for adaptor in adaptors))
            try:
                yield
            finally:
                await asyncio.gather(*(adaptor.shutdown() for adaptor in adaptors), return_exceptions=True)

    return lifecycle
