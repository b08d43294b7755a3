"""Serving, and checking the configuration: what `inference-gateway` does without a command. One
process, or a supervisor and its workers sharing the listening socket."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import socket
import sys
from pathlib import Path
from typing import Final

from aiohttp import web

from proxy.core.identity import Authenticator
from proxy.core.registry import Registry, load_registry
from proxy.process.app import create_app, load_parts
from proxy.process.globus_check import GlobusUnreachable, check_online
from proxy.process.logs import LogFormat, configure_logging
from proxy.process.reload_report import Outcome, record_outcome, report_path
from proxy.process.workers import (
    Supervisor,
    exit_with_supervisor,
    listening_socket,
    metrics_directory,
    worker_command,
)
from proxy.settings import GatewaySettings, load_settings
from proxy.settings.files import ConfigError, unset_variables

log = logging.getLogger("proxy")

GC_THRESHOLDS: Final = (20_000, 20, 20)
"""A young collection every 20,000 net allocations instead of 700, an older one every 20 of those:
judged with bench.paired, 10,000 to 50,000 gave the same gain (docs/performance.md)."""


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The exit status of serving (0 once stopped) or of `--check-config` (0 valid, 2 a problem)."""
    configure_logging(args.log_format)
    try:
        settings = _with_overrides(load_settings(args.config), args)
    except ConfigError as exc:
        _say(args.log_format, f"configuration error:\n{exc}", logging.ERROR)
        return 2
    try:
        registry, authenticator = load_parts(settings, online=not args.check_config)
    except ConfigError as exc:
        _say(args.log_format, f"configuration error:\n{exc}{_also_unset(settings, str(exc))}", logging.ERROR)
        return 2
    if args.check_config:
        return check_config(args, settings, registry)
    _raise_open_file_limit()
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
        return serve(settings, registry, authenticator, sock, supervised=True)
    server = settings.server
    try:
        sock = listening_socket(server.host, server.port, server.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", server.host, server.port, exc.strerror or exc)
        return 1
    _write_pid_file(settings)
    if server.workers > 1:
        return supervise(settings, args.config, argv, sock)
    return serve(settings, registry, authenticator, sock, supervised=False)


def _also_unset(settings: GatewaySettings, reported: str) -> str:
    """The clusters file failing stops before the endpoints file is read: its unset variables are
    named too, so that one run lists every variable to set."""
    lines = []
    for path in (settings.clusters_file, settings.endpoints_file):
        names = unset_variables(path)
        if names and f"{path}:" not in reported and f"{path}," not in reported:
            lines.append(f"\n{path}: set the environment variables {', '.join(names)}")
    return "".join(lines)


def check_config(args: argparse.Namespace, settings: GatewaySettings, registry: Registry) -> int:
    """Exit status: 0 valid, 2 a problem (all of them named), 1 Globus unreachable with --online."""
    counts = f"{len(registry.clusters)} clusters, {len(registry.endpoints)} endpoints"
    globus = settings.auth.globus if settings.auth.provider == "globus" else None
    if args.online and globus is not None:
        try:
            problems = check_online(globus)
        except GlobusUnreachable as exc:
            _say(args.log_format, f"{args.config}: not checked online: {exc}", logging.ERROR)
            return 1
        if problems:
            _say(args.log_format, "configuration error:\n" + "\n".join(problems), logging.ERROR)
            return 2
        counts += "; Globus Auth accepts the credentials, scope and policies"
    elif args.online:
        counts += f"; nothing to check online with auth.provider {settings.auth.provider}"
    _say(args.log_format, f"{args.config}: OK ({counts})", logging.INFO)
    return 0


def _say(log_format: LogFormat, message: str, level: int) -> None:
    """The command's answer: plain text for a person at a terminal, a log record in JSON mode."""
    if log_format == "json":
        log.log(level, message)
    else:
        print(message, file=sys.stderr if level >= logging.WARNING else sys.stdout)


def serve(
    settings: GatewaySettings,
    registry: Registry,
    authenticator: Authenticator,
    sock: socket.socket,
    supervised: bool,
) -> int:
    """One process. SIGTERM: stop accepting, let requests and streams finish for up to
    `timeouts.shutdown_seconds`, exit 0. SIGHUP: reload endpoints and clusters."""
    app = create_app(settings, registry, authenticator, reload_on_sighup=True)
    if supervised:
        app.on_startup.append(_exit_with_supervisor)
    app.on_startup.append(_settle_garbage)  # last, once the adaptors are started
    server = settings.server
    log.info("pid %d serving on http://%s:%d%s", os.getpid(), server.host, server.port, server.base_path)
    web.run_app(
        app,
        sock=sock,
        backlog=server.backlog,  # aiohttp listens again on the socket, with 128 unless told
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.timeouts.keepalive_seconds,
        shutdown_timeout=settings.timeouts.shutdown_seconds,
        print=None,
        loop=_new_event_loop(),
    )
    log.info("pid %d stopped", os.getpid())
    return 0


def supervise(settings: GatewaySettings, config: Path, argv: list[str], sock: socket.socket) -> int:
    server = settings.server
    supervisor = Supervisor(
        server.workers,
        worker_command(argv),
        sock,
        metrics_directory(),
        lambda: _still_valid(config, server.pid_file, server.workers),
    )
    log.info(
        "supervisor pid %d: %d workers on http://%s:%d", os.getpid(), server.workers, server.host, server.port
    )
    return asyncio.run(supervisor.run())


def _still_valid(config: Path, pid_file: Path | None, workers: int) -> bool:
    """Checked by the supervisor on SIGHUP before it signals the workers; its answer (and the
    number of workers asked) goes to `inference-gateway reload` through the reload report."""
    try:
        settings = load_settings(config)
        load_registry(settings.endpoints_file, settings.clusters_file)
    except ConfigError as exc:
        log.error("reload refused; still serving the previous endpoints and clusters:\n%s", exc)
        outcome = Outcome(False, f"reload refused:\n{exc}")
    else:
        outcome = Outcome(True, f"asked {workers} workers to reload")
    if pid_file is not None:
        record_outcome(report_path(pid_file), outcome, workers)
    return outcome.ok


async def _exit_with_supervisor(app: web.Application) -> None:
    watcher = exit_with_supervisor()
    app.on_cleanup.append(lambda _: _cancel(watcher))


async def _settle_garbage(app: web.Application) -> None:
    """The last step of start-up. A request allocates hundreds of objects that their reference
    counts free; with Python's default threshold (a young collection every 700 net allocations)
    the collections walked the live objects of the requests in flight again and again, about a
    seventh of the gateway's CPU at 64 concurrent requests (docs/performance.md). `gc.freeze()`
    saved little more and made full collections during large bodies more frequent: not used."""
    gc.set_threshold(*GC_THRESHOLDS)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _write_pid_file(settings: GatewaySettings) -> None:
    if settings.server.pid_file is not None:
        settings.server.pid_file.write_text(f"{os.getpid()}\n")


def _with_overrides(settings: GatewaySettings, args: argparse.Namespace) -> GatewaySettings:
    update = {key: value for key in ("host", "port", "workers") if (value := getattr(args, key)) is not None}
    return settings.model_copy(update={"server": settings.server.model_copy(update=update)})


def _raise_open_file_limit() -> None:
    """Each stream holds two sockets; the usual soft limit of 1024 would cap a gateway at ~500."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open file limit above %d", soft)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
