"""Two Authorization headers are refused, whichever comes first, in the envelope of the route."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from multidict import CIMultiDict

from testing.services.nginx import NginxServer
from tests.conftest import (
    CHAT_MODEL,
    TOKENS,
    Server,
    auth,
    chat,
    free_port,
    start_gateway,
    write_gateway_config,
)
from tests.support import skip_without_nginx
from tests.test_routes import assert_openai_error, call


def two(first: str, second: str) -> CIMultiDict[str]:
    return CIMultiDict([("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")])


async def test_two_authorization_headers_are_400(gateway: Server, http: aiohttp.ClientSession) -> None:
    alice, bob = TOKENS["alice"], TOKENS["bob"]
    for headers in (two(alice, bob), two(bob, alice), two(alice, alice), two("forged", alice)):
        for method, path, body in [
            ("GET", "/whoami", None),
            ("POST", "/local/vllm/v1/chat/completions", chat()),
        ]:
            status, document, _ = await call(http, method, gateway.url + path, headers=headers, json=body)
            assert status == 400, (path, headers)
            error = assert_openai_error(document)
            assert error["code"] == "duplicate_authorization"
            assert alice not in error["message"] and bob not in error["message"]
    status, _, _ = await call(http, "GET", f"{gateway.url}/whoami", headers=auth())
    assert status == 200


async def test_on_the_messages_route_the_error_is_anthropic_shaped(
    gateway: Server, http: aiohttp.ClientSession
) -> None:
    body = {"model": CHAT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    url = f"{gateway.url}/local/vllm/v1/messages"
    status, document, _ = await call(
        http, "POST", url, headers=two(TOKENS["alice"], TOKENS["bob"]), json=body
    )
    assert status == 400
    assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error"


async def test_curl_sending_two_headers_is_refused(gateway: Server) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-w", "\n%{http_code}",
        "-H", f"Authorization: Bearer {TOKENS['alice']}", "-H", f"Authorization: Bearer {TOKENS['bob']}",
        f"{gateway.url}/whoami", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 10)
    assert output.decode().rsplit("\n", 1)[1] == "400"
    assert b"duplicate_authorization" in output


async def test_behind_the_shipped_nginx_too(backend: Server, tmp_path: Path) -> None:
    """nginx refuses a second Authorization header itself: in the same OpenAI shape, while the
    gateway's own 400s still pass through unchanged."""
    skip_without_nginx()
    runner, gateway = await start_gateway(write_gateway_config(tmp_path, backend.url))
    try:
        upstream = gateway.url.removeprefix("http://").removesuffix("/resource_server")
        nginx_dir = tmp_path / "nginx"
        async with (
            NginxServer(nginx_dir, [upstream], port=free_port()) as nginx,
            aiohttp.ClientSession() as http,
        ):
            url = f"{nginx.url}/resource_server/whoami"
            status, document, _ = await call(http, "GET", url, headers=two(TOKENS["alice"], TOKENS["bob"]))
            assert status == 400 and assert_openai_error(document)["code"] == "bad_request"
            assert (await call(http, "GET", url, headers=auth()))[0] == 200
            chat_url = f"{nginx.url}/resource_server/local/vllm/v1/chat/completions"
            status, document, _ = await call(http, "POST", chat_url, headers=auth(), json=chat(temperature=7))
            assert status == 400 and assert_openai_error(document, "temperature")["code"] != "bad_request"
    finally:
        await runner.cleanup()
