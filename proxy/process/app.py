"""Builds the aiohttp application from validated settings, with its one state object
(proxy/core/state.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from aiohttp import web

from adaptors import AdaptorContext
from adaptors.context import AnswerLimits
from proxy.core.batch_runner import BatchRunner
from proxy.core.body_limits import BodyDeadline, LargeBodies
from proxy.core.callback_relay import LocalRelay, Relay
from proxy.core.callback_relay_redis import RedisRelay
from proxy.core.deployments.controller import Controller
from proxy.core.federation import Federation, name_serving_endpoint
from proxy.core.globus_auth import GlobusAuthenticator
from proxy.core.identity import Authenticator
from proxy.core.jobs import JobsCache, jobs_reader
from proxy.core.limits import Limiter
from proxy.core.limits_local import LocalLimiter
from proxy.core.limits_redis import RedisLimiter
from proxy.core.maintenance import Maintenance
from proxy.core.maintenance_redis import maintenance_from_redis
from proxy.core.recorder import Recorder
from proxy.core.registry import Registry, load_registry
from proxy.core.retry_join import RetryJoins
from proxy.core.state import STATE, GatewayState
from proxy.core.static_auth import StaticAuthenticator
from proxy.core.task_book import build_task_book
from proxy.dashboard.routes import DASHBOARD_ROUTES, add_dashboard
from proxy.edge.authentication import auth_middleware
from proxy.edge.batches import add_batch_routes, advance_forever
from proxy.edge.callbacks import CALLBACK_ROUTES, add_callback_routes
from proxy.edge.headers import single_authorization
from proxy.edge.malformed import answer_malformed_requests_in_json
from proxy.edge.middleware import openai_errors
from proxy.edge.observe import QUIET_ROUTES, add_request_id, observe_middleware
from proxy.edge.openai_batches import add_openai_batch_routes
from proxy.edge.openai_files import add_file_routes
from proxy.edge.pilots import PILOT_ROUTES, QUIET_PILOT_ROUTES, add_pilot_routes
from proxy.edge.routes import PUBLIC_ROUTES, add_routes
from proxy.edge.staging import add_staging_routes
from proxy.edge.tasks import add_task_routes
from proxy.metrics.prometheus import AdaptorTelemetry, Metrics, metrics_handler
from proxy.process.reload import Reloader, shut_down, sighup_reloads
from proxy.process.reload_report import report_path
from proxy.records.batch_store import BatchStore
from proxy.records.deployment_store import DeploymentStore
from proxy.records.file_store import FileStore, LocalFileStorage
from proxy.records.line_writer import LineWriter
from proxy.records.openai_batch_store import OpenAIBatchStore
from proxy.records.record_keeping import prune_forever
from proxy.records.record_sink import RecordSink
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
    settings: GatewaySettings,
    registry: Registry,
    authenticator: Authenticator,
    *,
    reload_on_sighup: bool = False,
) -> web.Application:
    """`reload_on_sighup` is for the command line only: tests and embedders keep their own signal
    handling."""
    answer_malformed_requests_in_json()
    metrics = Metrics(settings.metrics.enabled)
    public = PUBLIC_ROUTES | CALLBACK_ROUTES | PILOT_ROUTES | {"metrics"} | DASHBOARD_ROUTES
    logging_settings = settings.request_log
    writer = LineWriter() if logging_settings.stdout else None
    recorder = Recorder(
        writer,
        logging_settings.trusted_proxies,
        metrics,
        logging_settings.store_prompts,
        unauthenticated_per_minute=logging_settings.unauthenticated_per_minute,
    )
    authenticate = auth_middleware(authenticator, public, recorder.client_ip)
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[
            observe_middleware(
                metrics, recorder, QUIET_ROUTES | DASHBOARD_ROUTES | QUIET_PILOT_ROUTES, CALLBACK_ROUTES
            ),
            openai_errors,
            single_authorization,
            authenticate,
        ],
    )
    state = app[STATE] = _state(settings, registry, metrics, recorder)
    app.on_cleanup.append(_closing(recorder))
    app.on_cleanup.append(lambda _: state.limiter.close())
    authenticator.instrument(metrics)
    app.on_response_prepare.append(add_request_id)
    if settings.redis_url:
        app.cleanup_ctx.append(maintenance_from_redis(settings.redis_url))
    app.on_cleanup.append(lambda _: state.retry_joins.close())
    app.on_response_prepare.append(name_serving_endpoint)
    reloader = Reloader(registry, state.jobs, settings.endpoints_file, settings.clusters_file)
    if reload_on_sighup:
        pid_file = settings.server.pid_file
        app.on_startup.append(sighup_reloads(reloader, None if pid_file is None else report_path(pid_file)))
    add_routes(app, settings.server.base_path)
    add_callback_routes(app, settings.server.base_path)
    controller = build_controller(settings, metrics)
    if controller is not None:
        add_pilot_routes(app, settings.server.base_path, controller)
    add_batch_routes(app, settings.server.base_path)
    add_openai_batch_routes(app, settings.server.base_path)
    add_file_routes(app, settings.server.base_path)
    add_task_routes(app, settings.server.base_path)
    app.on_cleanup.append(lambda _: state.tasks.close())
    add_staging_routes(app, settings.server.base_path, settings.data_staging)
    _add_metrics(app, settings, metrics)
    add_dashboard(app, settings, authenticator)
    limits = AnswerLimits(settings.server.max_answer_bytes, settings.server.max_error_bytes)
    app.cleanup_ctx.append(_adaptor_lifecycle(reloader, settings.server.adaptor_threads, limits, controller))
    app.cleanup_ctx.append(_database_lifecycle(settings, controller))
    app.on_cleanup.append(lambda _: authenticator.close())
    app.on_cleanup.append(lambda _: state.relay.close())
    return app


def _state(
    settings: GatewaySettings, registry: Registry, metrics: Metrics, recorder: Recorder
) -> GatewayState:
    server = settings.server
    maintenance = Maintenance(settings.maintenance, settings.maintenance_file)
    jobs = JobsCache(settings.timeouts.jobs_cache_seconds)
    return GatewayState(
        metrics=metrics,
        recorder=recorder,
        limiter=build_limiter(settings),
        registry=registry,
        maintenance=maintenance,
        jobs=jobs,
        federation=Federation(registry, jobs, maintenance, settings.federation),
        retry_joins=RetryJoins(settings.retries),
        relay=build_relay(settings),
        tasks=build_task_book(settings.tasks, settings.redis_url),
        body_deadline=BodyDeadline(
            server.body_timeout_seconds, server.body_grace_seconds, server.body_min_bytes_per_second
        ),
        large_bodies=LargeBodies(
            server.large_body_bytes,
            asyncio.Semaphore(server.large_bodies_at_once),
            server.body_timeout_seconds,
        ),
        batch_settings=settings.batches,
        openai_batch_settings=settings.openai_batches,
        file_storage=LocalFileStorage(settings.openai_batches.storage_dir),
        base_path=server.base_path,
        started_at=int(time.time()),
    )


def _closing(recorder: Recorder) -> Callable[[web.Application], Awaitable[None]]:
    """The last records of a stopping gateway are written, not left pending."""

    async def close(_: web.Application) -> None:
        recorder.close()
        if recorder.writer is not None:
            recorder.writer.close()

    return close


def _labels_of(registry: Registry) -> Callable[[str], tuple[str, str, str, str]]:
    def labels(endpoint_slug: str) -> tuple[str, str, str, str]:
        endpoint = registry.endpoints.get(endpoint_slug)
        if endpoint is None:
            return ("", "", "", "")
        return (type(endpoint).__name__, endpoint.cluster, endpoint.framework, endpoint.model)

    return labels


def build_controller(settings: GatewaySettings, metrics: Metrics) -> Controller | None:
    """The on-demand controller, when `on_demand.enabled` (load_settings checked its parts)."""
    if not settings.on_demand.enabled:
        return None
    return Controller(settings.on_demand, settings.server, settings.redis_url, metrics)


def _database_lifecycle(
    settings: GatewaySettings, controller: Controller | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """One connection pool for batches and request records, open for the life of the gateway. A
    database unreachable at start-up does not stop the gateway: it is connected in the background."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        database = await StandbyDatabase.start(settings.database_url, settings.database)
        state = app[STATE]
        state.batches = BatchStore(database)
        advancer = asyncio.create_task(advance_forever(app))
        state.files, state.openai_batches = FileStore(database), OpenAIBatchStore(database)
        runner = BatchRunner(
            state, state.openai_batches, state.files, state.file_storage, settings.openai_batches
        )
        running = asyncio.create_task(runner.run_forever())
        recorder = state.recorder
        if settings.request_log.store:
            recorder.sink = RecordSink(UsageStore(database), max_buffered=settings.request_log.buffer_records)
            recorder.sink.start()
        retention = settings.request_log.retention_days
        pruning = asyncio.create_task(prune_forever(database, retention)) if retention else None
        if controller is not None:
            await controller.start(DeploymentStore(database))
        try:
            yield
        finally:
            if controller is not None:
                await controller.stop()
            advancer.cancel()
            running.cancel()
            await runner.close()
            if pruning is not None:
                pruning.cancel()
            if recorder.sink is not None:
                recorder.close()  # its waiting records reach the sink before the sink closes
                await recorder.sink.close()
            await database.close()

    return lifecycle


def _add_metrics(app: web.Application, settings: GatewaySettings, metrics: Metrics) -> None:
    """On the main port, or alone on its own port so that it need not be exposed with the API."""
    if not settings.metrics.enabled:
        return
    app.cleanup_ctx.append(_shared_metrics)
    handler = metrics_handler(metrics, settings.metrics.allow)
    if settings.metrics.port is None:
        app.router.add_get(settings.metrics.path, handler, name="metrics")
        return
    separate = web.Application()
    separate.router.add_get(settings.metrics.path, handler)
    host = settings.server.host if settings.metrics.host is None else settings.metrics.host
    app.cleanup_ctx.append(_serve_separately(separate, host, settings.metrics.port))


async def _shared_metrics(app: web.Application) -> AsyncIterator[None]:
    """With other workers (a shared metrics directory), this one's values reach them every second;
    its last values, written as it stops, stay in their sums."""
    tallies = app[STATE].metrics.tallies
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
    reloader: Reloader, threads: int, limits: AnswerLimits, controller: Controller | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        registry = state.registry
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adaptor") as executor:
            telemetry = AdaptorTelemetry(state.metrics, _labels_of(registry))
            jobs = jobs_reader(registry, state.jobs)
            context = AdaptorContext(
                executor=executor, relay=state.relay, telemetry=telemetry, jobs=jobs, limits=limits
            )
            if controller is not None:
                context = replace(context, deployments=controller)
                await controller.attach(context)
            await asyncio.gather(*(adaptor.startup(context) for adaptor in registry.adaptors()))
            reloader.context = context
            try:
                yield
            finally:
                await reloader.close()
                await shut_down(registry)

    return lifecycle
