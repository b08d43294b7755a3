"""`inference-gateway`: check the configuration, or serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import socket
import sys
from pathlib import Path

from aiohttp import web

from proxy import token_cli, usage_cli, usage_prune
from proxy.app import create_app, load_parts
from proxy.auth import Authenticator
from proxy.logs import configure_logging
from proxy.maintenance import read_state, write_state
from proxy.registry import Registry, load_registry
from proxy.reload import reload_on_sighup, signal_reload
from proxy.settings import ConfigError, GatewaySettings, load_settings
from proxy.workers import (
    Supervisor,
    exit_with_supervisor,
    listening_socket,
    metrics_directory,
    worker_command,
)

log = logging.getLogger("proxy")

DEFAULT_CONFIG = "conf/gateway.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="inference-gateway", description=__doc__)
    _add_config_option(parser)
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--workers", type=int, help="override server.workers: processes sharing the port")
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["maintenance"]:
        return maintenance_main(argv[1:])
    if argv[:2] == ["usage", "prune"]:
        return usage_prune.main(argv[2:])
    if argv[:1] == ["usage"]:
        return usage_cli.main(argv[1:])
    if argv[:1] == ["reload"]:
        return reload_main(argv[1:])
    if argv[:1] == ["token"]:
        return token_main(argv)
    args = parse_args(argv)
    configure_logging()
    try:
        settings = _with_overrides(load_settings(args.config), args)
        registry, authenticator = load_parts(settings)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{args.config}: OK ({len(registry.clusters)} clusters, {len(registry.endpoints)} endpoints)")
        return 0
    _raise_open_file_limit()
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
        return serve(settings, registry, authenticator, sock, supervised=True)
    if settings.server.workers > 1:
        return supervise(settings, args.config, argv)
    _write_pid_file(settings)
    sock = listening_socket(settings.server.host, settings.server.port, settings.server.backlog)
    return serve(settings, registry, authenticator, sock, supervised=False)


def token_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="inference-gateway")
    token_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return token_cli.run(parser.parse_args(argv))


def serve(
    settings: GatewaySettings,
    registry: Registry,
    authenticator: Authenticator,
    sock: socket.socket,
    supervised: bool,
) -> int:
    """One process. SIGTERM: stop accepting, let requests and streams finish for up to
    `timeouts.shutdown_seconds`, exit 0. SIGHUP: reload endpoints and clusters."""
    app = create_app(settings, registry, authenticator)
    app.on_startup.append(reload_on_sighup)
    if supervised:
        app.on_startup.append(_exit_with_supervisor)
    server = settings.server
    log.info("pid %d serving on http://%s:%d%s", os.getpid(), server.host, server.port, server.base_path)
    web.run_app(
        app,
        sock=sock,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.timeouts.keepalive_seconds,
        shutdown_timeout=settings.timeouts.shutdown_seconds,
        print=None,
        loop=_new_event_loop(),
    )
    log.info("pid %d stopped", os.getpid())
    return 0


def supervise(settings: GatewaySettings, config: Path, argv: list[str]) -> int:
    server = settings.server
    sock = listening_socket(server.host, server.port, server.backlog)
    _write_pid_file(settings)
    supervisor = Supervisor(
        server.workers, worker_command(argv), sock, metrics_directory(), lambda: _still_valid(config)
    )
    log.info(
        "supervisor pid %d: %d workers on http://%s:%d", os.getpid(), server.workers, server.host, server.port
    )
    return asyncio.run(supervisor.run())


def _still_valid(config: Path) -> bool:
    try:
        settings = load_settings(config)
        load_registry(settings.endpoints_file, settings.clusters_file)
    except ConfigError as exc:
        log.error("reload refused; still serving the previous endpoints and clusters:\n%s", exc)
        return False
    return True


async def _exit_with_supervisor(app: web.Application) -> None:
    watcher = exit_with_supervisor()
    app.on_cleanup.append(lambda _: _cancel(watcher))


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


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)),
        help=f"main YAML file (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})",
    )


def _settings_or_report(path: Path) -> GatewaySettings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return None


def maintenance_main(argv: list[str]) -> int:
    """`inference-gateway maintenance on CLUSTER --message ... | off CLUSTER | list`: takes effect in
    running gateways within a second, without a restart."""
    parser = argparse.ArgumentParser(prog="inference-gateway maintenance")
    _add_config_option(parser)
    parser.add_argument("action", choices=["on", "off", "list"])
    parser.add_argument("cluster", nargs="?")
    parser.add_argument("--message", default="The cluster is under maintenance; please try again later.")
    args = parser.parse_args(argv)
    settings = _settings_or_report(args.config)
    if settings is None:
        return 2
    state = read_state(settings.maintenance_file)
    if args.action != "list":
        if args.cluster is None:
            parser.error(f"'{args.action}' needs a cluster name")
        if args.action == "on":
            state[args.cluster] = args.message
        else:
            state.pop(args.cluster, None)
        write_state(settings.maintenance_file, state)
    for cluster, message in sorted({**settings.maintenance, **state}.items()):
        print(f"{cluster}: {message}")
    return 0


def reload_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="inference-gateway reload", description="re-read endpoints and clusters in a running gateway"
    )
    _add_config_option(parser)
    args = parser.parse_args(argv)
    settings = _settings_or_report(args.config)
    if settings is None:
        return 2
    if settings.server.pid_file is None:
        print(
            f"{args.config}: set server.pid_file to use this command (or send SIGHUP yourself)",
            file=sys.stderr,
        )
        return 2
    return signal_reload(settings.server.pid_file)
