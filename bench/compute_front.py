"""The compute baseline behind the least HTTP front: bench.compute_client's submissions and results,
served to the same load generator as the gateway.

    python -m bench.compute_front --service FILE --port P [--threads T] [--timeout S] [--result-queue]

`POST /resource_server/hpc/vllm/v1/chat/completions` takes the client's body, submits it as the
gateway would (the same payload, through `bench.compute_client.Compute`: coalesced V3 submissions
gathered for the gateway's `BURST_WINDOW_SECONDS` while another is on the wire, one poller, the AMQP
result queue with `--result-queue`) and answers the function's result as it came. No
authentication, validation, records or metrics.

Why a second baseline. bench.compute_client drives itself, so during its measure CPU 0 holds only the
fake service (and its broker); through the gateway, CPU 0 also holds the load generator. When CPU 0 is
the limit (at 100 and 1,000 requests in flight it is 90-99% busy) the difference between the two then
counts the load generator's share of CPU 0, which is not the gateway's. This front puts the load
generator on CPU 0 in both measures, so that what remains is what the gateway itself adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Final

import globus_sdk
from aiohttp import web

from adaptors.compute_submit import BURST_WINDOW_SECONDS
from bench.compute_client import (
    API_PORT,
    DEFAULT_THREADS,
    Compute,
    Service,
    TaskFailed,
    bounded,
)
from bench.compute_config import COMPUTE_PATH
from bench.loadgen import MAX_DURATION
from testing.loops import new_event_loop

COMPUTE: Final = web.AppKey("compute", Compute)
TIMEOUT: Final = web.AppKey("timeout", float)


async def chat(request: web.Request) -> web.Response:
    """The gateway's answer to a client is the function's result, which is already JSON text."""
    params = {**json.loads(await request.read()), "openai_endpoint": "chat/completions", "api_port": API_PORT}
    compute = request.app[COMPUTE]
    try:
        task_id = await compute.submit(params)
        value = await asyncio.wait_for(compute.result(task_id), request.app[TIMEOUT])
    except (globus_sdk.GlobusError, TaskFailed, TimeoutError) as exc:
        return web.json_response({"error": {"message": type(exc).__name__}}, status=502)
    return web.Response(body=str(value).encode(), content_type="application/json")


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(compute: Compute, timeout: float) -> web.Application:
    app = web.Application()
    app[COMPUTE] = compute
    app[TIMEOUT] = timeout

    async def close(_app: web.Application) -> None:
        await compute.close()

    app.on_cleanup.append(close)
    app.router.add_post(COMPUTE_PATH, chat)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--service", type=Path, required=True, help="the fake's announcement (JSON)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=bounded(1, 512, int), default=DEFAULT_THREADS)
    parser.add_argument("--timeout", type=bounded(0.1, MAX_DURATION), default=60.0, help="per request")
    parser.add_argument("--result-queue", action="store_true", help="results from the fake's AMQP queue")
    args = parser.parse_args(argv)
    loop = new_event_loop()
    compute = Compute(
        Service.load(args.service),
        threads=args.threads,
        poll_interval=0.0,
        timeout=args.timeout,
        result_queue=args.result_queue,
        burst_window=BURST_WINDOW_SECONDS,
    )
    app = create_app(compute, args.timeout)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
