"""The tests' fake Globus Auth and Groups as a process of its own, for the benchmark's globus gateway.

    python -m bench.fake_globus_server [--port P] --token T [--username U]

The benchmark pins this process to the load generator's CPU, so that answering Globus calls never
takes CPU time from the gateway being measured. Once listening it prints one JSON line with its URLs
and client credentials (what the gateway's `auth.globus` section needs); on SIGTERM or SIGINT it
prints one JSON line with the number of requests per Globus API, so the benchmark can check that the
gateway's cache kept introspection to a single call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any, Final

from testing.fake_globus.auth import FakeGlobus
from testing.fake_globus.identities import DEPENDENT_TOKEN_GRANT, FakeUser

DEFAULT_USERNAME: Final = "bench@example.org"


def announce(fake: FakeGlobus) -> dict[str, Any]:
    """Everything the gateway's configuration needs, so the caller hard-codes none of the fake's defaults."""
    return {
        "url": fake.url,
        "auth_url": fake.auth_url,
        "groups_url": fake.groups_url,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "scope": fake.scope,
    }


def counts(fake: FakeGlobus) -> dict[str, int]:
    """Calls per Globus API: the figures that show whether the gateway's cache was warm."""
    grants = [r for r in fake.requests if r.path.endswith("/oauth2/token")]
    return {
        "introspections": fake.count("/token/introspect"),
        "dependent_tokens": sum(1 for r in grants if r.form.get("grant_type") == DEPENDENT_TOKEN_GRANT),
        "my_groups": fake.count("/my_groups"),
        "requests": len(fake.requests),
    }


async def serve(port: int, token: str, username: str) -> None:
    fake = FakeGlobus()
    fake.add_token(token, FakeUser.single(username))
    # FakeGlobus listens on whatever port `_port` holds (0 means an ephemeral one); it offers no
    # public way to choose it, so a fixed port is set there. With the default 0 the URL printed
    # below is the only way to learn the port, which avoids racing another process for it.
    fake._port = port
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await fake.start()
    try:
        print(json.dumps(announce(fake)), flush=True)
        await stopping.wait()
    finally:
        await fake.stop()
    print(json.dumps({"counts": counts(fake)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="0 (the default) picks a free port")
    parser.add_argument("--token", required=True, help="the access token the fake accepts")
    parser.add_argument("--username", default=DEFAULT_USERNAME, help="whose token it is")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be in [0, 65535]")
    asyncio.run(serve(args.port, args.token, args.username))


if __name__ == "__main__":
    main()
