"""Streams to several targets in turn from one load generator: short segments, rotating order.

    python -m bench.segments --target NAME URL [--target NAME URL ...] [--bearer NAME TOKEN]
        --body JSON|@FILE [--concurrency C] [--spread S] [--rounds R] [--seconds S] [--warmup N]

Each round gives every target one segment: `--warmup` streams, then `--seconds` of streams kept
`--concurrency` at a time, timed as `bench.loadgen` times them. Round r starts with target r (mod
the number of targets), so no target always follows the same one. It prints one JSON object: for
each target, one `bench.loadgen` summary per round.

Why not one load generator process per measure: 16 paced streams started together stay in step, and
a first chunk's time is mostly its place in their burst; a measure's median first chunk then moves by
a millisecond from one measure to the next, more than the gateway adds. Segments taken in turn by one
process, a few seconds apart, see the same process and the same minutes of the host, so each round's
differences between targets are paired, and more rounds fit in the same time (docs/performance.md,
2026-12-05 19:59).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Final

from bench.loadgen import (
    MAX_REQUESTS,
    WARMUP_SECONDS,
    Budget,
    Target,
    int_at_least,
    new_session,
    positive_float,
    print_result,
    read_body,
    run_phase,
    spread_seconds,
    summarize,
    target_of,
)

MAX_ROUNDS: Final = 100


def rotated(names: list[str], round_index: int) -> list[str]:
    """The order of one round's segments."""
    start = round_index % len(names)
    return names[start:] + names[:start]


async def segments(
    targets: dict[str, Target],
    *,
    concurrency: int,
    spread: float,
    rounds: int,
    seconds: float,
    warmup: int,
    timeout: float,
) -> dict[str, list[dict[str, Any]]]:
    """Each target's summaries in the order of the rounds. A segment's warm-up streams are not
    counted: they take the first burst on a server that sat idle through the other segments."""
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    async with new_session(timeout) as session:
        for round_index in range(rounds):
            for name in rotated(list(targets), round_index):
                target = targets[name]
                if warmup:
                    warm = Budget(warmup, time.perf_counter() + WARMUP_SECONDS)
                    await run_phase(
                        session, target, concurrency=concurrency, budget=warm, stream=True, spread=spread
                    )
                budget = Budget(MAX_REQUESTS, time.perf_counter() + seconds)
                tally, elapsed = await run_phase(
                    session, target, concurrency=concurrency, budget=budget, stream=True, spread=spread
                )
                measured[name].append({"concurrency": concurrency, **summarize(tally, elapsed, stream=True)})
    return measured


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--target", nargs=2, action="append", required=True, metavar=("NAME", "URL"), help="repeat for each"
    )
    parser.add_argument(
        "--bearer", nargs=2, action="append", default=[], metavar=("NAME", "TOKEN"), help="a target's token"
    )
    parser.add_argument("--body", required=True, help="JSON request body, or @FILE")
    parser.add_argument("--concurrency", type=int_at_least(1), default=16)
    parser.add_argument("--spread", type=spread_seconds, default=0.0, help="start the streams over this time")
    parser.add_argument("--rounds", type=int_at_least(1), default=12)
    parser.add_argument("--seconds", type=positive_float, default=2.0, help="of each segment")
    parser.add_argument("--warmup", type=int_at_least(0), default=16, help="streams before each segment")
    parser.add_argument("--timeout", type=positive_float, default=60.0, help="per request")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.target]
    if len(set(names)) != len(names):
        parser.error("each --target needs a name of its own")
    if unknown := {name for name, _ in args.bearer} - set(names):
        parser.error(f"--bearer names no --target: {', '.join(sorted(unknown))}")
    if args.rounds > MAX_ROUNDS:
        parser.error(f"--rounds must be at most {MAX_ROUNDS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    body = read_body(args.body)
    tokens = dict(args.bearer)
    targets = {name: target_of(url, tokens.get(name), body) for name, url in args.target}
    work = segments(
        targets,
        concurrency=args.concurrency,
        spread=args.spread,
        rounds=args.rounds,
        seconds=args.seconds,
        warmup=args.warmup,
        timeout=args.timeout,
    )
    print_result(work)


if __name__ == "__main__":
    main()
