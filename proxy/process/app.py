"""Builds the aiohttp application from validated settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from adaptors import AdaptorContext
from adaptors.context import AnswerLimits
from proxy.core.dispatch import LIMITER
from proxy.core.federation import FEDERATION, Federation, name_serving_endpoint
from proxy.core.globus_auth import GlobusAuthenticator
from proxy.core.identity import Authenticator
from proxy.core.jobs import JobsCache, jobs_reader
from proxy.core.limits import Limiter, LocalLimiter, RedisLimiter
from proxy.core.maintenance import MAINTENANCE, Maintenance
from proxy.core.maintenance_redis import maintenance_from_redis
from proxy.core.recorder import REQUEST_LOG, RequestLog
from proxy.core.redis_relay import RedisRelay
from proxy.core.registry import REGISTRY, Registry, load_registry
from proxy.core.relay import LocalRelay, Relay
from proxy.core.retry_join import RETRY_JOINS, RetryJoins
from proxy.core.static_auth import StaticAuthenticator
from proxy.edge.authentication import auth_middleware
from proxy.edge.batches import BATCH_SETTINGS, BATCHES, add_batch_routes, advance_forever
from proxy.edge.bodies import BODY_DEADLINE, LARGE_BODIES, BodyDeadline, LargeBodies
from proxy.edge.callbacks import CALLBACK_ROUTES, RELAY, add_callback_routes
from proxy.edge.headers import single_authorization
from proxy.edge.malformed import answer_malformed_requests_in_json
from proxy.edge.middleware import openai_errors
from proxy.edge.observe import add_request_id, observe_middleware
from proxy.edge.routes import BASE_PATH, JOBS, PUBLIC_ROUTES, STARTED_AT, add_routes
from proxy.edge.staging import add_staging_routes
from proxy.edge.tasks import add_task_routes
from proxy.metrics.prometheus import METRICS, AdaptorTelemetry, Metrics, metrics_handler
from proxy.process.reload import RELOADER, Reloader, shut_down
from proxy.records.batch_store import BatchStore
from proxy.records.record_keeping import prune_forever
from proxy.records.request_log import LineWriter, RecordSink
from proxy.records.standby_database import StandbyDatabase
from proxy.records.usage_store import UsageStore
from proxy.settings import GatewaySettings


def build_authenticator(settings: GatewaySettings, online: bool = True) -> Authenticator:
    """The configured provider; load_settings guarantees its section is present. `online` False
    (`--check-config` without `--online`) makes no call to Globus."""
    if settings.auth.globus is not None and settings.auth.provider == "globus":
        globus = GlobusAuthenticator(settings.auth.globus, settings.redis_url)
        if online and settings.auth.globus.verify_policies_at_startup:
            globus.verify_policies()
        return globus
    assert settings.auth.static is not None
    return StaticAuthenticator.from_file(settings.auth.static.tokens_file)


def load_parts(settings: GatewaySettings, online: bool = True) -> tuple[Registry, Authenticator]:
    """Everything that can fail on configuration, so that `--check-config` runs exactly this."""
    registry = load_registry(settings.endpoints_file, settings.clusters_file)
    return registry, build_authenticator(settings, online)


def create_app(
    settings: GatewaySettings, registry: Registry, authenticator: Authenticator
) -> web.Application:
    answer_malformed_requests_in_json()
    metrics = Metrics(settings.metrics.enabled)
    public = PUBLIC_ROUTES | CALLBACK_ROUTES | {"metrics"}
    logging_settings = settings.request_log
    writer = LineWriter() if logging_settings.stdout else None
    request_log = RequestLog(
        writer,
        logging_settings.trusted_proxies,
        metrics,
        logging_settings.store_prompts,
        unauthenticated_per_minute=logging_settings.unauthenticated_per_minute,
    )
    authenticate = auth_middleware(authenticator, public, request_log.client_ip)
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[observe_middleware(metrics), openai_errors, single_authorization, authenticate],
    )
    app[METRICS] = metrics
    app[REQUEST_LOG] = request_log
    server = settings.server
    app[BODY_DEADLINE] = BodyDeadline(
        server.body_timeout_seconds, server.body_grace_seconds, server.body_min_bytes_per_second
    )
    app[LARGE_BODIES] = LargeBodies(
        server.large_body_bytes, asyncio.Semaphore(server.large_bodies_at_once), server.body_timeout_seconds
    )
    app.on_cleanup.append(_closing(app[REQUEST_LOG]))
    app[LIMITER] = build_limiter(settings)
    app.on_cleanup.append(lambda app: app[LIMITER].close())
    authenticator.instrument(metrics)
    app.on_response_prepare.append(add_request_id)
    app[REGISTRY] = registry
    app[MAINTENANCE] = Maintenance(settings.maintenance, settings.maintenance_file)
    if settings.redis_url:
        app.cleanup_ctx.append(maintenance_from_redis(settings.redis_url))
    app[RELAY] = build_relay(settings)
    app[JOBS] = JobsCache(settings.timeouts.jobs_cache_seconds)
    app[FEDERATION] = Federation(registry, app[JOBS], app[MAINTENANCE], settings.federation)
    app[RETRY_JOINS] = RetryJoins(settings.retries)
    app.on_cleanup.append(lambda app: app[RETRY_JOINS].close())
    app.on_response_prepare.append(name_serving_endpoint)
    app[RELOADER] = Reloader(registry, app[JOBS], settings.endpoints_file, settings.clusters_file)
    app[BASE_PATH] = settings.server.base_path
    app[STARTED_AT] = int(time.time())
    add_routes(app, settings.server.base_path)
    add_callback_routes(app, settings.server.base_path)
    add_batch_routes(app, settings.server.base_path)
    add_task_routes(app, settings.server.base_path, settings.tasks, settings.redis_url)
    add_staging_routes(app, settings.server.base_path, settings.data_staging)
    _add_metrics(app, settings)
    app[BATCH_SETTINGS] = settings.batches
    limits = AnswerLimits(settings.server.max_answer_bytes, settings.server.max_error_bytes)
    app.cleanup_ctx.append(_adaptor_lifecycle(settings.server.adaptor_threads, limits))
    app.cleanup_ctx.append(_database_lifecycle(settings))
    app.on_cleanup.append(lambda _: authenticator.close())
    app.on_cleanup.append(lambda app: app[RELAY].close())
    return app


def _closing(request_log: RequestLog) -> Callable[[web.Application], Awaitable[None]]:
    """The last records of a stopping gateway are written, not left pending."""

    async def close(_: web.Application) -> None:
        request_log.close()
        if request_log.writer is not None:
            request_log.writer.close()

    return close


def _labels_of(registry: Registry) -> Callable[[str], tuple[str, str, str, str]]:
    def labels(endpoint_slug: str) -> tuple[str, str, str, str]:
        endpoint = registry.endpoints.get(endpoint_slug)
        if endpoint is None:
            return ("", "", "", "")
        return (type(endpoint).__name__, endpoint.cluster, endpoint.framework, endpoint.model)

    return labels


def _database_lifecycle(settings: GatewaySettings) -> Callable[[web.Application], AsyncIterator[None]]:
    """One connection pool for batches and request records, open for the life of the gateway. A
    database unreachable at start-up does not stop the gateway: it is connected in the background."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        database = await StandbyDatabase.start(settings.database_url, settings.database)
        app[BATCHES] = BatchStore(database)
        advancer = asyncio.create_task(advance_forever(app))
        request_log = app[REQUEST_LOG]
        if settings.request_log.store:
            request_log.sink = RecordSink(
                UsageStore(database), max_buffered=settings.request_log.buffer_records
            )
            request_log.sink.start()
        retention = settings.request_log.retention_days
        pruning = asyncio.create_task(prune_forever(database, retention)) if retention else None
        try:
            yield
        finally:
            advancer.cancel()
            if pruning is not None:
                pruning.cancel()
            if request_log.sink is not None:
                request_log.close()  # its waiting records reach the sink before the sink closes
                await request_log.sink.close()
            await database.close()

    return lifecycle


def _add_metrics(app: web.Application, settings: GatewaySettings) -> None:
    """On the main port, or alone on its own port so that it need not be exposed with the API."""
    if not settings.metrics.enabled:
        return
    app.cleanup_ctx.append(_shared_metrics)
    handler = metrics_handler(settings.metrics.allow)
    if settings.metrics.port is None:
        app.router.add_get(settings.metrics.path, handler, name="metrics")
        return
    separate = web.Application()
    separate[METRICS] = app[METRICS]
    separate.router.add_get(settings.metrics.path, handler)
    host = settings.server.host if settings.metrics.host is None else settings.metrics.host
    app.cleanup_ctx.append(_serve_separately(separate, host, settings.metrics.port))


async def _shared_metrics(app: web.Application) -> AsyncIterator[None]:
    """With other workers (a shared metrics directory), this one's values reach them every second;
    its last values, written as it stops, stay in their sums."""
    tallies = app[METRICS].tallies
    if tallies.directory is None:
        yield
        return
    sharing = asyncio.create_task(tallies.share_forever())
    try:
        yield
    finally:
        sharing.cancel()
        tallies.share(gauges=False)


def _serve_separately(
    app: web.Application, host: str, port: int
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Every worker binds the port (reuse_port); whichever answers a scrape reports all of them."""

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_port=True).start()
        try:
            yield
        finally:
            await runner.cleanup()

    return lifecycle


def build_limiter(settings: GatewaySettings) -> Limiter:
    """In-process by default; in Redis, every process and host enforces one limit."""
    limits = settings.limits
    rates = (limits.requests_per_second, limits.burst, limits.concurrent_per_user)
    if settings.redis_url:
        return RedisLimiter(*rates, url=settings.redis_url)
    return LocalLimiter(*rates)


def build_relay(settings: GatewaySettings) -> Relay:
    if settings.redis_url:
        return RedisRelay(settings.streaming, settings.redis_url)
    return LocalRelay(settings.streaming)


def _adaptor_lifecycle(
    threads: int, limits: AnswerLimits
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        registry, reloader = app[REGISTRY], app[RELOADER]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adaptor") as executor:
            telemetry = AdaptorTelemetry(app[METRICS], _labels_of(registry))
            jobs = jobs_reader(registry, app[JOBS])
            context = AdaptorContext(
                executor=executor, relay=app[RELAY], telemetry=telemetry, jobs=jobs, limits=limits
            )
            await asyncio.gather(*(adaptor.startup(context) for adaptor in registry.adaptors()))
            reloader.context = context
            try:
                yield
            finally:
                await reloader.close()
                await shut_down(registry)

    return lifecycle
