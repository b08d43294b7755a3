"""Real servers on loopback: the fake OpenAI backend and the gateway, each on an ephemeral port."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from testing.existing_function import existing_vllm_function
from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.compute import FakeCompute
from testing.fake_vllm import create_backend_app
from testing.services.postgres_server import PostgresServer
from testing.services.rabbitmq_server import RabbitMQServer
from testing.services.redis_server import RedisServer
from tests.compute_setup import (
    ENDPOINT,
    INFER,
    LEGACY,
    QSTAT,
    SECRET,
    SERVICE_ID,
    SERVICE_SECRET,
    load_function,
    qstat,
)
from tests.support import (  # noqa: F401  (re-exported: the test modules import these from here)
    CHAT_MODEL,
    EMBED_MODEL,
    PRIVATE_MODEL,
    TOKENS,
    USERS,
    Server,
    auth,
    chat,
    closed_port_url,
    endpoint,
    free_port,
    start,
    start_gateway,
    write_gateway_config,
    write_yaml,
)

pytest_plugins = ["tests.hang_report"]

settings.register_profile("shared-machine", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-machine")
"""Hypothesis's too-slow check times the generation of examples, which on a machine busy with the
parallel pass (or anything else) says nothing about the test; the examples and assertions stand."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`alone` takes the tests it marks out of the parallel pass of `make test`: each must say why."""
    for item in items:
        for mark in item.iter_markers("alone"):
            reason = mark.kwargs.get("reason", mark.args[0] if mark.args else "")
            if not isinstance(reason, str) or not reason.strip():
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.alone needs a reason")


@pytest.fixture(autouse=True)
def no_production_globus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Globus client built without a base URL would reach the real cloud: send it to a closed port
    instead, unless a site runs the opt-in live check on purpose."""
    if not os.environ.get("GATEWAY_LIVE_GLOBUS_TOKEN"):
        for service in ("AUTH", "GROUPS", "COMPUTE", "TRANSFER"):
            monkeypatch.setenv(f"GLOBUS_SDK_SERVICE_URL_{service}", "http://127.0.0.1:9/")


@pytest.fixture
async def backend() -> AsyncIterator[Server]:
    runner, url = await start(create_backend_app(models=[CHAT_MODEL, EMBED_MODEL]))
    yield Server(url=url, app=runner.app)
    await runner.cleanup()


@pytest.fixture
async def gateway(backend: Server, tmp_path: Path) -> AsyncIterator[Server]:
    runner, server = await start_gateway(
        write_gateway_config(tmp_path, backend.url, max_body_bytes=1_000_000)
    )
    yield server
    await runner.cleanup()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PostgresServer]:
    """One real PostgreSQL for the session (initdb and start take about a second); tests isolate
    themselves with a fresh database each, see `database_url`."""
    async with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RabbitMQServer]:
    """One real RabbitMQ for the session (of each xdist worker: it starts in about 4 s). Tests share it
    through queues of their own (the fake Compute service's are named after fresh task group ids), and
    must not stop it: a test that stops or restarts the broker takes `rabbitmq_private`."""
    async with RabbitMQServer(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server


@pytest.fixture
async def rabbitmq_private(tmp_path: Path) -> AsyncIterator[RabbitMQServer]:
    """A RabbitMQ of the test's own, free to stop and restart (on the same port, with its data)."""
    async with RabbitMQServer(tmp_path / "rabbitmq") as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_dialect(request: pytest.FixtureRequest) -> str:
    """Run a test once per `proxy.records.database` backend."""
    dialect: str = request.param
    return dialect


@pytest.fixture
def _database_postgres(database_dialect: str, request: pytest.FixtureRequest) -> PostgresServer | None:
    """The PostgreSQL server only when the test runs on it, so SQLite-only runs never start one."""
    if database_dialect != "postgresql":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server


@pytest.fixture
async def database_url(_database_postgres: PostgresServer | None, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file in tmp_path, or a new database on the session's PostgreSQL."""
    if _database_postgres is None:
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = await _database_postgres.create_database(name)
    yield url
    if _database_postgres.running:
        await _database_postgres.drop_database(name)


@pytest.fixture
async def globus() -> AsyncIterator[FakeGlobus]:
    async with FakeGlobus() as fake:
        fake.add_client(SERVICE_ID, SERVICE_SECRET)
        yield fake


@pytest.fixture
async def compute(globus: FakeGlobus, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeCompute]:
    monkeypatch.setenv("INTERNAL_STREAMING_SECRET", SECRET)
    async with FakeCompute(accepted_tokens=lambda token: token in globus.issued_tokens) as fake:
        fake.add_endpoint(ENDPOINT)
        fake.register_function(INFER, load_function())
        fake.register_function(QSTAT, qstat)
        fake.register_function(LEGACY, existing_vllm_function)
        yield fake
