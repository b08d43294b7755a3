"""`inference-gateway token`: a researcher logs in with Globus's native-app flow, gets tokens the gateway
accepts, has them refreshed when they expire, and logs out (revoked at Globus). The real command in a
subprocess and the real globus-sdk, against the fake Globus Auth; the gateway under test introspects the
tokens it hands out."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.identities import FakeUser
from tests.conftest import Server, start_gateway
from tests.test_globus_auth import globus_config

LOGIN_CLIENT = "5a0c6f0e-2b41-4a53-9a64-7d1c2a3b4c5d"
CAROL = FakeUser.single("carol@uni.edu", name="Carol")


@pytest.fixture
async def fake() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as running:
        running.logins.native_clients.add(LOGIN_CLIENT)
        yield running


@pytest.fixture
async def gateway(backend: Server, fake: FakeGlobus, tmp_path: Path) -> AsyncIterator[Server]:
    runner, server = await start_gateway(globus_config(tmp_path, backend, fake))
    yield server
    await runner.cleanup()


def environment(fake: FakeGlobus, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(home),
        "GLOBUS_SDK_SERVICE_URL_AUTH": fake.auth_url,
        "INFERENCE_GATEWAY_CLIENT_ID": LOGIN_CLIENT,
        "INFERENCE_GATEWAY_SCOPE": fake.scope,
    }


async def token(fake: FakeGlobus, home: Path, action: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "token", action,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment(fake, home),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 30)
    assert process.returncode is not None
    return process.returncode, out.decode().strip(), err.decode()


async def login(fake: FakeGlobus, home: Path, user: FakeUser) -> None:
    """Reads the authorize URL the command prints, signs in there as `user`, pastes the code."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "token", "login",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment(fake, home),
    )  # fmt: skip
    assert process.stderr is not None and process.stdin is not None
    url = ""
    while not url.startswith("http"):
        url = (await asyncio.wait_for(process.stderr.readline(), 30)).decode().strip()
    assert "/v2/oauth2/authorize?" in url and "code_challenge_method=S256" in url
    assert "access_type=offline" in url, "refresh tokens are requested"
    process.stdin.write(fake.logins.approve(url, user).encode() + b"\n")
    await process.stdin.drain()
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()


async def whoami(gateway: Server, access_token: str) -> tuple[int, str | None]:
    headers = {"Authorization": f"Bearer {access_token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.url}/whoami", headers=headers) as response,
    ):
        document = await response.json()
        return response.status, document.get("username")


async def test_login_get_refresh_logout(fake: FakeGlobus, gateway: Server, tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, _, err = await token(fake, home, "get")
    assert code == 1 and "token login" in err

    await login(fake, home, CAROL)
    tokens_file = home / ".globus" / "app" / LOGIN_CLIENT / "inference_app" / "tokens.json"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600

    code, first, _ = await token(fake, home, "get")
    assert code == 0
    assert await whoami(gateway, first) == (200, "carol@uni.edu")
    assert first not in tokens_file.parent.parent.name

    code, again, _ = await token(fake, home, "get")
    assert again == first, "a valid token is not refreshed"

    fake.logins.access_lifetime = 3600
    fake._tokens[first].exp = 0
    await _expire_in_file(tokens_file)
    code, refreshed, err = await token(fake, home, "get")
    assert code == 0, err
    assert refreshed != first
    assert await whoami(gateway, refreshed) == (200, "carol@uni.edu")

    code, _, err = await token(fake, home, "logout")
    assert code == 0, err
    assert not tokens_file.exists()
    assert fake.count("/v2/oauth2/token/revoke") == 2
    assert not fake._tokens[refreshed].active, "revoked at Globus"
    code, _, err = await token(fake, home, "get")
    assert code == 1 and "token login" in err


async def test_a_revoked_login_asks_to_log_in_again(fake: FakeGlobus, tmp_path: Path) -> None:
    home = tmp_path / "home"
    await login(fake, home, CAROL)
    tokens_file = home / ".globus" / "app" / LOGIN_CLIENT / "inference_app" / "tokens.json"
    fake.logins._refresh.clear()
    await _expire_in_file(tokens_file)
    code, out, err = await token(fake, home, "get")
    assert code == 1 and out == ""
    assert "no longer accepts the login" in err and "token login" in err


async def _expire_in_file(tokens_file: Path) -> None:
    """The stored token's expiry as the clock will see it later: past."""
    document = json.loads(tokens_file.read_text())
    for by_server in document["data"].values():
        for data in by_server.values():
            data["expires_at_seconds"] = 0
    tokens_file.write_text(json.dumps(document))
