"""A stand-in for the pilot program, run as a real process by the local scheduler in the
controller's tests: `python tests/standin_pilot.py --config FILE`.

It speaks the protocol of pilot/protocol.py to the gateway's real routes (register, heartbeat
with the replica's bearer token, `stop` honoured) and serves mTLS with the site CA (client
certificate required, subject checked) on 127.0.0.1, but runs no model server: its "model"
answers every `/deployments/{name}/...` request itself. The model command in the staged
configuration scripts it: `ready-after SECONDS` (loading, then ready) or `fail`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from mtls.certificates import expires_at
from mtls.contexts import peer_subject, server_context
from pilot.protocol import Heartbeat, ModelReport, ModelState, PilotConfig, PilotOrders, Registration

GIVE_UP_SECONDS = 30.0
"""A stand-in whose gateway stays away this long exits: no test leaves one running."""


class StandIn:
    def __init__(self, config: PilotConfig) -> None:
        self.config = config
        self.model = config.models[0]
        self.started = time.time()
        self.unreachable_since: float | None = None

    def report(self) -> ModelReport:
        command = self.model.command
        if command[0] == "fail":
            return ModelReport(name=self.model.name, state=ModelState.failed, detail="scripted failure")
        ready = time.time() - self.started >= float(command[1])
        return ModelReport(name=self.model.name, state=ModelState.ready if ready else ModelState.loading)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(replica_id=self.config.replica_id, models=(self.report(),))

    @web.middleware
    async def authorize(self, request: web.Request, handler: object) -> web.StreamResponse:
        if peer_subject(request.transport) not in self.config.gateway_subjects:
            return web.json_response({"error": "forbidden"}, status=403)
        return await handler(request)  # type: ignore[operator, no-any-return]

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(json.loads(self.heartbeat().model_dump_json()))

    async def model_call(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "replica": self.config.replica_id,
                "model": request.match_info["name"],
                "path": request.match_info["path"],
            }
        )

    async def call(self, session: aiohttp.ClientSession, route: str, body: str) -> PilotOrders | None:
        headers = {"Authorization": f"Bearer {self.config.token}", "Content-Type": "application/json"}
        try:
            async with session.post(
                f"{self.config.gateway_url}/{route}", data=body, headers=headers
            ) as answer:
                self.unreachable_since = None
                if answer.status == 401:
                    print(f"{route}: refused", flush=True)
                    sys.exit(1)
                if answer.status != 200:
                    print(f"{route}: {answer.status} {await answer.text()}", flush=True)
                    return None
                return PilotOrders.model_validate_json(await answer.read())
        except (aiohttp.ClientError, OSError) as exc:
            print(f"{route}: {exc}", flush=True)  # the gateway restarts: try again at the next beat
            self.unreachable_since = self.unreachable_since or time.monotonic()
            if time.monotonic() - self.unreachable_since > GIVE_UP_SECONDS:
                print("the gateway is gone", flush=True)
                sys.exit(2)
            return None

    async def run(self) -> None:
        config = self.config
        app = web.Application(middlewares=[self.authorize])
        app.router.add_get("/pilot/status", self.status)
        app.router.add_route("*", "/deployments/{name}/{path:.*}", self.model_call)
        runner = web.AppRunner(app)
        await runner.setup()
        context = server_context(Path(config.certificate), Path(config.key), Path(config.ca))
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        registration = Registration(
            replica_id=config.replica_id,
            address="127.0.0.1",
            port=port,
            models=(self.report(),),
            walltime_end=self.started + config.walltime_seconds,
            certificate_not_after=expires_at(Path(config.certificate)).timestamp(),
        )
        interval = config.heartbeat_seconds
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            orders = None
            while orders is None:
                orders = await self.call(session, "register", registration.model_dump_json())
                if orders is None:
                    await asyncio.sleep(interval)
            while not orders.stop:
                interval = orders.heartbeat_seconds or interval
                await asyncio.sleep(interval)
                orders = await self.call(session, "heartbeat", self.heartbeat().model_dump_json()) or orders
        print("told to stop", flush=True)
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    config = PilotConfig.model_validate_json(parser.parse_args().config.read_bytes())
    asyncio.run(StandIn(config).run())


if __name__ == "__main__":
    main()
