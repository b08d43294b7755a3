"""A gateway with on-demand deployments for tests: a site CA with pilot and gateway certificates,
the local scheduler running the stand-in pilot (tests/standin_pilot.py) as real processes, and
helpers that wait on the controller the way a held request does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from adaptors.deployments import DeploymentSpec, Phase, Replica
from adaptors.schedulers.local_job import session_members
from mtls.certificates import Role, create_ca, issue, write
from proxy.core.deployments.controller import Controller
from proxy.edge.pilots import CONTROLLER
from tests.support import Server, start_gateway, write_gateway_config

STANDIN = Path(__file__).with_name("standin_pilot.py")


@dataclass
class Site:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"


def end_jobs(site: Site) -> None:
    """Jobs outlive their gateway on purpose (a restarted one adopts them): a test ends its own."""
    for pid_file in (site.directory / "jobs" / "jobs").glob("*/pid.json"):
        session = json.loads(pid_file.read_text())["pid"]  # the wrapper leads the job's session
        for pid in [session, *session_members(session)]:  # model servers have groups of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def on_demand_site(tmp_path: Path) -> Iterator[Site]:
    """The body of each test module's `site` fixture: a site whose jobs end with the test."""
    site = make_site(tmp_path / "site")
    try:
        yield site
    finally:
        end_jobs(site)


def make_site(directory: Path) -> Site:
    directory.mkdir(parents=True, exist_ok=True)
    ca = create_ca("Test Site CA", "Test Lab", days=30)
    (directory / "ca.pem").write_bytes(ca.certificate)
    for role in Role:  # pilot.pem, gateway.pem, metrics.pem and their keys
        write(
            issue(ca, role, role.value, days=30),
            directory / f"{role.value}.pem",
            directory / f"{role.value}.key",
        )
    return Site(directory)


def scheduler_entry(site: Site, state_dir: Path, **config: Any) -> dict[str, Any]:
    return {
        "adapter": "adaptors.schedulers.local.LocalScheduler",
        "config": {"state_dir": str(state_dir), **config},
        "pilot_command": [sys.executable, str(STANDIN)],
        "pilot_certificate": str(site.directory / "pilot.pem"),
        "pilot_key": str(site.directory / "pilot.key"),
        "pilot_ca": str(site.ca),
    }


QUICK = {
    "heartbeat_seconds": 0.5,
    "reconcile_seconds": 0.2,
    "refresh_seconds": 0.2,
    "usage_report_seconds": 0.2,
    "start_backoff_seconds": 1,
}


def write_on_demand_config(
    directory: Path,
    site: Site,
    database_url: str,
    port: int,
    *,
    redis_url: str | None = None,
    schedulers: dict[str, Any] | None = None,
    deployed_defaults: bool = False,
    **on_demand: Any,
) -> Path:
    """A gateway listening on `port` (the pilots' callback address must be known in advance),
    with the controller's intervals shortened unless `deployed_defaults`."""
    directory.mkdir(parents=True, exist_ok=True)
    config = write_gateway_config(directory, "http://127.0.0.1:9", port=port)
    document = yaml.safe_load(config.read_text())
    document["database_url"] = database_url
    if redis_url:
        document["redis_url"] = redis_url
    document["on_demand"] = {
        "enabled": True,
        "ca_file": str(site.ca),
        "gateway_certificate": str(site.directory / "gateway.pem"),
        "gateway_key": str(site.directory / "gateway.key"),
        "schedulers": schedulers or {"local": scheduler_entry(site, site.directory / "jobs")},
        **({} if deployed_defaults else QUICK),
        **on_demand,
    }
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


async def start_on_demand(config: Path) -> tuple[web.AppRunner, Server, Controller]:
    runner, server = await start_gateway(config)
    return runner, server, runner.app[CONTROLLER]


def spec(name: str = "llama", **fields: Any) -> DeploymentSpec:
    values: dict[str, Any] = {
        "cluster": "local",
        "model": "meta/llama",
        "scheduler": "local",
        "model_command": ("ready-after", "0.5"),
        "idle_timeout_seconds": 600,
        "expected_start_seconds": 30,
        **fields,
    }
    return DeploymentSpec(name=name, **values)


async def until_routed(controller: Controller, name: str, within: float = 30) -> Replica:
    """Waits as a held request does: on `changed`, with a deadline."""
    deadline = time.monotonic() + within
    phases = []
    while (replica := controller.route(name)) is None:
        phases.append(controller.progress(name).phase)
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never got a ready replica; phases seen: {phases[-20:]}")
        await controller.changed(name, 0.5)
    return replica


async def until(condition: Any, within: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.1)


async def call_replica(controller: Controller, replica: Replica, path: str = "v1/models") -> dict[str, Any]:
    connector = aiohttp.TCPConnector(ssl=controller.client_ssl)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{replica.base_url}/{path}") as answer,
    ):
        assert answer.status == 200
        body: dict[str, Any] = json.loads(await answer.read())
        return body


def phase(controller: Controller, name: str) -> Phase:
    return controller.progress(name).phase
