"""What the tests of on-demand deployment endpoints share: a site CA and its certificates, a replica
(the fake backend under `/deployments/{name}/`, as a pilot serves it, behind real mTLS on
loopback), a controller the test drives (`ScriptedDeployments`, the Deployments protocol of
adaptors/deployments.py), and a gateway whose deployment endpoints use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from adaptors.context import AdaptorContext
from adaptors.deployment import DeploymentEndpoint
from adaptors.deployments import DeploymentSpec, Phase, Progress, Replica
from mtls.certificates import Issued, Role, create_ca, issue, write
from mtls.contexts import client_context, server_context
from proxy.core.state import STATE
from proxy.metrics.prometheus import AdaptorTelemetry
from testing.fake_vllm import create_backend_app
from tests.support import CHAT_MODEL, PRIVATE_MODEL, TOKENS, USERS, Server, write_yaml

LLAMA = "llama-8b"
TIGHT = "tight"
TIGHT_MODEL = "tight/model"
MIXED_MODEL = "mixed/model"
EVERYTHING = ["chat/completions", "completions", "embeddings", "responses", "messages"]
COMMAND = ["python", "-m", "testing.fake_vllm", "--port", "{port}"]


@dataclass(frozen=True)
class Site:
    """PEM files: the site CA, the gateway's client identity, a pilot's server identity, and a
    pilot identity from another CA."""

    ca: Path
    gateway: tuple[Path, Path]
    pilot: tuple[Path, Path]
    stranger_pilot: tuple[Path, Path]

    def gateway_ssl(self) -> Any:
        return client_context(*self.gateway, self.ca)


def make_site(directory: Path) -> Site:
    ca = create_ca("Test Site CA", "Test Lab", days=30)
    stranger = create_ca("Other CA", "Elsewhere", days=30)
    (directory / "ca.pem").write_bytes(ca.certificate)

    def files(name: str, issued: Issued) -> tuple[Path, Path]:
        certificate, key = directory / f"{name}.pem", directory / f"{name}.key"
        write(issued, certificate, key)
        return certificate, key

    return Site(
        ca=directory / "ca.pem",
        gateway=files("gateway", issue(ca, Role.gateway, "gateway", days=10)),
        pilot=files("pilot", issue(ca, Role.pilot, "pilot", days=10)),
        stranger_pilot=files("stranger", issue(stranger, Role.pilot, "pilot", days=10)),
    )


@dataclass(frozen=True)
class Pilot:
    url: str
    backends: dict[str, web.Application]
    """deployment name → the fake backend serving it"""

    def replica(self, name: str, replica_id: str = "r1") -> Replica:
        return Replica(replica_id, f"{self.url}/deployments/{name}")


@contextlib.asynccontextmanager
async def replica_server(site: Site, *names: str, stranger: bool = False) -> AsyncIterator[Pilot]:
    """A fake backend under `/deployments/{name}/` for each name, behind the pilot's mTLS."""
    root = web.Application()
    models = [CHAT_MODEL, PRIVATE_MODEL, TIGHT_MODEL, MIXED_MODEL]
    backends = {name: create_backend_app(models=models) for name in names}
    for name, backend in backends.items():
        root.add_subapp(f"/deployments/{name}/", backend)
    certificate, key = site.stranger_pilot if stranger else site.pilot
    runner = web.AppRunner(root, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(certificate, key, site.ca)).start()
    port = runner.addresses[0][1]
    try:
        yield Pilot(f"https://127.0.0.1:{port}", backends)
    finally:
        await runner.cleanup()


class ScriptedDeployments:
    """The controller as the request path sees it, driven by the test: phases, ETAs and replicas
    are set by hand; `want` moves an idle deployment to `queued` with its expected start, as the
    controller does before it has measured one."""

    def __init__(self, client_ssl: Any) -> None:
        self.client_ssl = client_ssl
        self.specs: dict[str, DeploymentSpec] = {}
        self.withdrawn: list[str] = []
        self.wants: Counter[str] = Counter()
        self.in_flight_now: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.unreachable_seen: list[str] = []
        self._progress: dict[str, Progress] = {}
        self._replicas: dict[str, list[Replica]] = {}
        self._changes: dict[str, asyncio.Event] = {}

    def declare(self, spec: DeploymentSpec) -> None:
        self.specs[spec.name] = spec

    def withdraw(self, spec: DeploymentSpec) -> None:
        if self.specs.get(spec.name) is spec:
            del self.specs[spec.name]
            self.withdrawn.append(spec.name)

    def route(self, name: str) -> Replica | None:
        """Round robin over the ready replicas."""
        replicas = self._replicas.get(name)
        if not replicas:
            return None
        replicas.append(replicas.pop(0))
        return replicas[-1]

    def progress(self, name: str) -> Progress:
        if name not in self.specs:
            return Progress(Phase.unavailable, detail=f"{name} is not declared")
        ready = len(self._replicas.get(name, []))
        if ready:
            return Progress(Phase.ready, ready_replicas=ready)
        return self._progress.get(name, Progress(Phase.idle))

    def want(self, name: str) -> None:
        self.wants[name] += 1
        if self.progress(name).phase is Phase.idle:
            self.set(name, Progress(Phase.queued, self.specs[name].expected_start_seconds))

    def unreachable(self, name: str, replica: Replica) -> None:
        """As the controller does: out of the routing at once."""
        self.unreachable_seen.append(replica.replica_id)
        self._replicas[name] = [r for r in self._replicas.get(name, []) if r != replica]
        self._changed(name)

    async def changed(self, name: str, timeout: float) -> None:
        event = self._changes.setdefault(name, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    @contextlib.contextmanager
    def in_flight(self, name: str, replica: Replica) -> Iterator[None]:
        self.in_flight_now[name] += 1
        self.served[replica.replica_id] += 1
        try:
            yield
        finally:
            self.in_flight_now[name] -= 1

    def set(self, name: str, progress: Progress) -> None:
        self._progress[name] = progress
        self._changed(name)

    def ready(self, name: str, *replicas: Replica) -> None:
        self._replicas[name] = list(replicas)
        self._changed(name)

    def _changed(self, name: str) -> None:
        event = self._changes.pop(name, None)
        if event is not None:
            event.set()


async def attach(gateway: Server, deployments: ScriptedDeployments) -> ThreadPoolExecutor:
    """Restarts the gateway's deployment endpoints with `deployments` as their controller, as the
    gateway's adaptor start-up does with its own; the caller shuts the executor down."""
    state = gateway.app[STATE]
    registry = state.registry
    executor = ThreadPoolExecutor(max_workers=1)

    def labels(slug: str) -> tuple[str, str, str, str]:
        endpoint = registry.endpoints[slug]
        return (type(endpoint).__name__, endpoint.cluster, endpoint.framework, endpoint.model)

    context = AdaptorContext(
        executor=executor,
        relay=state.relay,
        telemetry=AdaptorTelemetry(state.metrics, labels),
        deployments=deployments,
    )
    for endpoint in registry.endpoints.values():
        if isinstance(endpoint, DeploymentEndpoint):
            await endpoint.shutdown()
            await endpoint.startup(context)
    return executor


def deployment(
    model: str, name: str | None, cluster: str = "hpc", groups: str | None = None, **config: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {"scheduler": "local", "model_command": COMMAND, **config}
    if name is not None:
        settings["deployment"] = name
    entry = {
        "cluster": cluster,
        "framework": "vllm",
        "model": model,
        "endpoint_adapter": "adaptors.deployment.DeploymentEndpoint",
        "config": settings,
    }
    return entry if groups is None else {**entry, "allowed_globus_groups": groups}


def write_config(directory: Path, backend_url: str, **limits: Any) -> Path:
    """Cluster `hpc` is only deployments; cluster `mixed` reads the fake backend's jobs and has a
    deployment besides its direct endpoint."""
    clusters = [
        {
            "cluster_name": "hpc",
            "cluster_adapter": "adaptors.deployment.DeploymentCluster",
            "frameworks": ["vllm"],
            "openai_endpoints": EVERYTHING,
        },
        {
            "cluster_name": "mixed",
            "cluster_adapter": "adaptors.direct_api.DirectAPICluster",
            "frameworks": ["vllm"],
            "openai_endpoints": EVERYTHING,
            "config": {"status_url": f"{backend_url}/jobs"},
        },
    ]
    endpoints = [
        deployment(CHAT_MODEL, LLAMA),
        deployment(PRIVATE_MODEL, "private-g", groups=USERS["alice"]["groups"][0]),
        deployment(TIGHT_MODEL, TIGHT, max_held_requests=1, max_wait_seconds=3, progress_seconds=0.2),
        deployment(MIXED_MODEL, None, cluster="mixed"),
        {
            "cluster": "mixed",
            "framework": "vllm",
            "model": CHAT_MODEL,
            "endpoint_adapter": "adaptors.direct_api.DirectAPIEndpoint",
            "config": {"api_url": f"{backend_url}/v1"},
        },
    ]
    tokens = {"tokens": [{"token": TOKENS[name], "user": USERS[name]} for name in TOKENS]}
    write_yaml(directory / "clusters.yaml", clusters)
    write_yaml(directory / "endpoints.yaml", endpoints)
    write_yaml(directory / "tokens.yaml", tokens)
    return write_yaml(
        directory / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "timeouts": {"jobs_cache_seconds": 60},
            "limits": {"requests_per_second": 0, "concurrent_per_user": 0, **limits},
            "auth": {"provider": "static", "static": {"tokens_file": "tokens.yaml"}},
            "endpoints_file": "endpoints.yaml",
            "clusters_file": "clusters.yaml",
        },
    )
