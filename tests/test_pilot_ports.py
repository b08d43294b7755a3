"""A model server's port taken by another process between the pilot picking it and the server
binding it: the pilot starts the server again on another port, a bounded number of times.

The race is made real: the model command first starts a separate process (another job's server,
in a session of its own, so the pilot's end of the failed server's process group spares it) that
listens on the port the pilot picked, then runs the fake vLLM on that same port, which fails to
bind and exits with the error a real server prints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pilot.models import PORT_ATTEMPTS
from pilot.protocol import ModelState, PilotOrders
from tests.pilot_support import MODEL, FakeGateway, PilotProcess, Site, make_site, until, write_config

HOLD_PORT = """
import socket, sys, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
open(sys.argv[2], "w").close()
listener.settimeout(1)
deadline = time.monotonic() + 120  # outlives no test, even one that could not kill it
while time.monotonic() < deadline:
    try:
        listener.accept()[0].close()  # another server: it answers nothing the pilot asks
    except TimeoutError:
        pass
"""

TAKE_PORT_FIRST = """
import os, subprocess, sys, time
from pathlib import Path

port, holders, times, hold, quiet = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[5], sys.argv[6]
taken = holders.read_text().split() if holders.exists() else []
if len(taken) < times:
    ready = holders.with_name(f"bound-{port}")
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, port, str(ready)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    holders.write_text(" ".join([*taken, str(holder.pid)]))
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
if quiet == "quiet":  # a server that says nothing of why it exits
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(1, 2)
fake = [sys.executable, "-m", "testing.fake_vllm", "--port", port, "--model", sys.argv[4]]
os.execv(sys.executable, fake)
"""


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gateway = await FakeGateway(orders=PilotOrders(heartbeat_seconds=1)).start()
    yield gateway
    await gateway.stop()


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[Path]:
    """Where the model command lists the port holders it started; they are ended afterwards."""
    path = tmp_path / "holders" / "pids"
    path.parent.mkdir()
    yield path
    for pid in path.read_text().split() if path.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _config(
    tmp_path: Path, site: Site, gateway: FakeGateway, holders: Path, times: int, quiet: str = "says-why"
) -> Path:
    script = tmp_path / "take_port_first.py"
    script.write_text(TAKE_PORT_FIRST)
    command = [sys.executable, str(script), "{port}", str(holders), str(times), MODEL, HOLD_PORT, quiet]
    return write_config(tmp_path, site, gateway, models=[{"name": MODEL, "command": command, "port": 0}])


def _ready_or_ended(gateway: FakeGateway, pilot: PilotProcess) -> bool:
    return ModelState.ready in gateway.states() or pilot.process.poll() is not None


@pytest.mark.parametrize("quiet", ["says-why", "quiet"])
async def test_a_server_whose_port_was_taken_starts_again_on_another(
    site: Site, gateway: FakeGateway, tmp_path: Path, holders: Path, quiet: str
) -> None:
    """Known from the server's output, or, when it prints nothing, from the port held now."""
    pilot = PilotProcess(_config(tmp_path, site, gateway, holders, times=1, quiet=quiet))
    try:
        await until(lambda: _ready_or_ended(gateway, pilot), 30, "ready")
        output = pilot.output()
        assert pilot.process.poll() is None, output
        assert ModelState.failed not in gateway.states()
        assert ("address already in use" in output.lower()) is (quiet == "says-why")
        taken = next(line for line in output.splitlines() if "another process took port" in line)
        first, second = [int(word) for word in taken.replace(";", " ").split() if word.isdigit()][-2:]
        assert first != second
        assert len(holders.read_text().split()) == 1
    finally:
        await pilot.stop()


async def test_a_port_taken_every_time_fails_after_a_bounded_number_of_ports(
    site: Site, gateway: FakeGateway, tmp_path: Path, holders: Path
) -> None:
    pilot = PilotProcess(_config(tmp_path, site, gateway, holders, times=PORT_ATTEMPTS + 5))
    try:
        assert await pilot.exit_code(60) == 1, pilot.output()
        reported = [*gateway.registrations, *gateway.heartbeats][-1].models[0]
        assert reported.state is ModelState.failed
        assert reported.detail == "exited with status 1 while loading"
        assert pilot.output().count("another process took port") == PORT_ATTEMPTS - 1
        assert len(holders.read_text().split()) == PORT_ATTEMPTS
    finally:
        await pilot.stop()
