"""`inference-gateway`: serve (no command), check the configuration (`--check-config`), or run one of
the operator's commands below."""

from __future__ import annotations

import argparse
import sys

from proxy.metrics.build_info import version
from proxy.process import certificates_cli, operator_commands, token_cli, usage_cli, usage_prune
from proxy.process.command_line import add_config_option
from proxy.process.logs import LOG_FORMAT_ENV, default_format


def build_parser() -> argparse.ArgumentParser:
    """Serving takes no command (as systemd and the workers start it); the operator's commands are
    subcommands, each with its own `--help`."""
    parser = argparse.ArgumentParser(prog="inference-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_config_option(parser)
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration (offline) and exit"
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="with --check-config: also check the Globus credentials, scope and policies with Globus Auth",
    )
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--workers", type=int, help="override server.workers: processes sharing the port")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=default_format(),
        help=f"json: every line on stdout and stderr is a JSON object (default: ${LOG_FORMAT_ENV} or text)",
    )
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    operator_commands.add_parsers(commands)
    usage_prune.add_parser(usage_cli.add_parser(commands))
    token_cli.add_parser(commands)
    certificates_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The exit status, argparse's own included (0 after `--help`, 2 for a usage error), so that
    callers in the same process get a status rather than SystemExit."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is not None:
            code: int = args.run(args)
            return code
        if args.online and not args.check_config:
            parser.error("--online goes with --check-config")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    # Imported only to serve or check: the operator's commands start without the server's modules.
    from proxy.process import serving

    return serving.run(args, argv)
