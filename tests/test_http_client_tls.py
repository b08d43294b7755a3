"""The gateway's HTTP client over real TLS on loopback: a self-signed server is trusted through the
context the adaptor gives, with its host name checked, and refused under the default verification
as a TLS failure (the peer answered: not "unreachable", so no other replica is tried for it)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adaptors.forwarding import unreachable
from adaptors.http_client import HTTPClient
from adaptors.http_wire import TLSFailed
from tests.test_http_client import Raw, whole


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopback")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = folder / "server.pem", folder / "server.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certificate_file, key_file


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[Raw, Path]]:
    certificate, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    server = Raw()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=context)
    server.url = f"https://127.0.0.1:{listening.sockets[0].getsockname()[1]}/v1/x"
    yield server, certificate
    listening.close()


async def test_a_server_trusted_through_the_context_given(tls_server: tuple[Raw, Path]) -> None:
    server, certificate = tls_server
    http = HTTPClient(4, ssl.create_default_context(cafile=str(certificate)))
    try:
        for _ in range(3):
            answer = await http.fetch("POST", server.url, b"{}", timeout=5, limit=whole)
            assert (answer.status, answer.body) == (200, b"ok")
        assert server.connections == 1
    finally:
        await http.close()


async def test_an_untrusted_server_is_refused_before_anything_is_sent(tls_server: tuple[Raw, Path]) -> None:
    server, _ = tls_server
    http = HTTPClient(4)
    try:
        with pytest.raises(TLSFailed) as refused:
            await http.fetch("POST", server.url, b"{}", timeout=5, limit=whole)
    finally:
        await http.close()
    assert refused.value.shown == "ClientConnectorCertificateError"
    assert not unreachable(refused.value)
    assert not server.heads
