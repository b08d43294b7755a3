"""`PUT /data/staging` end to end: globus-sdk's real TransferClient, with a client-credentials token
from the fake Globus Auth, against the fake Transfer API; called as the existing command-line client
calls it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.edge.staging import Stager, StagingFailed
from proxy.settings import load_settings
from proxy.settings.files import ConfigError
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.transfer import FakeCollection, FakeTransfer
from tests.compute_setup import SERVICE_ID, SERVICE_SECRET
from tests.conftest import TOKENS, USERS, Server, auth, start_gateway, write_gateway_config
from tests.test_routes import assert_openai_error, call

COLLECTION = "96c7390b-a3e8-4dd4-a327-1af7d143283e"
ALICE = USERS["alice"]["id"]


@pytest.fixture
async def transfer(globus: FakeGlobus) -> AsyncIterator[FakeTransfer]:
    async with FakeTransfer(token_owner=globus.issued_tokens.get) as fake:
        fake.add_collection(COLLECTION, SERVICE_ID, "/user-staging/")
        yield fake


def staging_config(directory: Path, backend: Server, globus: FakeGlobus, transfer: FakeTransfer) -> Path:
    path = write_gateway_config(directory, backend.url)
    document = yaml.safe_load(path.read_text())
    document["data_staging"] = {
        "collection_id": COLLECTION,
        "client_id": SERVICE_ID,
        "client_secret": SERVICE_SECRET,
        "transfer_url": transfer.url,
        "auth_url": globus.auth_url,
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
async def gateway(
    backend: Server, globus: FakeGlobus, transfer: FakeTransfer, tmp_path: Path
) -> AsyncIterator[Server]:
    runner, server = await start_gateway(staging_config(tmp_path, backend, globus, transfer))
    yield server
    await runner.cleanup()


def collection(transfer: FakeTransfer) -> FakeCollection:
    return transfer.collections[COLLECTION]


async def stage(http: aiohttp.ClientSession, gateway: Server, user: str = "alice") -> tuple[int, Any]:
    status, document, _ = await call(http, "PUT", f"{gateway.url}/data/staging", headers=auth(user))
    return status, document


async def test_creates_the_folder_and_a_read_write_rule_once(
    gateway: Server, transfer: FakeTransfer, http: aiohttp.ClientSession
) -> None:
    status, first = await stage(http, gateway)
    assert status == 200
    path = f"/user-staging/{ALICE}/"
    assert first == {
        "collection_id": COLLECTION,
        "path": path,
        "acl_rule_id": first["acl_rule_id"],
        "principal": ALICE,
    }
    assert path in collection(transfer).directories
    (rule,) = collection(transfer).rules.values()
    assert (rule["id"], rule["principal"], rule["path"], rule["permissions"]) == (
        first["acl_rule_id"],
        ALICE,
        path,
        "rw",
    )
    assert await stage(http, gateway) == (200, first), "idempotent: the same folder and rule"
    assert len(collection(transfer).rules) == 1
    assert transfer.count("POST", "/mkdir") == 2 and transfer.count("POST", "/access") == 1


async def test_the_existing_client_call(gateway: Server) -> None:
    """`InferenceClient.ensure_staging_area`: `put("data/staging")` under a base URL ending in
    `/resource_server/`, and a response it reads as `{collection_id, path}`."""
    async with aiohttp.ClientSession(base_url=f"{gateway.url}/", headers=auth()) as client:
        response = await client.put("data/staging")
        assert response.status == 200
        document = await response.json()
    assert set(document) == {"collection_id", "path", "acl_rule_id", "principal"}


async def test_concurrent_gateways_end_with_one_rule(
    backend: Server, globus: FakeGlobus, transfer: FakeTransfer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Two gateway processes preparing the same user at once both list no rule, both create one:
    Transfer refuses the second (409 Exists), which must read the first instead of failing."""
    gateways = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        gateways.append(await start_gateway(staging_config(tmp_path / name, backend, globus, transfer)))
    try:
        transfer.delay = 0.2
        answers = await asyncio.gather(*(stage(http, server) for _, server in gateways * 2))
    finally:
        for runner, _ in gateways:
            await runner.cleanup()
    assert {status for status, _ in answers} == {200}
    assert len({document["acl_rule_id"] for _, document in answers}) == 1
    assert len(collection(transfer).rules) == 1
    assert transfer.count("POST", "/access") == 2, "the two gateways raced, each sharing one call per user"


async def test_a_read_only_rule_becomes_read_write(
    gateway: Server, transfer: FakeTransfer, http: aiohttp.ClientSession
) -> None:
    rule_id = "4b1f9a34-0000-4000-8000-00000000beef"
    path = f"/user-staging/{ALICE}/"
    collection(transfer).directories.add(path)
    collection(transfer).rules[rule_id] = {
        "DATA_TYPE": "access", "id": rule_id, "principal_type": "identity", "principal": ALICE,
        "path": path, "permissions": "r",
    }  # fmt: skip
    status, document = await stage(http, gateway)
    assert (status, document["acl_rule_id"]) == (200, rule_id)
    assert collection(transfer).rules[rule_id]["permissions"] == "rw"


async def test_failures_are_openai_errors_without_secrets(
    gateway: Server, transfer: FakeTransfer, globus: FakeGlobus, http: aiohttp.ClientSession
) -> None:
    transfer.fail_status = 500
    status, document = await stage(http, gateway)
    assert status == 502 and assert_openai_error(document)["code"] == "staging_failed"
    transfer.fail_status = None
    collection(transfer).manager = "someone-else"
    status, document = await stage(http, gateway)
    assert status == 503 and assert_openai_error(document)["code"] == "staging_unavailable"
    collection(transfer).manager = SERVICE_ID
    collection(transfer).directories.discard("/user-staging/")
    status, document = await stage(http, gateway, "bob")
    assert status == 502 and "MkdirFailed.NotFound" in assert_openai_error(document)["message"]
    for secret in (SERVICE_SECRET, TOKENS["bob"], *globus.issued_tokens):
        assert secret not in str(document)


async def test_a_gateway_without_staging_says_so(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await start_gateway(write_gateway_config(tmp_path, backend.url))
    try:
        status, document = await stage(http, gateway)
    finally:
        await runner.cleanup()
    assert status == 404 and assert_openai_error(document)["code"] == "staging_not_configured"


def test_staging_without_credentials_fails_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVICE_ACCOUNT_ID", raising=False)
    monkeypatch.delenv("SERVICE_ACCOUNT_SECRET", raising=False)
    path = write_gateway_config(tmp_path, "http://127.0.0.1:9")
    document = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**document, "data_staging": {"collection_id": COLLECTION}}))
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert str(path) in str(error.value) and "data_staging" in str(error.value)
    assert "SERVICE_ACCOUNT_ID" in str(error.value)


async def test_preparations_at_once_are_bounded(
    globus: FakeGlobus, transfer: FakeTransfer, tmp_path: Path
) -> None:
    """A slow Transfer cannot pile up work: beyond the bound, callers are refused at once."""
    settings = load_settings(
        staging_config(tmp_path, Server("http://127.0.0.1:9", web.Application()), globus, transfer)
    )
    stager = Stager(settings.data_staging, COLLECTION, max_preparing=1)
    transfer.delay = 0.3
    try:
        first = asyncio.ensure_future(stager.prepare(ALICE))
        await asyncio.sleep(0.05)
        with pytest.raises(StagingFailed):
            await stager.prepare(USERS["bob"]["id"])
        same = await stager.prepare(ALICE)
        assert same == await first
    finally:
        stager.close()
