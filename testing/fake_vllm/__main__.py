"""`python -m testing.fake_vllm`: the fake backend as a server of its own (`make run`, benchmarks)."""

from __future__ import annotations

import argparse
import time

from aiohttp import web

from testing.fake_vllm import create_backend_app
from testing.loops import new_event_loop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testing.fake_vllm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--cluster", default="local", help="cluster name reported by /jobs")
    parser.add_argument("--model", action="append", default=[], help="a model to list (repeatable)")
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=0,
        help="wait this long before listening, as vLLM listens only once its model is loaded",
    )
    args = parser.parse_args(argv)
    time.sleep(args.load_seconds)
    web.run_app(
        create_backend_app(cluster=args.cluster, models=args.model),
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        backlog=4096,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
