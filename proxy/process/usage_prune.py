"""`inference-gateway usage prune`: delete request records older than a moment, from the database.

    inference-gateway usage prune --config conf/gateway.yaml [--before 90d | --before 2026-01-01]

Without --before, the configuration's ``request_log.retention_days`` applies (a gateway with it set
also prunes by itself, hourly). Times read as for ``inference-gateway usage``: ISO dates or
date-times (UTC unless they have an offset) or spans back from now (``90d``, ``12w``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime

from proxy.process.command_line import Subparsers, add_config_option
from proxy.process.usage_cli import time_argument
from proxy.records.database import DatabaseUnavailable, redact
from proxy.records.record_keeping import DAY, prune
from proxy.records.schema import connect
from proxy.settings import load_settings
from proxy.settings.files import ConfigError


def add_parser(subparsers: Subparsers) -> None:
    """`prune`, under `usage`: the argument is `usage add_parser`'s answer."""
    parser = subparsers.add_parser(
        "prune",
        help="delete request records older than a moment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser, inherited=True)
    parser.add_argument("--before", type=time_argument, help="delete records started before: 90d, 2026-01-01")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 pruned, 1 the database is unavailable, 2 bad arguments or configuration."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    before = args.before
    if before is None:
        if settings.request_log.retention_days is None:
            print(f"{args.config}: request_log.retention_days is not set; say --before", file=sys.stderr)
            return 2
        before = time.time() - settings.request_log.retention_days * DAY
    try:
        deleted = asyncio.run(_prune(settings.database_url, before))
    except DatabaseUnavailable as exc:
        print(f"database {redact(settings.database_url)} unavailable: {exc}", file=sys.stderr)
        return 1
    moment = datetime.fromtimestamp(before, UTC).isoformat(timespec="seconds")
    print(f"{deleted} request records started before {moment} deleted")
    return 0


async def _prune(url: str, before: float) -> int:
    database = await connect(url)
    try:
        return await prune(database, before)
    finally:
        await database.close()
