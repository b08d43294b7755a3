"""`python -m pilot --config FILE`: one replica's life, from the checks at start to the exit.

    1. read the configuration and the credentials: any problem, exit 2 before starting anything
    2. start the model servers and the mTLS port, register with the gateway
    3. heartbeat, at once when a model's state changes, until one of:
       - a `stop` order, a 401 on a heartbeat, POST /pilot/stop, SIGTERM or SIGINT (the scheduler's
         walltime kill, qdel, scancel), or the walltime's end drawing near: stop, exit 0
       - a model server failing (after reporting it) or the registration refused: exit 1
    4. stopping: no new connections, requests in flight finish (bounded), the model servers get
       SIGTERM then SIGKILL, each to its whole process group

A gateway that stops answering heartbeats does not stop the pilot: requests already routed to it
keep being served, and the walltime ends it in any case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from pilot.config import ConfigError, Credentials, load_config, load_credentials
from pilot.gateway import GatewayClient, Refused, Rejected, Unavailable, address_towards
from pilot.metrics import PilotMetrics
from pilot.models import ModelServer
from pilot.protocol import Heartbeat, ModelState, PilotConfig, PilotOrders, Registration
from pilot.server import PilotServer, Serving

log = logging.getLogger("pilot")

TERMINATE_GRACE_SECONDS = 15.0
"""After SIGTERM, how long a model server has to exit before its process group gets SIGKILL."""
WALLTIME_MARGIN_SECONDS = 90.0
"""The pilot stops this long before its walltime ends (or a tenth of the walltime, if shorter), so
that it drains and stops its servers before the scheduler kills the job."""
MIN_HEARTBEAT_SECONDS = 1.0
MAX_HEARTBEAT_SECONDS = 300.0


class Pilot:
    def __init__(self, config: PilotConfig, credentials: Credentials, started: float) -> None:
        self.config = config
        self.credentials = credentials
        self.walltime_end = started + config.walltime_seconds
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self.models = {model.name: ModelServer(model, self._changed.set) for model in config.models}
        self.metrics = PilotMetrics(self.models)
        self.server = PilotServer(
            Serving(
                models=self.models,
                gateway_subjects=frozenset(config.gateway_subjects),
                metrics_subjects=frozenset(config.metrics_subjects),
                metrics=self.metrics,
                status=self.heartbeat,
                stop=self.request_stop,
            ),
            credentials.context,
        )

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("stopping: %s", reason)
            self._stop.set()

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            replica_id=self.config.replica_id,
            models=tuple(server.report() for server in self.models.values()),
            in_flight=self.metrics.in_flight,
        )

    async def registration(self) -> Registration:
        config = self.config
        return Registration(
            replica_id=config.replica_id,
            address=config.advertise_host or await address_towards(config.gateway_url),
            port=self.server.port,
            models=tuple(server.report() for server in self.models.values()),
            walltime_end=self.walltime_end,
            certificate_not_after=self.credentials.not_after.timestamp(),
        )

    async def run(self) -> int:
        gateway = GatewayClient(self.config.gateway_url, self.config.token)
        health = aiohttp.ClientSession(trust_env=False)
        try:
            try:
                await self.server.start(self.config.listen_host, self.config.listen_port)
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", self.config.listen_host, self.config.listen_port, exc)
                return 1
            for server in self.models.values():
                await server.start(health)
            return await self._until_stopped(gateway)
        finally:
            await self.server.stop()
            await asyncio.gather(*(server.stop(TERMINATE_GRACE_SECONDS) for server in self.models.values()))
            await health.close()
            await gateway.close()
            log.info("stopped")

    async def _until_stopped(self, gateway: GatewayClient) -> int:
        margin = min(WALLTIME_MARGIN_SECONDS, self.config.walltime_seconds / 10)
        reporting = asyncio.create_task(self._report(gateway))
        stopping = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {reporting, stopping},
                timeout=max(0.0, self.walltime_end - margin - time.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (reporting, stopping):
                task.cancel()
        if reporting in done:
            return reporting.result()
        if not done:
            end = datetime.datetime.fromtimestamp(self.walltime_end, datetime.UTC)
            log.info("stopping: the walltime ends at %s", end.isoformat(timespec="seconds"))
        return 0

    async def _report(self, gateway: GatewayClient) -> int:
        """Registers, then heartbeats until the gateway says stop (0) or a model fails (1)."""
        try:
            orders = await gateway.register(self.registration)
        except (Refused, Rejected, Unavailable) as exc:
            log.error("not registered with the gateway: %s", exc)
            return 1
        log.info("registered with the gateway as %s", self.config.replica_id)
        sent = self.heartbeat()
        interval = self.config.heartbeat_seconds
        while True:
            interval = _interval(orders, interval)
            if orders.stop:
                log.info("stopping: the gateway says so")
                return 0
            failed = [model.name for model in sent.models if model.state is ModelState.failed]
            if failed:
                log.error(
                    "model servers failed: %s; exiting so that the gateway replaces this replica", failed
                )
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval)
            self._changed.clear()
            sent = self.heartbeat()
            try:
                orders = await gateway.heartbeat(sent)
            except Refused:
                log.info("stopping: the gateway no longer knows this replica (401)")
                return 0
            except (Rejected, Unavailable) as exc:
                log.warning("heartbeat not taken: %s", exc)
                orders = PilotOrders()


def _interval(orders: PilotOrders, current: float) -> float:
    if orders.heartbeat_seconds is None:
        return current
    return min(max(orders.heartbeat_seconds, MIN_HEARTBEAT_SECONDS), MAX_HEARTBEAT_SECONDS)


async def _main(config_file: Path) -> int:
    started = time.time()
    try:
        config = load_config(config_file)
        credentials = load_credentials(config, config_file, started + config.walltime_seconds)
    except ConfigError as exc:
        print(f"pilot: configuration error:\n{exc}", file=sys.stderr)
        return 2
    pilot = Pilot(config, credentials, started)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pilot.request_stop, sig.name)
    log.info(
        "replica %s: %d models, walltime ends in %d s, certificate valid until %s",
        config.replica_id,
        len(config.models),
        config.walltime_seconds,
        credentials.not_after.isoformat(),
    )
    return await pilot.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the JSON file the gateway staged")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_main(args.config))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the `fast` extra): a pilot is a hop on every request's path."""
    try:
        import uvloop
    except ImportError:
        return None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop
