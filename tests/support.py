"""Shared test helpers: the users and models of the test configuration, real servers on loopback,
and gateway configuration files. Fixtures built on them are in conftest.py."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from proxy.process.app import create_app, load_parts
from proxy.settings import load_settings
from testing.ports import free_port
from testing.services.nginx import nginx_binary

CHAT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
EMBED_MODEL = "intfloat/e5-small-v2"
PRIVATE_MODEL = "private/Model-G"

TOKENS = {
    "alice": "alice-token-0001",
    "bob": "bob-token-00002",
}
USERS = {
    "alice": {
        "id": "a1a1a1a1-0000-4000-8000-000000000001",
        "username": "alice@uni.edu",
        "name": "Alice",
        "groups": ["11111111-1111-4111-8111-111111111111"],
    },
    "bob": {"id": "b0b0b0b0-0000-4000-8000-000000000002", "username": "bob@other.org", "name": "Bob"},
}


@dataclass
class Server:
    url: str
    app: web.Application


async def start(app: web.Application, port: int = 0, **timeouts: float) -> tuple[web.AppRunner, str]:
    """The same runner options as `inference-gateway` uses in production; a gateway's `timeouts`
    (keep-alive, shutdown) are its settings' (start_gateway)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, **timeouts)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def write_yaml(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def endpoint(cluster: str, model: str, api_url: str, **extra: Any) -> dict[str, Any]:
    entry = {
        "cluster": cluster,
        "framework": "vllm",
        "model": model,
        "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
        "config": {"api_url": api_url, **extra.pop("config", {})},
    }
    return {**entry, **extra}


def write_gateway_config(directory: Path, backend_url: str, **server: Any) -> Path:
    api = f"{backend_url}/v1"
    everything = ["chat/completions", "completions", "embeddings", "responses", "messages"]
    clusters = [
        {
            "cluster_name": "local",
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm"],
            "openai_endpoints": everything,
            "config": {"status_url": f"{backend_url}/jobs"},
        },
        {
            "cluster_name": "uni",
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm"],
            "openai_endpoints": everything,
            "allowed_domains": ["uni.edu"],
            "config": {"status_url": f"{backend_url}/jobs"},
        },
        {
            "cluster_name": "chatonly",
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm", "sglang"],
            "openai_endpoints": ["/chat/completions/"],
            "config": {"status_url": f"{backend_url}/jobs"},
        },
    ]
    endpoints = [
        endpoint("local", CHAT_MODEL, api),
        endpoint("local", EMBED_MODEL, api),
        endpoint("local", PRIVATE_MODEL, api, allowed_globus_groups=USERS["alice"]["groups"][0]),
        endpoint("local", "dead/model", closed_port_url()),
        endpoint("local", "slow/model", api, config={"api_request_timeout": 0.5}),
        endpoint("uni", CHAT_MODEL, api),
        endpoint("chatonly", CHAT_MODEL, api),
    ]
    tokens = {"tokens": [{"token": TOKENS[name], "user": USERS[name]} for name in TOKENS]}
    write_yaml(directory / "clusters.yaml", clusters)
    write_yaml(directory / "endpoints.yaml", endpoints)
    write_yaml(directory / "tokens.yaml", tokens)
    return write_yaml(
        directory / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0, **server},
            "timeouts": {"jobs_cache_seconds": 60},
            "limits": {"requests_per_second": 0, "concurrent_per_user": 0},
            "auth": {"provider": "static", "static": {"tokens_file": "tokens.yaml"}},
            "endpoints_file": "endpoints.yaml",
            "clusters_file": "clusters.yaml",
        },
    )


async def start_gateway(config: Path) -> tuple[web.AppRunner, Server]:
    """Start-up checks may call (fake) Globus synchronously, as before serving in production; a
    thread keeps them off this event loop, where the fakes run."""
    settings = load_settings(config)
    registry, authenticator = await asyncio.to_thread(load_parts, settings)
    runner, url = await start(
        create_app(settings, registry, authenticator),
        settings.server.port,
        keepalive_timeout=settings.timeouts.keepalive_seconds,
        shutdown_timeout=settings.timeouts.shutdown_seconds,
    )
    return runner, Server(url=f"{url}{settings.server.base_path}", app=runner.app)


def auth(user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


def chat(content: str = "Hello", model: str = CHAT_MODEL, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels (parsed by prometheus-client)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= set(ls))


async def summed_value(
    http: aiohttp.ClientSession, url: str, name: str, expected: float, timeout: float = 5.0, **labels: str
) -> float:
    """A metric scraped from ``url`` once it reaches ``expected`` (or ``timeout`` passes): worker
    processes share their values with each other once a second."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(url) as response:
            assert response.status == 200
            found = value(await response.text(), name, **labels)
        if found == expected or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


class CapturedOutput(Protocol):
    def readouterr(self) -> Any: ...


async def stdout_lines(
    capfd: CapturedOutput, until: Callable[[list[str]], bool], timeout: float = 2.0
) -> list[str]:
    """What the gateway has written to stdout once ``until`` holds (or ``timeout`` passes): request
    records leave in batches, up to ``RECORD_DELAY_SECONDS`` after their request has ended."""
    output = ""
    deadline = time.monotonic() + timeout
    while True:
        output += capfd.readouterr().out
        lines = output.splitlines()
        if until(lines) or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key, as PEM files in ``directory``:
    with `cryptography`, which globus-sdk requires, so tests need no other tool."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    certificate_path, key_path = directory / "certificate.pem", directory / "key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certificate_path, key_path


IN_CI = os.environ.get("CI", "").lower() in {"true", "1"}
"""CI installs every Debian package the tests use (`make test`): there a missing one fails its test
instead of skipping it, so a broken install step cannot pass unseen."""


def skip_without_nginx() -> None:
    """Outside CI, a developer without nginx skips the tests that run it; in CI they fail."""
    if nginx_binary() is None and not IN_CI:
        pytest.skip("nginx is not installed (Debian package nginx, which make test installs)")
