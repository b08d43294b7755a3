"""The gateway behind a real nginx running the shipped proxying rules (deploy/nginx/): streams are not
held back, oversized bodies are refused in OpenAI's shape, and the request log names the real client.

Clients reach nginx from 127.0.0.2 while nginx reaches the gateway from 127.0.0.1, the only address
the gateway trusts as a proxy, so the address each record names shows who it was believed to be.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from testing.fake_vllm import REQUESTS
from testing.services.nginx import SHIPPED_LOCATIONS, SHIPPED_SITE, NginxServer, nginx_binary
from tests.support import (
    CHAT_MODEL,
    IN_CI,
    TOKENS,
    Server,
    auth,
    chat,
    free_port,
    self_signed_certificate,
    start_gateway,
    stdout_lines,
    write_gateway_config,
)

ROOT = Path(__file__).resolve().parent.parent
if nginx_binary() is None and not IN_CI:
    pytest.skip(
        "nginx is not installed (Debian package nginx, which .ci/run installs); in CI this fails instead",
        allow_module_level=True,
    )

CLIENT_ADDRESS = "127.0.0.2"
BASE = "/resource_server"
CHAT_PATH = f"{BASE}/local/vllm/v1/chat/completions"
MIB = 1024 * 1024
COMPLAINTS = re.compile(r"\[(warn|alert|crit|emerg)\]")
"""What nginx would log about its configuration or its own trouble, as opposed to clients' errors."""


@dataclass
class Proxied:
    nginx: NginxServer
    gateway: Server

    @property
    def chat_url(self) -> str:
        return f"{self.nginx.url}{CHAT_PATH}"


@pytest.fixture
async def proxied(backend: Server, tmp_path: Path) -> AsyncIterator[Proxied]:
    """The gateway trusts nginx's address only, and accepts bodies beyond nginx's limit, so that a 413
    can only be nginx's."""
    config = write_gateway_config(tmp_path, backend.url, max_body_bytes=64 * MIB)
    document = yaml.safe_load(config.read_text())
    document["request_log"] = {"trusted_proxies": ["127.0.0.1/32"]}
    config.write_text(yaml.safe_dump(document))
    runner, gateway = await start_gateway(config)
    try:
        upstream = gateway.url.removeprefix("http://").removesuffix(BASE)
        async with NginxServer(tmp_path / "nginx", [upstream], port=free_port()) as nginx:
            yield Proxied(nginx=nginx, gateway=gateway)
    finally:
        await runner.cleanup()
    assert not COMPLAINTS.search(nginx.error_log), nginx.error_log


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client on another loopback address than nginx's own."""
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_ADDRESS, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


def records(lines: list[str]) -> dict[str, dict[str, Any]]:
    """The gateway's request records on stdout, by request id."""
    documents = (json.loads(line) for line in lines if line.startswith("{"))
    return {document["request_id"]: document for document in documents if "request_id" in document}


async def stream_timings(client: aiohttp.ClientSession, url: str) -> tuple[list[float], float]:
    """When each event of a five-chunk, two-second stream arrived, and when the stream ended."""
    body = chat("[[chunks=5]] [[chunk_delay=0.5]]", stream=True)
    started = time.monotonic()
    arrivals = []
    async with client.post(url, json=body, headers=auth()) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async for line in response.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic() - started)
    return arrivals, time.monotonic() - started


def assert_not_held_back(arrivals: list[float], ended: float) -> None:
    assert ended >= 2.0, "five chunks half a second apart"
    assert arrivals[0] < 1.0, f"the first chunk was held back: {arrivals}"
    assert ended - arrivals[0] >= 1.5


async def test_stream_chunks_pass_nginx_while_the_backend_still_generates(
    proxied: Proxied, client: aiohttp.ClientSession
) -> None:
    assert_not_held_back(*await stream_timings(client, proxied.chat_url))


async def test_the_shipped_rules_alone_do_not_buffer_streams(
    backend: Server, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """nginx straight in front of the fake backend, as in the "nginx alone" benchmark: unlike the gateway,
    the backend does not send `X-Accel-Buffering: no`, so here the shipped rules alone pass chunks on."""
    upstream = backend.url.removeprefix("http://")
    async with NginxServer(tmp_path, [upstream], port=free_port()) as nginx:
        assert_not_held_back(*await stream_timings(client, f"{nginx.url}/v1/chat/completions"))


async def test_oversized_body_is_refused_by_nginx_in_openai_shape(
    proxied: Proxied, client: aiohttp.ClientSession, backend: Server
) -> None:
    body = b'{"model": "m", "messages": [], "pad": "' + b"x" * (21 * MIB) + b'"}'
    headers = {**auth(), "Content-Type": "application/json"}
    async with client.post(proxied.chat_url, data=body, headers=headers) as response:
        assert response.status == 413
        assert response.content_type == "application/json"
        error = (await response.json())["error"]
        assert "X-Request-ID" not in response.headers, "the gateway never saw it"
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert not backend.app[REQUESTS]


async def test_the_record_names_the_client_and_the_request_id_comes_back(
    proxied: Proxied, client: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    headers = {**auth(), "X-Request-ID": "through-nginx-1"}
    async with client.post(proxied.chat_url, json=chat(), headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Request-ID"] == "through-nginx-1"
    async with client.post(proxied.chat_url, json=chat(stream=True), headers=auth()) as response:
        await response.read()
        generated = response.headers["X-Request-ID"]
    seen = records(await stdout_lines(capfd, until=lambda lines: len(records(lines)) >= 2))
    assert seen["through-nginx-1"]["client_ip"] == CLIENT_ADDRESS
    assert seen[generated]["client_ip"] == CLIENT_ADDRESS and seen[generated]["stream"] is True


async def test_a_forged_forwarded_for_is_not_believed(
    proxied: Proxied, client: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    """Also from a user on the proxy's own address: appending to the client's header instead of
    replacing it would let them choose the recorded address."""
    forged = {**auth(), "X-Forwarded-For": "203.0.113.9"}
    async with client.post(proxied.chat_url, json=chat(), headers={**forged, "X-Request-ID": "forged-1"}):
        pass
    async with (
        aiohttp.ClientSession() as local,
        local.post(proxied.chat_url, json=chat(), headers={**forged, "X-Request-ID": "forged-2"}),
    ):
        pass
    seen = records(
        await stdout_lines(capfd, until=lambda lines: {"forged-1", "forged-2"} <= set(records(lines)))
    )
    assert seen["forged-1"]["client_ip"] == CLIENT_ADDRESS
    assert seen["forged-2"]["client_ip"] == "127.0.0.1"


async def test_openai_client_through_nginx(proxied: Proxied) -> None:
    base_url = f"{proxied.nginx.url}{BASE}/local/vllm/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKENS["alice"], max_retries=0) as api:
        answer = await api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.total_tokens > 0


async def test_metrics_stay_off_the_public_side(proxied: Proxied, client: aiohttp.ClientSession) -> None:
    """The gateway lets scrapers in by address, and behind nginx every request has nginx's address."""
    async with client.get(f"{proxied.nginx.url}/metrics") as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"
    async with client.get(f"{proxied.gateway.url.removesuffix(BASE)}/metrics") as response:
        assert response.status == 200


async def test_a_gateway_that_is_down_answers_502_in_openai_shape(tmp_path: Path) -> None:
    async with (
        NginxServer(tmp_path, [f"127.0.0.1:{free_port()}"], port=free_port()) as nginx,
        aiohttp.ClientSession() as http,
        http.post(f"{nginx.url}{CHAT_PATH}", json=chat(), headers=auth()) as response,
    ):
        assert response.status == 502
        error = (await response.json())["error"]
    assert error["type"] == "upstream_error" and error["code"] == "gateway_unreachable"


def test_the_shipped_site_passes_nginx_t(tmp_path: Path) -> None:
    """The site file as shipped, with only the paths of this machine put in."""
    binary = nginx_binary()
    assert binary is not None, "nginx is not installed"
    certificate, key = self_signed_certificate(tmp_path)
    site = SHIPPED_SITE.read_text()
    for placeholder, path in {
        "/etc/ssl/inference-gateway/fullchain.pem": certificate,
        "/etc/ssl/inference-gateway/privkey.pem": key,
        "/etc/nginx/inference-gateway/gateway-locations.conf": SHIPPED_LOCATIONS,
        "/var/log/nginx/": f"{tmp_path}/",
    }.items():
        assert placeholder in site
        site = site.replace(placeholder, str(path))
    (tmp_path / "site.conf").write_text(site)
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n    include {tmp_path}/site.conf;\n}}\n"
    )
    error_log = tmp_path / "error.log"
    command = [binary, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(error_log)]
    checked = subprocess.run(command, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    assert "[warn]" not in checked.stderr and "[emerg]" not in checked.stderr, checked.stderr


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze also checks that the command exists: this checkout's stands in for /opt's."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "deploy" / "inference-gateway.service").read_text()
    installed = "/opt/inference-gateway/venv/bin/inference-gateway"
    assert f"ExecStart={installed} --config /etc/inference-gateway/gateway.yaml --workers 2" in unit
    local = Path(sys.executable).parent / "inference-gateway"
    (tmp_path / "inference-gateway.service").write_text(unit.replace(installed, str(local)))
    checked = subprocess.run(
        [analyze, "verify", str(tmp_path / "inference-gateway.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
        checked.stdout + checked.stderr
    )
