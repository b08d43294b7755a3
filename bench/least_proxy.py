"""The least aiohttp proxy: the floor under the gateway's time to a first chunk, measured beside it.

    python -m bench.least_proxy --port P --backend URL

`POST /resource_server/local/vllm/v1/chat/completions` reads the client's body, sends it to the
backend with the gateway's own HTTP client (adaptors/http_client.py) and relays the answer piece by
piece, its headers leaving with the first piece as the gateway's streams do. Nothing else: no
authentication, validation, usage, records or metrics; a backend it cannot reach is aiohttp's 500.

Why it is measured. Issue 20 bounds the gateway's added time to a first chunk, 16 streams started
together, at 0.5 ms, and in that burst every stream start waits for the CPU of those before it. Run
on the gateway's CPU in the same rounds, this proxy says what any aiohttp server with this client
adds there; the gateway's figure less this one is what its own checks and accounting add.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from adaptors.http_client import HTTPClient
from bench.alternating import GATEWAY_PATH
from testing.loops import new_event_loop

CLIENT: Final = web.AppKey("client", HTTPClient)
BACKEND: Final = web.AppKey("backend", str)
CONNECTIONS: Final = 100
TIMEOUT_SECONDS: Final = 60.0


class _HeldHeaders(web.StreamResponse):
    """Headers sent with the first piece, in one segment, as the gateway's `_SSEResponse` does."""

    _send_headers_immediately = False


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    answer = await request.app[CLIENT].stream("POST", request.app[BACKEND], body, timeout=TIMEOUT_SECONDS)
    response = _HeldHeaders(
        status=answer.status, headers={"Content-Type": answer.head.header("content-type") or "text/plain"}
    )
    try:
        while (piece := await answer.next_piece()) is not None:
            if not response.prepared:
                await response.prepare(request)
            await response.write(piece)
    finally:
        answer.close()
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build(backend: str) -> web.Application:
    app = web.Application()
    app[BACKEND] = backend
    app.router.add_post(GATEWAY_PATH, relay)
    app.router.add_get("/resource_server/health", health)

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = HTTPClient(CONNECTIONS, None, {"Content-Type": "application/json"})
        yield
        await app[CLIENT].close()

    app.cleanup_ctx.append(client)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="the backend's chat completions URL")
    args = parser.parse_args()
    app = build(args.backend)
    web.run_app(app, host="127.0.0.1", port=args.port, loop=new_event_loop(), access_log=None, print=None)


if __name__ == "__main__":
    main()
