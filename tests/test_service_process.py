"""A real server started for tests stops when the process that started it is killed outright: a test
run killed with SIGKILL must not leave brokers and databases running (testing/services/base.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.services.base import ServiceProcess
from testing.services.postgres_server import PostgresServer
from testing.services.rabbitmq_server import RabbitMQServer
from testing.services.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
STARTED_WITHIN = 60.0
"""The broker boots in about 4 s alone, longer beside the parallel tests."""

LAUNCHER = """
import asyncio, importlib, sys
from pathlib import Path
module, name, directory = sys.argv[1:]
server = getattr(importlib.import_module(module), name)(Path(directory))
async def main():
    await server.start()
    print(server.process.pid, server.port, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""
"""Starts one server, says where it runs, and waits to be killed."""


def _alive(pid: int) -> bool:
    """Running: a zombie (ended, not yet reaped by whoever inherited it) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True
    return False


@pytest.mark.parametrize("server_class", [RedisServer, PostgresServer, RabbitMQServer])
def test_a_server_stops_when_its_launcher_is_killed(
    tmp_path: Path, server_class: type[ServiceProcess]
) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, server_class.__module__, server_class.__name__, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    pid = 0
    try:
        assert launcher.stdout is not None
        with launcher.stdout:
            line = launcher.stdout.readline()  # b"" once the launcher gave up: its start has deadlines
        status = launcher.wait(STARTED_WITHIN) if not line else None
        assert line, f"the launcher exited ({status}) without starting {server_class.name}"
        pid, port = (int(field) for field in line.split())
        assert _alive(pid) and _listening(port)

        launcher.kill()
        launcher.wait(10)

        deadline = time.monotonic() + server_class.stop_timeout + 10
        while (_alive(pid) or _listening(port)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), f"{server_class.name} kept running after its launcher was killed"
        assert not _listening(port)
    finally:
        launcher.kill()
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                if server_class.own_session:
                    os.killpg(pid, signal.SIGKILL)  # the broker's start script and its Erlang VM
                else:
                    os.kill(pid, signal.SIGKILL)
