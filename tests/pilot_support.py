"""What the pilot's tests share: a site CA with the three identities, a stand-in for the gateway's
two pilot routes, and the pilot as a real process serving the fake backend.

The stand-in answers exactly as pilot/protocol.py says the gateway does: the per-replica token as a
bearer token or 401, a `Registration` or `Heartbeat` body, `PilotOrders` back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from mtls.certificates import Role, create_ca, issue, write
from mtls.contexts import client_context
from pilot.protocol import Heartbeat, ModelState, PilotOrders, Registration
from testing.processes import exited, stop_process

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t" * 8 + "-replica-token-that-is-long-enough"
REPLICA = "replica-0001"
MODEL = "tiny-chat"


@dataclass(frozen=True)
class Site:
    """Certificate and key files of each identity (`ca` holds the CA's), in one folder."""

    folder: Path

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def client(self, name: str) -> ssl.SSLContext:
        certificate, key = self.pair(name)
        return client_context(certificate, key, self.ca)


def make_site(folder: Path, pilot_days: float = 30) -> Site:
    """A CA (`Test Lab`), the pilot, gateway and metrics identities, and a gateway identity from
    another CA (`stranger`)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = create_ca("Test Site CA", "Test Lab", days=60)
    write(ca, folder / "ca.pem", folder / "ca.key")
    write(issue(ca, Role.pilot, "pilot", days=pilot_days), *Site(folder).pair("pilot"))
    write(issue(ca, Role.gateway, "gateway", days=30), *Site(folder).pair("gateway"))
    write(issue(ca, Role.metrics, "metrics", days=30), *Site(folder).pair("metrics"))
    other = create_ca("Other CA", "Elsewhere", days=60)
    write(issue(other, Role.gateway, "gateway", days=30), *Site(folder).pair("stranger"))
    return Site(folder)


@dataclass
class FakeGateway:
    """The gateway's `/register` and `/heartbeat` routes for one replica's token."""

    token: str = TOKEN
    orders: PilotOrders = field(default_factory=PilotOrders)
    register_status: int = 200
    unavailable: int = 0
    """How many registrations to answer 503 first."""
    registrations: list[Registration] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeGateway:
        app = web.Application()
        app.router.add_post("/pilots/register", self._register)
        app.router.add_post("/pilots/heartbeat", self._heartbeat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/pilots"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _read(self, request: web.Request, kind: type[BaseModel]) -> Any:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(text='{"error": "unknown replica token"}')
        try:
            return kind.model_validate_json(await request.read())
        except ValidationError as exc:
            raise web.HTTPUnprocessableEntity(text=json.dumps({"error": str(exc)})) from None

    async def _register(self, request: web.Request) -> web.Response:
        registration = await self._read(request, Registration)
        if self.unavailable > 0:
            self.unavailable -= 1
            return web.json_response({"error": "restarting"}, status=503)
        if self.register_status != 200:
            return web.json_response({"error": "refused"}, status=self.register_status)
        self.registrations.append(registration)
        return web.Response(text=self.orders.model_dump_json(), content_type="application/json")

    async def _heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats.append(await self._read(request, Heartbeat))
        return web.Response(text=self.orders.model_dump_json(), content_type="application/json")

    def states(self) -> list[ModelState]:
        """The model's state in each report, registration first."""
        reports = [*self.registrations, *self.heartbeats]
        return [model.state for report in reports for model in report.models]


def write_config(
    folder: Path, site: Site, gateway: FakeGateway, load_seconds: float = 0, **change: Any
) -> Path:
    """A pilot configuration as the gateway stages it, serving the fake backend as MODEL."""
    pilot_certificate, pilot_key = site.pair("pilot")
    document: dict[str, Any] = {
        "replica_id": REPLICA,
        "gateway_url": gateway.url,
        "token": TOKEN,
        "listen_host": "127.0.0.1",
        "certificate": str(pilot_certificate),
        "key": str(pilot_key),
        "ca": str(site.ca),
        "gateway_subjects": ["CN=gateway,O=Test Lab"],
        "metrics_subjects": ["CN=metrics,O=Test Lab"],
        "walltime_seconds": 3600,
        "heartbeat_seconds": 0.5,
        "models": [
            {
                "name": MODEL,
                "command": [
                    sys.executable,
                    "-m",
                    "testing.fake_vllm",
                    "--port",
                    "{port}",
                    "--model",
                    MODEL,
                    "--load-seconds",
                    str(load_seconds),
                ],
                "port": 0,
            }
        ],
    }
    document.update(change)
    path = folder / "pilot.json"
    path.write_text(json.dumps(document))
    return path


class PilotProcess:
    """`python -m pilot --config FILE` with its log in a file next to the configuration."""

    def __init__(self, config: Path) -> None:
        self.log = config.with_suffix(".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pilot", "--config", str(config)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log.read_text()

    async def exit_code(self, timeout: float) -> int | None:
        await exited(self.process, timeout)
        return self.process.poll()

    async def stop(self) -> None:
        await stop_process(self.process, signal.SIGTERM, 60)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
