"""The least a callback relay can do, as the baseline (the floor) for the gateway's relay.

    python -m bench.relay_floor --port P

`POST /stream/{id}` answers server-sent events made of whatever arrives for that id on the gateway's
callback routes (`/resource_server/api/streaming/data/` and `/done/`, same bodies), with none of the
gateway's checks: no secret, no stream token, no limits beyond a bounded queue. Pinned where the gateway
runs and fed by the same function on the same CPU, it shows what the machine itself costs a relayed
chunk (two loopback HTTP hops, the wake-ups of three processes, two CPUs that the fake service, the
function's threads and the client share), so that the gateway's figures can be read against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Final

from aiohttp import web

from testing.loops import new_event_loop

CALLBACK_PATH: Final = "/resource_server/api/streaming/"
MAX_QUEUED: Final = 1000
"""The gateway's default `streaming.max_queued_chunks`: a fast sender waits for a slow reader alike."""
END: Final = b""

QUEUES: Final = web.AppKey("queues", dict[str, "asyncio.Queue[bytes]"])


def queue_for(request: web.Request, stream_id: str) -> asyncio.Queue[bytes]:
    """Whichever side comes first creates the stream's queue, so no chunk is lost to a race."""
    return request.app[QUEUES].setdefault(stream_id, asyncio.Queue(MAX_QUEUED))


async def stream(request: web.Request) -> web.StreamResponse:
    stream_id = request.match_info["stream_id"]
    queue = queue_for(request, stream_id)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        while (events := await queue.get()) != END:
            await response.write(events)
        await response.write_eof()
    finally:
        request.app[QUEUES].pop(stream_id, None)
    return response


async def data(request: web.Request) -> web.Response:
    """Each line of `data` becomes one event, as in the gateway's relay."""
    body = json.loads(await request.read())
    lines = (line.strip() for line in str(body["data"]).split("\n"))
    await queue_for(request, body["task_id"]).put(b"".join(line.encode() + b"\n\n" for line in lines if line))
    return web.json_response({"status": "received", "task_id": body["task_id"]})


async def done(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    await queue_for(request, body["task_id"]).put(END)
    return web.json_response({"status": "received", "task_id": body["task_id"]})


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app() -> web.Application:
    app = web.Application()
    app[QUEUES] = {}
    app.router.add_post("/stream/{stream_id}", stream)
    app.router.add_post(CALLBACK_PATH + "data/", data)
    app.router.add_post(CALLBACK_PATH + "done/", done)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        create_app(), host="127.0.0.1", port=args.port, access_log=None, print=None, loop=new_event_loop()
    )


if __name__ == "__main__":
    main()
