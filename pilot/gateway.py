"""The pilot's calls to the gateway: registration, retried while the gateway cannot answer, and
heartbeats. The replica's token goes in the Authorization header and nowhere else: never in a
log line or an error message.

The gateway is reached as any HTTPS site from the compute node, through the site's proxy when
the job's environment names one (HTTPS_PROXY, NO_PROXY).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ValidationError

from pilot.protocol import Heartbeat, PilotOrders, Registration

log = logging.getLogger("pilot.gateway")

CALL_TIMEOUT_SECONDS = 30.0
MAX_ANSWER_BYTES = 64 * 1024
REGISTER_WITHIN_SECONDS = 600.0
"""How long registration is retried (a gateway being restarted, a proxy hiccup) before the pilot
gives up and exits: the gateway then sees a job that never registered and replaces it."""
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0


class Refused(Exception):
    """401: the gateway does not know this replica's token (ended, replaced, or never its own)."""


class Unavailable(Exception):
    """No answer, or an answer the gateway may not give next time (5xx, a broken body)."""


class Rejected(Exception):
    """Another 4xx: asking again will not help."""


async def address_towards(url: str) -> str:
    """This node's address on the route to the gateway's host: what a UDP socket connected there
    (which sends nothing) is bound to. Compute nodes often have several interfaces."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), CALL_TIMEOUT_SECONDS)
    family, kind, protocol, _, sockaddr = infos[0]
    with socket.socket(family, kind, protocol) as sock:
        sock.connect(sockaddr)
        address: str = sock.getsockname()[0]
    return address


class GatewayClient:
    def __init__(self, gateway_url: str, token: str) -> None:
        self._base = gateway_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._session = aiohttp.ClientSession(
            trust_env=True, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_SECONDS)
        )

    async def close(self) -> None:
        await self._session.close()

    async def register(self, registration: Callable[[], Awaitable[Registration]]) -> PilotOrders:
        """Registers, retrying with a growing back-off while the gateway is unavailable, for up to
        REGISTER_WITHIN_SECONDS. `registration` is called for each attempt, so that each carries the
        models' states of the moment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REGISTER_WITHIN_SECONDS
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            try:
                return await self._post("register", await registration())
            except (Unavailable, OSError) as exc:
                if loop.time() + backoff > deadline:
                    raise Unavailable(
                        f"no registration within {REGISTER_WITHIN_SECONDS:g} s: {exc}"
                    ) from None
                log.warning("registration not answered (%s); trying again in %g s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def heartbeat(self, heartbeat: Heartbeat) -> PilotOrders:
        return await self._post("heartbeat", heartbeat)

    async def _post(self, route: str, message: BaseModel) -> PilotOrders:
        url = f"{self._base}/{route}"
        try:
            async with self._session.post(
                url, data=message.model_dump_json(), headers=self._headers
            ) as answer:
                body = await _bounded(answer)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"POST {url}: {type(exc).__name__}: {exc}") from None
        if status == 401:
            raise Refused(f"POST {url}: 401")
        if status >= 500:
            raise Unavailable(f"POST {url}: {status}")
        if status != 200:
            raise Rejected(f"POST {url}: {status}: {body[:500].decode('utf-8', 'replace')}")
        try:
            return PilotOrders.model_validate_json(body)
        except ValidationError as exc:
            raise Unavailable(f"POST {url}: 200 but not PilotOrders: {exc.errors()[0]['msg']}") from None


async def _bounded(answer: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES of it."""
    body = bytearray()
    while len(body) <= MAX_ANSWER_BYTES and (chunk := await answer.content.read(MAX_ANSWER_BYTES)):
        body += chunk
    return bytes(body[: MAX_ANSWER_BYTES + 1])
