"""A real, throw-away RabbitMQ broker on a free 127.0.0.1 port, for tests and the benchmark.

The Globus Compute service pushes task results over AMQP; only a real broker shows how a consumer
behaves when the broker refuses it, drops it, or goes away and comes back. The Debian package's broker
runs here as a private node: its own node name, data directory, configuration and Erlang cookie (in a
``home`` of its own), listening on loopback only, with no plugins. The data directory survives
``stop()`` and ``start()``, so durable queues and persistent messages come back as on a real restart.

    async with RabbitMQServer(tmp_path) as broker:
        connection = pika.BlockingConnection(pika.URLParameters(broker.url))
        ...
        await broker.restart()

Measured on the development machine: up in about 3.5 s, about 150 MB of memory; SIGTERM (the start
script's own graceful stop: it stops the Erlang VM and waits) closes the listener at once and ends the
process in about 2.5 s. The start script is a shell that waits for the VM, so the broker runs in a
session of its own: if SIGTERM is not enough, SIGKILL reaches the VM too. epmd, the Erlang port mapper
on port 4369, is shared by every node on the machine; a node started when none runs leaves one
behind, as the package's own service would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Final

import pytest

from testing.ports import free_port
from testing.services.base import ServiceProcess

SERVER: Final = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
"""Where the Debian package installs the start script (not on PATH)."""
MISSING_MESSAGE: Final = (
    "rabbitmq-server is not installed. The tests need a real RabbitMQ: install the Debian package "
    "`rabbitmq-server` (apt-get install -y --no-install-recommends rabbitmq-server), as scripts/test-deps "
    "does when run as root; its start script is /usr/lib/rabbitmq/bin/rabbitmq-server."
)
PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
"""A client's first bytes in AMQP 0-9-1; a broker that accepts clients answers Connection.Start."""
CONNECTION_START: Final = b"\x01\x00\x00"
"""A method frame (type 1) on channel 0 ..."""
CONNECTION_START_METHOD: Final = b"\x00\x0a\x00\x0a"
"""... whose method is class 10 (connection), method 10 (start), after the 4-byte frame size."""
CONFIGURATION: Final = """\
log.console = true
log.console.level = info
log.console.use_colors = off
log.file = false
"""
"""Logs to standard output, which the base class writes to the log shown on failure. The guest user keeps
its default: allowed from loopback only, where the broker listens."""


def _server() -> str:
    """The start script; a missing one fails the test loudly rather than skipping it."""
    if not os.access(SERVER, os.X_OK):
        pytest.fail(MISSING_MESSAGE, pytrace=False)
    return str(SERVER)


async def _accepts_clients(port: int) -> bool:
    """Whether the broker answers the AMQP protocol header: its listener starts only once it is booted."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(PROTOCOL_HEADER)
        await writer.drain()
        frame = await asyncio.wait_for(reader.readexactly(11), 1.0)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return frame.startswith(CONNECTION_START) and frame[7:] == CONNECTION_START_METHOD


class RabbitMQServer(ServiceProcess):
    """One RabbitMQ node; ``stop()`` and ``restart()`` keep the port, the node name and the data."""

    name = "rabbitmq"
    ready_timeout = 30.0
    """Up in 3.5 s on an idle machine; the Erlang boot is CPU-bound, and the parallel tests are not idle."""
    stop_timeout = 15.0
    """A clean stop takes 2.5 s; SIGKILL only if it takes six times that."""
    own_session = True

    def __init__(self, directory: Path, port: int = 0) -> None:
        super().__init__(directory, port)
        self.node_name = f"gateway-test-{secrets.token_hex(6)}@localhost"
        """Unique on the machine (epmd knows every node by name), the same across restarts (the data
        directory belongs to the node name)."""

    @property
    def url(self) -> str:
        """The default virtual host as the guest user: what pika.URLParameters takes."""
        if not self.port:
            raise RuntimeError("RabbitMQServer is not started")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    async def prepare(self) -> None:
        for name in ("mnesia", "home"):
            (self.directory / name).mkdir(exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(CONFIGURATION)
        (self.directory / "enabled_plugins").write_text("[].\n")  # an Erlang term: the dot is required
        (self.directory / "rabbitmq-env.conf").write_text("")  # instead of the system's /etc/rabbitmq one

    def command(self, port: int) -> list[str]:
        """The start script with its environment on the command line (env(1) execs it, so the process
        is the script): every path in `directory`, nothing read from /etc/rabbitmq or /var/lib/rabbitmq."""
        directory = self.directory.resolve()
        variables = {
            "HOME": directory / "home",  # the Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": directory / "rabbitmq-env.conf",
            "RABBITMQ_CONFIG_FILE": directory / "rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": directory / "advanced.config",  # absent: none
            "RABBITMQ_ENABLED_PLUGINS_FILE": directory / "enabled_plugins",
            "RABBITMQ_MNESIA_BASE": directory / "mnesia",
            "RABBITMQ_LOG_BASE": directory / "log",
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": port,
            "RABBITMQ_DIST_PORT": free_port(),  # the default, port + 20000, may not exist
            "ERL_EPMD_ADDRESS": "127.0.0.1",  # an epmd this node starts listens on loopback only
            "ERL_CRASH_DUMP": directory / "erl_crash.dump",  # not the working directory
        }
        return ["env", *(f"{name}={value}" for name, value in variables.items()), _server()]

    def popen_options(self) -> dict[str, Any]:
        """Mnesia writes its core file (`MnesiaCore.*`, when the node is killed while writing) to the
        working directory, which ERL_CRASH_DUMP does not move: it goes to `directory` too."""
        return {"cwd": self.directory.resolve()}

    async def ready(self) -> bool:
        return await _accepts_clients(self.port)
