"""`inference-gateway usage`: requests and tokens over a period, from the database, per user, model,
cluster, day or hour (UTC), or any combination of them.

    inference-gateway usage --config conf/gateway.yaml --since 2026-11-01 [--until 2026-12-01]
                            [--by user,model,cluster,day,hour] [--all] [--json]

Only answered requests (status 2xx) count: a refused token (401), a rate limit (429), a bad request
or a failed backend is not usage. --all counts every request.

Times are ISO dates or date-times (without an offset they are UTC, so a report does not depend on the
machine's time zone) or relative to now: ``90m``, ``24h``, ``7d``, ``2w``. The period includes --since and
excludes --until (default: now and later).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, Final, cast, get_args

from proxy.process.command_line import Subparsers, add_config_option
from proxy.records.database import DatabaseUnavailable, redact
from proxy.records.schema import connect
from proxy.records.usage_store import UsageBy, UsageStore
from proxy.settings import load_settings
from proxy.settings.files import ConfigError

_RELATIVE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBERS: Final = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
_NO_NAME: Final = "(none)"


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds for an ISO date / date-time (UTC unless it has an offset) or a span back from now."""
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = relative.groups()
        return (time.time() if now is None else now) - float(amount) * _UNIT_SECONDS[unit]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO date/time (2026-11-01, 2026-11-01T12:00) nor like 7d, 24h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def time_argument(text: str) -> float:
    """argparse wants ArgumentTypeError to print the message instead of "invalid value"."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_parser(subparsers: Subparsers) -> Subparsers:
    """`usage` reports; what it returns takes the commands under it (`usage prune`)."""
    parser = subparsers.add_parser(
        "usage",
        help="requests and tokens per user, model, cluster, day or hour; `usage prune` deletes old records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --since SINCE [--until UNTIL] [--by BY] [--all] [--json] [--config CONFIG]\n"
        "       %(prog)s prune [--before BEFORE] [--config CONFIG]",
    )
    add_config_option(parser, inherited=True)
    # Not `required=True`: argparse would then ask `usage prune` for it too.
    parser.add_argument("--since", type=time_argument, help="start (required): 2026-11-01, 7d, 24h, ...")
    parser.add_argument("--until", type=time_argument, help="end, excluded (default: no end)")
    parser.add_argument(
        "--by",
        type=_keys_argument,
        default=["user"],
        help=f"group by, comma-separated: {', '.join(get_args(UsageBy))} (default: user)",
    )
    parser.add_argument("--all", action="store_true", help="count every request, not only answered ones")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def report(args: argparse.Namespace) -> int:
        if args.since is None:
            parser.error("the following arguments are required: --since")
        return run(args)

    parser.set_defaults(run=report)
    # `prog` given: argparse would otherwise build the subcommands' names from the usage text above.
    return parser.add_subparsers(title="commands", metavar="COMMAND", prog=parser.prog)


def _keys_argument(text: str) -> list[UsageBy]:
    keys = [key.strip() for key in text.split(",") if key.strip()]
    allowed = get_args(UsageBy)
    wrong = [key for key in keys if key not in allowed]
    if wrong or not keys:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}, comma-separated")
    return [cast(UsageBy, key) for key in dict.fromkeys(keys)]


REPORT_TIMEOUT_SECONDS = 600.0


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 printed, 1 the database is unavailable, 2 bad arguments or configuration."""
    try:
        url = load_settings(args.config).database_url
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(_usage(url, args.since, args.until, args.by, not args.all))
    except DatabaseUnavailable as exc:
        print(f"database {redact(url)} unavailable: {exc}", file=sys.stderr)
        return 1
    print(_as_json(rows, args) if args.json else _as_table(rows, args))
    return 0


async def _usage(
    url: str, since: float, until: float | None, by: list[UsageBy], answered_only: bool
) -> list[dict[str, Any]]:
    # A report sums a whole period: an operator waits for it longer than a request would.
    database = await connect(url, statement_timeout=REPORT_TIMEOUT_SECONDS)
    try:
        return await UsageStore(database).usage(since, until, by, answered_only)
    finally:
        await database.close()


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {name: sum(row[name] for row in rows) for name in _NUMBERS}


def _as_json(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    document = {
        "since": _iso(args.since),
        "until": _iso(args.until),
        "by": args.by,
        "answered_only": not args.all,
        "rows": rows,
        "total": _totals(rows),
    }
    return json.dumps(document, indent=2)


def _as_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Names left-aligned, numbers right-aligned with thousands separators, a total line at the bottom."""
    names = len(args.by)
    header = [*(key.upper() for key in args.by), *(name.replace("_", " ").upper() for name in _NUMBERS)]
    body = [[*(_name(row[key]) for key in args.by), *(f"{row[name]:,}" for name in _NUMBERS)] for row in rows]
    total = ["TOTAL", *([""] * (names - 1)), *(f"{value:,}" for value in _totals(rows).values())]
    widths = [max(len(line[column]) for line in (header, *body, total)) for column in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    counted = "every request" if args.all else "answered requests"
    period = f"{_iso(args.since)} to {_iso(args.until) or 'now'} (UTC), {counted}"
    lines = [
        period,
        _line(header, widths, names),
        rule,
        *(_line(line, widths, names) for line in body),
        rule,
        _line(total, widths, names),
    ]
    return "\n".join(lines)


def _name(value: str | None) -> str:
    return _NO_NAME if value is None else value


def _line(cells: list[str], widths: list[int], names: int) -> str:
    """Names left-aligned, numbers right-aligned."""
    aligned = [
        cell.ljust(width) if column < names else cell.rjust(width)
        for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(aligned).rstrip()
