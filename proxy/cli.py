"""`inference-gateway`: check the configuration, or serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
from pathlib import Path

from aiohttp import web

from proxy import usage_cli
from proxy.app import create_app, load_parts
from proxy.maintenance import read_state, write_state
from proxy.settings import ConfigError, GatewaySettings, load_settings

log = logging.getLogger("proxy")

DEFAULT_CONFIG = "conf/gateway.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="inference-gateway", description=__doc__)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)),
        help=f"main YAML file (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})",
    )
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["maintenance"]:
        return maintenance_main(argv[1:])
    if argv[:1] == ["usage"]:
        return usage_cli.main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    app = create_app(settings, registry, authenticator)
    server = settings.server
    log.info("serving on http://%s:%d%s", server.host, server.port, server.base_path)
    web.run_app(
        app,
        host=server.host,
        port=server.port,
        backlog=server.backlog,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.timeouts.keepalive_seconds,
        shutdown_timeout=settings.timeouts.shutdown_seconds,
        print=None,
        loop=_new_event_loop(),
    )
    return 0


def _with_overrides(settings: GatewaySettings, args: argparse.Namespace) -> GatewaySettings:
    update = {key: value for key in ("host", "port") if (value := getattr(args, key)) is not None}
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


def maintenance_main(argv: list[str]) -> int:
    """`inference-gateway maintenance on CLUSTER --message ... | off CLUSTER | list`: takes effect in
    running gateways within a second, without a restart."""
    parser = argparse.ArgumentParser(prog="inference-gateway maintenance")
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG)))
    parser.add_argument("action", choices=["on", "off", "list"])
    parser.add_argument("cluster", nargs="?")
    parser.add_argument("--message", default="The cluster is under maintenance; please try again later.")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
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
