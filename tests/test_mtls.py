"""The data plane's certificates and contexts, over real TLS on loopback."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mtls.certificates import Issued, Role, create_ca, expires_at, issue, subject_of, write
from mtls.contexts import client_context, peer_subject, server_context
from testing.ports import free_port


def _files(tmp_path: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    certificate, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    write(issued, certificate, key)
    return certificate, key


@pytest.fixture
def site(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    ca = create_ca("Test Site CA", "Test Lab", days=30)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.certificate)
    files = {role.value: _files(tmp_path, role.value, issue(ca, role, role.value, days=10)) for role in Role}
    files["ca"] = (ca_file, ca_file)
    stranger = create_ca("Other CA", "Elsewhere", days=30)
    files["stranger"] = _files(tmp_path, "stranger", issue(stranger, Role.gateway, "gateway", days=10))
    return files


async def _serve(site: dict[str, tuple[Path, Path]]) -> tuple[web.AppRunner, int]:
    async def who(request: web.Request) -> web.Response:
        return web.Response(text=peer_subject(request.transport) or "")

    app = web.Application()
    app.router.add_get("/who", who)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    pilot_cert, pilot_key = site["pilot"]
    context = server_context(pilot_cert, pilot_key, site["ca"][0])
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port


async def _ask(site: dict[str, tuple[Path, Path]], who: str, port: int) -> str:
    certificate, key = site[who]
    context = client_context(certificate, key, site["ca"][0])
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/who", ssl=context) as answer,
    ):
        return await answer.text()


async def test_the_pilot_sees_each_clients_subject(site: dict[str, tuple[Path, Path]]) -> None:
    runner, port = await _serve(site)
    try:
        assert await _ask(site, "gateway", port) == "CN=gateway,O=Test Lab"
        assert await _ask(site, "metrics", port) == "CN=metrics,O=Test Lab"
    finally:
        await runner.cleanup()


async def test_a_client_without_a_certificate_or_from_another_ca_is_refused(
    site: dict[str, tuple[Path, Path]],
) -> None:
    runner, port = await _serve(site)
    try:
        with pytest.raises(aiohttp.ClientError):
            await _ask(site, "stranger", port)
        bare = ssl.create_default_context(cafile=str(site["ca"][0]))
        bare.check_hostname = False
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"https://127.0.0.1:{port}/who", ssl=bare) as answer:
                    await answer.read()
    finally:
        await runner.cleanup()


async def test_a_client_certificate_cannot_serve_as_a_pilot(
    site: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """The metrics identity's clientAuth usage keeps it from posing as a pilot to the gateway."""
    impostor = {**site, "pilot": site["metrics"]}
    runner, port = await _serve(impostor)
    try:
        with pytest.raises(aiohttp.ClientError):
            await _ask(site, "gateway", port)
    finally:
        await runner.cleanup()


def test_subject_and_expiry_are_read_back(site: dict[str, tuple[Path, Path]]) -> None:
    certificate, _ = site["gateway"]
    assert subject_of(certificate.read_bytes()) == "CN=gateway,O=Test Lab"
    assert expires_at(certificate) > expires_at(site["pilot"][0]).replace(year=2000)
    assert site["pilot"][1].stat().st_mode & 0o777 == 0o600
