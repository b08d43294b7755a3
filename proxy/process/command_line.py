"""What the commands of `inference-gateway` share: the `--config` option and the type of the list each
command adds its subcommand to. Every command module contributes its own parser through an
`add_parser(subparsers)` function and sets its handler as the parser's `run` default, so that
`inference-gateway --help` lists every command and each has its own `--help`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Final, TypeAlias

DEFAULT_CONFIG: Final = "conf/gateway.yaml"

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What `ArgumentParser.add_subparsers` returns: a command adds its own parser to it."""


def add_config_option(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    """A subcommand's `--config` leaves the value alone when not given, so that `--config` before the
    command name counts too (a subparser's own default would overwrite it)."""
    default = argparse.SUPPRESS if inherited else Path(os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"main YAML file (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})",
    )
