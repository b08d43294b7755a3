"""`inference-gateway maintenance` and `inference-gateway reload`: commands an operator runs against a
running gateway. Each says what happened and exits non-zero when it did not do what was asked, so
scripts and runbooks can rely on the exit status.

Exit status: 0 done, 1 refused (an unknown cluster, no gateway to signal), 2 configuration error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxy.core.maintenance import read_state, write_state
from proxy.core.registry import load_registry
from proxy.process.command_line import Subparsers, add_config_option
from proxy.process.reload_report import request_reload
from proxy.settings import GatewaySettings, load_settings
from proxy.settings.files import ConfigError

DEFAULT_MESSAGE = "The cluster is under maintenance; please try again later."


def add_parsers(subparsers: Subparsers) -> None:
    """`maintenance` and `reload`, each running the function of the same name."""
    maintenance_parser = subparsers.add_parser(
        "maintenance",
        help="put a cluster under maintenance, end it, or list it",
        description=maintenance.__doc__,
    )
    add_config_option(maintenance_parser, inherited=True)
    maintenance_parser.add_argument("action", choices=["on", "off", "list"])
    maintenance_parser.add_argument("cluster", nargs="?")
    maintenance_parser.add_argument(
        "--message", default=DEFAULT_MESSAGE, help="what users are told (with `on`)"
    )
    maintenance_parser.set_defaults(run=maintenance)
    reload_parser = subparsers.add_parser(
        "reload", help="re-read endpoints and clusters in a running gateway", description=reload.__doc__
    )
    add_config_option(reload_parser, inherited=True)
    reload_parser.set_defaults(run=reload)


def _report(message: str) -> None:
    print(message, file=sys.stderr)


def _settings(path: Path) -> GatewaySettings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        _report(f"configuration error:\n{exc}")
        return None


def _cluster_names(settings: GatewaySettings) -> list[str] | None:
    try:
        registry = load_registry(settings.endpoints_file, settings.clusters_file)
    except ConfigError as exc:
        _report(f"configuration error:\n{exc}")
        return None
    return sorted(registry.clusters)


def maintenance(args: argparse.Namespace) -> int:
    """`on CLUSTER --message ... | off CLUSTER | list`: running gateways see the change within a
    second, without a restart. A cluster the configuration does not define is refused: a typo would
    otherwise leave the real cluster serving while the operator believes it is closed."""
    settings = _settings(args.config)
    if settings is None:
        return 2
    state = read_state(settings.maintenance_file)
    if args.action != "list":
        if args.cluster is None:
            _report(f"maintenance {args.action}: name the cluster")
            return 2
        if args.action == "off" and args.cluster in settings.maintenance:
            _report(f"maintenance off: {args.cluster!r} is under maintenance in {args.config} "
                    "(`maintenance:`); remove it there and restart")  # fmt: skip
            return 1
        if args.action == "on" or args.cluster not in state:
            names = _cluster_names(settings)
            if names is None:
                return 2
            if args.cluster not in names:
                _report(f"maintenance {args.action}: no cluster named {args.cluster!r} in "
                        f"{settings.clusters_file} (clusters: {', '.join(names) or 'none'})")  # fmt: skip
                return 1
        if args.action == "on":
            state[args.cluster] = args.message
        else:
            state.pop(args.cluster, None)
        write_state(settings.maintenance_file, state)
    for cluster, message in sorted({**settings.maintenance, **state}.items()):
        print(f"{cluster}: {message}")
    return 0


def reload(args: argparse.Namespace) -> int:
    """The files are checked here first, exactly as the gateway will check them: a broken file is
    reported with every problem and the gateway is not signalled. Then every process of the
    gateway answers (proxy/process/reload_report.py): an adaptor that fails to start refuses the reload,
    and this command says so and exits 1."""
    settings = _settings(args.config)
    if settings is None:
        return 2
    if settings.server.pid_file is None:
        _report(f"{args.config}: set server.pid_file to use this command (or send SIGHUP yourself)")
        return 2
    try:
        load_registry(settings.endpoints_file, settings.clusters_file)
    except ConfigError as exc:
        _report(f"reload refused; the gateway keeps its previous endpoints and clusters:\n{exc}")
        return 2
    return request_reload(settings.server.pid_file)
