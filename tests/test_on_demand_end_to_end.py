"""Models on demand end to end, every part real: the gateway as a process, the local scheduler
starting the real pilot (`python -m pilot`) as a job, the fake vLLM inside it, mTLS on loopback.

One scenario in order, as an operator would see it: a request finds no replica and is held with
progress comments until the pilot is ready; the pilot refuses clients without the right
certificate; a restarted gateway adopts the running pilot; a killed pilot is replaced on the next
request; the idle timeout ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from mtls.certificates import Role, create_ca, issue, write
from mtls.contexts import client_context
from testing.fake_schedulers import BIN
from testing.fake_schedulers.table import DIRECTORY_VARIABLE, FakeBatch
from testing.ports import free_port
from testing.services.postgres_server import PostgresServer
from tests.deployment_setup import Site, on_demand_site, write_on_demand_config
from tests.processes import ROOT, gateway_process
from tests.support import TOKENS

MODEL = "demo/llama-on-demand"
NAME = "demo-llama"
IDLE_SECONDS = 12
PILOT = [sys.executable, "-m", "pilot"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """The site's CA and its pilot, gateway and metrics identities; its jobs end with the test."""
    yield from on_demand_site(tmp_path)


def _identities(site: Site, tmp_path: Path) -> dict[str, ssl.SSLContext]:
    """Client contexts: the gateway's, the metrics scraper's, another CA's, none."""
    other = create_ca("Other CA", "Elsewhere", days=5)
    write(issue(other, Role.gateway, "gateway", days=5), tmp_path / "other.pem", tmp_path / "other.key")
    no_certificate = ssl.create_default_context(cafile=str(site.ca))
    no_certificate.check_hostname = False

    def identity(name: str) -> ssl.SSLContext:
        return client_context(site.directory / f"{name}.pem", site.directory / f"{name}.key", site.ca)

    return {
        "gateway": identity("gateway"),
        "metrics": identity("metrics"),
        "other": client_context(tmp_path / "other.pem", tmp_path / "other.key", site.ca),
        "none": no_certificate,
    }


def _configure(tmp_path: Path, site: Site) -> tuple[Path, Path]:
    """A gateway on the controller's deployed intervals whose one deployment runs the fake vLLM
    (loading for 2 s, as vLLM listens only once its model is loaded) in a real pilot."""
    database = tmp_path / "gateway.db"
    scheduler = {
        "adapter": "adaptors.schedulers.local.LocalScheduler",
        "config": {"state_dir": str(site.directory / "jobs")},
        "pilot_command": PILOT,
        "pilot_certificate": str(site.directory / "pilot.pem"),
        "pilot_key": str(site.directory / "pilot.key"),
        "pilot_ca": str(site.ca),
        "listen_host": "127.0.0.1",
        # the fake vLLM is the tests' (not installed as vLLM would be on a cluster)
        "environment": {"PYTHONPATH": str(ROOT)},
    }
    config = write_on_demand_config(
        tmp_path / "gw",
        site,
        f"sqlite:///{database}",
        free_port(),
        schedulers={"local": scheduler},
        deployed_defaults=True,
        metrics_subjects=["CN=metrics,O=Test Lab"],
    )
    endpoints_file = config.parent / "endpoints.yaml"
    endpoints = yaml.safe_load(endpoints_file.read_text())
    endpoints.append(
        {
            "cluster": "local",
            "framework": "vllm",
            "model": MODEL,
            "endpoint_adapter": "adaptors.deployment.DeploymentEndpoint",
            "config": {
                "deployment": NAME,
                "scheduler": "local",
                "model_command": [
                    sys.executable,
                    "-m",
                    "testing.fake_vllm",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                    "--model",
                    MODEL,
                    "--load-seconds",
                    "2",
                ],
                "idle_timeout_seconds": IDLE_SECONDS,
                "expected_start_seconds": 20,
                "progress_seconds": 1,
                "walltime_seconds": 3600,
            },
        }
    )
    endpoints_file.write_text(yaml.safe_dump(endpoints))
    return config, database


def _replicas(database: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("SELECT * FROM deployment_replicas ORDER BY created")]


def _live(database: Path) -> list[dict[str, Any]]:
    return [row for row in _replicas(database) if row["ended"] is None]


def _job_directory(site: Site, replica: dict[str, Any]) -> Path:
    return site.directory / "jobs" / "jobs" / replica["job_id"]


def _job_ended(site: Site, replica: dict[str, Any]) -> bool:
    """The local scheduler's wrapper writes `exit.json` once the job and all its processes ended."""
    return (_job_directory(site, replica) / "exit.json").exists()


async def _held_stream(url: str) -> tuple[list[str], str]:
    """The comments a held stream got, and the content of its answer."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    comments, content = [], ""
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(
            f"{url}/resource_server/local/vllm/v1/chat/completions", json=body, headers=headers
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        async for raw in answer.content:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "choices" in event, (comments, event)
                for choice in event["choices"]:
                    content += choice["delta"].get("content") or ""
    return comments, content


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/resource_server/local/vllm/v1", api_key=TOKENS["alice"], max_retries=0, timeout=120
    )


async def _ask(url: str) -> str:
    answer = await _client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}]
    )
    return answer.choices[0].message.content or ""


async def _until(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.2)


async def _pilot_refuses_strangers(identities: dict[str, ssl.SSLContext], replica: dict[str, Any]) -> None:
    """The pilot's port serves inference to the gateway's identity only: no certificate or another
    CA's fails the handshake; the metrics identity may read /metrics and nothing else."""
    base = f"https://{replica['address']}:{replica['port']}"
    inference = f"{base}/deployments/{NAME}/v1/models"
    async with aiohttp.ClientSession() as http:
        for refused in ("none", "other"):
            with pytest.raises(aiohttp.ClientError):
                async with http.get(inference, ssl=identities[refused]) as answer:
                    await answer.read()
        async with http.get(inference, ssl=identities["gateway"]) as answer:
            assert answer.status == 200
            assert MODEL in await answer.text()
        async with http.get(f"{base}/metrics", ssl=identities["gateway"]) as answer:
            assert answer.status == 403
        async with http.get(f"{base}/metrics", ssl=identities["metrics"]) as answer:
            assert answer.status == 200
        async with http.get(inference, ssl=identities["metrics"]) as answer:
            assert answer.status == 403


async def test_a_deployment_starts_on_demand_is_adopted_replaced_and_stopped_when_idle(
    site: Site, tmp_path: Path
) -> None:
    config, database = _configure(tmp_path, site)
    async with gateway_process(config) as gateway:
        comments, content = await _held_stream(gateway.url)
        assert content, "the held stream got no answer"
        phases = " ".join(comments)
        assert any(word in phases for word in ("queued", "starting", "loading")), comments
        assert "ready in about" in phases or "ETA" in phases or "s" in phases
        [replica] = _live(database)
        assert replica["phase"] == "ready"
        assert await _ask(gateway.url)
        await _pilot_refuses_strangers(_identities(site, tmp_path), replica)
        jobs_before = len(_replicas(database))
    async with gateway_process(config) as gateway:
        assert await _ask(gateway.url)
        assert len(_replicas(database)) == jobs_before, "the restarted gateway started a new pilot"
        [adopted] = _live(database)
        assert adopted["replica_id"] == replica["replica_id"]

        pilot = json.loads((_job_directory(site, adopted) / "started.json").read_text())["pid"]
        os.kill(pilot, signal.SIGKILL)
        await _until(lambda: _job_ended(site, adopted), 10, "the killed pilot's job ends")
        assert await _ask(gateway.url), "the next request got no answer from a new pilot"
        [new] = _live(database)
        assert new["replica_id"] != replica["replica_id"]

        await _until(lambda: not _live(database), IDLE_SECONDS + 20, "the idle timeout ends the pilot")
        await _until(lambda: _job_ended(site, new), 30, "the idle pilot's job ends")
        ended = {row["replica_id"]: row["end_reason"] for row in _replicas(database)}
        assert "idle" in (ended[new["replica_id"]] or "")


async def test_a_deployment_on_pbs_starts_the_real_pilot_through_qsub(site: Site, tmp_path: Path) -> None:
    """The PBS adaptor with the fake qsub/qstat/qdel running the job script for real: the script
    it wrote starts the real pilot, which registers, serves, and is ended with qdel when the
    gateway stops the replica."""
    batch = FakeBatch(tmp_path / "batch")
    batch.configure(run_scripts=True)
    config, database = _configure(tmp_path, site)
    document = yaml.safe_load(config.read_text())
    local = document["on_demand"]["schedulers"]["local"]
    document["on_demand"]["schedulers"]["local"] = {
        **local,
        "adapter": "adaptors.schedulers.pbs.PbsScheduler",
        "config": {
            "staging_directory": str(tmp_path / "staging"),
            "command_environment": {DIRECTORY_VARIABLE: str(batch.directory)},
            "queue": "debug",
            "filesystems": "home:eagle",
            **{command: str(BIN / command) for command in ("qsub", "qstat", "qdel")},
        },
    }
    config.write_text(yaml.safe_dump(document))
    async with gateway_process(config) as gateway, _deleted_at_the_end(batch, database):
        comments, content = await _held_stream(gateway.url)
        assert content and comments
        [replica] = _live(database)
        assert replica["job_id"].split(".")[0].isdigit(), "a PBS job id, as qsub prints it"
        script = next((tmp_path / "staging").glob("*.pbs")).read_text()
        assert "#PBS -q debug" in script and "#PBS -l filesystems=home:eagle" in script
        assert await _ask(gateway.url)


@contextlib.asynccontextmanager
async def _deleted_at_the_end(batch: FakeBatch, database: Path) -> AsyncIterator[None]:
    """Jobs outlive their gateway on purpose: the test ends its own with qdel, and waits until
    each pilot (given SIGTERM, it stops its model server first) is gone."""
    try:
        yield
    finally:
        environment = {**os.environ, DIRECTORY_VARIABLE: str(batch.directory)}
        for replica in _replicas(database):
            deleted = subprocess.run(
                [str(BIN / "qdel"), replica["job_id"]], env=environment, capture_output=True, check=False
            )
            assert deleted.returncode in (0, 35), deleted.stderr  # 35: the job had finished
            replica_id = replica["replica_id"]
            await _until(lambda: not _pilots(replica_id), 30, "the pilot ended")  # noqa: B023 (awaited here)


def _pilots(replica_id: str) -> list[int]:
    """Pilot processes of the replica, found by their staged configuration's name."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if f"pilot-{replica_id}.json".encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


async def test_a_database_outage_does_not_stop_traffic_to_a_running_replica(
    site: Site, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """The request path reads only the routing map in memory: with PostgreSQL down for longer than
    several refreshes, usage reports and heartbeats (which get 503 meanwhile), the ready replica
    keeps answering, and the controller carries on once the database is back."""
    config, _ = _configure(tmp_path, site)
    url = await postgres_server.create_database("test_on_demand_outage")
    document = yaml.safe_load(config.read_text())
    document["database_url"] = url
    config.write_text(yaml.safe_dump(document))
    try:
        async with gateway_process(config) as gateway:
            _, content = await _held_stream(gateway.url)
            assert content
            await postgres_server.stop()
            try:
                deadline = time.monotonic() + 12  # past a 10 s heartbeat and many 1 s refreshes
                answered = 0
                while time.monotonic() < deadline:
                    assert await _ask(gateway.url)
                    answered += 1
                    await asyncio.sleep(0.5)
                assert answered >= 10
            finally:
                await postgres_server.start()
            assert await _ask(gateway.url)
            assert "the ready replica" not in gateway.log_text()
    finally:
        await postgres_server.drop_database("test_on_demand_outage")
