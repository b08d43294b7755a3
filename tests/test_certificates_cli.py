"""`inference-gateway certificates`: a site CA and the three identities, usable as made for real
mutual TLS, printed with the subjects a pilot's configuration names, never overwriting a file."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtls.contexts import client_context, peer_subject, server_context
from proxy.process.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["certificates", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """A CA and one certificate of each role; the subject each command printed, by role."""
    code, out, _ = _run(capsys, "ca", "--dir", str(tmp_path / "ca"), "--organization", "Test Lab")
    assert code == 0
    subjects = {"ca": re.findall(r"subject: (.+)", out)[0]}
    for role in ("pilot", "gateway", "metrics"):
        code, out, err = _run(
            capsys,
            "issue",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--role",
            role,
            "--name",
            f"{role}-1",
            "--out-dir",
            str(tmp_path / "tls"),
            "--days",
            "30",
        )
        assert code == 0, err
        subjects[role] = re.findall(r"subject: (.+)", out)[0]
    return subjects


def test_the_ca_and_each_role_are_written_with_private_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subjects = _site(tmp_path, capsys)
    assert subjects == {
        "ca": "CN=Inference Gateway Site CA,O=Test Lab",
        "pilot": "CN=pilot-1,O=Test Lab",
        "gateway": "CN=gateway-1,O=Test Lab",
        "metrics": "CN=metrics-1,O=Test Lab",
    }
    for key in [tmp_path / "ca" / "ca.key", *(tmp_path / "tls").glob("*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    usages = {}
    for role in ("pilot", "gateway", "metrics"):
        certificate = x509.load_pem_x509_certificate((tmp_path / "tls" / f"{role}-1.pem").read_bytes())
        usages[role] = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        with pytest.raises(x509.ExtensionNotFound):  # no host name: compute nodes have none that lasts
            certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert 29 < (certificate.not_valid_after_utc - certificate.not_valid_before_utc).days <= 30
    assert usages == {
        "pilot": [ExtendedKeyUsageOID.SERVER_AUTH],
        "gateway": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "metrics": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }


async def test_the_printed_subject_is_the_one_a_pilot_sees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subjects = _site(tmp_path, capsys)
    tls, ca = tmp_path / "tls", tmp_path / "ca" / "ca.pem"

    async def who(request: web.Request) -> web.Response:
        return web.Response(text=peer_subject(request.transport) or "")

    app = web.Application()
    app.router.add_get("/who", who)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(
        runner, "127.0.0.1", 0, ssl_context=server_context(tls / "pilot-1.pem", tls / "pilot-1.key", ca)
    )
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            for role in ("gateway", "metrics"):
                context = client_context(tls / f"{role}-1.pem", tls / f"{role}-1.key", ca)
                async with session.get(f"https://127.0.0.1:{port}/who", ssl=context) as answer:
                    assert await answer.text() == subjects[role]
    finally:
        await runner.cleanup()


def test_existing_files_are_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _site(tmp_path, capsys)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*.*")}
    code, _, err = _run(capsys, "ca", "--dir", str(tmp_path / "ca"))
    assert code == 1 and "ca.pem and" in err and "nothing was overwritten" in err
    argv = ["--ca-dir", str(tmp_path / "ca"), "--role", "gateway", "--out-dir", str(tmp_path / "tls")]
    code, _, err = _run(capsys, "issue", *argv, "--name", "gateway-1")
    assert code == 1 and "gateway-1.pem" in err
    (tmp_path / "tls" / "gateway-1.pem").unlink()
    code, _, err = _run(capsys, "issue", *argv, "--name", "gateway-1")
    assert code == 1 and "gateway-1.key already exists" in err
    assert not (tmp_path / "tls" / "gateway-1.pem").exists()
    del before[tmp_path / "tls" / "gateway-1.pem"]
    assert {path: path.read_bytes() for path in tmp_path.rglob("*.*")} == before


def test_refusals_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "ca", "--dir", str(tmp_path / "ca"), "--days", "10")
    assert code == 0
    common = ["--ca-dir", str(tmp_path / "ca"), "--role", "pilot", "--out-dir", str(tmp_path / "tls")]
    code, _, err = _run(capsys, "issue", *common, "--name", "pilot", "--days", "20")
    assert code == 1 and "the CA expires at" in err and not (tmp_path / "tls" / "pilot.pem").exists()
    code, _, err = _run(capsys, "issue", *common, "--name", "../pilot")
    assert code == 2 and "letters, digits" in err
    code, _, err = _run(capsys, "issue", *common[2:], "--ca-dir", str(tmp_path / "nowhere"), "--name", "p")
    assert code == 1 and "cannot read the CA" in err and "nowhere" in err
    code, _, err = _run(capsys, "issue", *common, "--name", "pilot", "--role", "admin")
    assert code == 2 and "invalid choice: 'admin'" in err
