"""How a pilot ends: refusing to start (bad configuration, a certificate that expires too soon),
stopped (SIGTERM while a stream runs, POST /pilot/stop, 401 on a heartbeat, its walltime), or
failing (a model server that dies or never becomes healthy, a registration refused). It never
leaves a model server behind.

A model server whose port another process took between the pilot picking it and the server
binding it is started again on another port, a bounded number of times. That race is made real:
the model command first starts a separate process (another job's server, in a session of its own,
so the pilot's end of the failed server's process group spares it) that listens on the port the
pilot picked, then runs the fake vLLM on that same port, which fails to bind and exits with the
error a real server prints."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from pilot.models import PORT_ATTEMPTS
from pilot.protocol import ModelState, PilotOrders
from testing.processes import children
from tests.pilot_support import (
    MODEL,
    TOKEN,
    FakeGateway,
    PilotProcess,
    Site,
    alive,
    make_site,
    until,
    write_config,
)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gateway = await FakeGateway(orders=PilotOrders(heartbeat_seconds=1)).start()
    yield gateway
    await gateway.stop()


async def _serving(gateway: FakeGateway, pilot: PilotProcess) -> tuple[int, list[int]]:
    """The pilot's port and its model servers' process ids, once the model is ready."""
    await until(lambda: ModelState.ready in gateway.states() or pilot.process.poll() is not None, 30, "ready")
    assert pilot.process.poll() is None, pilot.output()
    return gateway.registrations[0].port, children(pilot.process.pid)


def _refused(tmp_path: Path, document: dict[str, object] | str) -> str:
    """What `python -m pilot` prints when it refuses to start (status 2)."""
    config = tmp_path / "pilot.json"
    config.write_text(document if isinstance(document, str) else json.dumps(document))
    result = PilotProcess(config)
    assert result.process.wait(60) == 2
    return result.output()


async def test_a_bad_configuration_names_the_file_and_field(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    document = json.loads(write_config(tmp_path, site, gateway).read_text())
    document["models"][0]["port"] = "eighty"
    del document["walltime_seconds"]
    output = _refused(tmp_path, document)
    assert f"{tmp_path / 'pilot.json'}: models.0.port:" in output
    assert f"{tmp_path / 'pilot.json'}: walltime_seconds: Field required" in output
    assert TOKEN not in output
    twice = {**document, "walltime_seconds": 60, "models": [document["models"][0]] * 2}
    twice["models"] = [{**model, "port": 0} for model in twice["models"]]
    assert "models.1.name: 'tiny-chat' names another model too" in _refused(tmp_path, twice)
    assert "pilot.json: (the whole file): Invalid JSON" in _refused(tmp_path, "{not json")


async def test_a_certificate_expiring_before_the_walltime_is_refused(
    gateway: FakeGateway, tmp_path: Path
) -> None:
    short = make_site(tmp_path / "short", pilot_days=0.5)
    document = json.loads(write_config(tmp_path, short, gateway).read_text())
    output = _refused(tmp_path, {**document, "walltime_seconds": 86400})
    assert "certificate:" in output and "expires at" in output and "before the walltime ends" in output
    assert not gateway.registrations
    output = _refused(tmp_path, {**document, "key": str(short.pair("gateway")[1])})
    assert "cannot load" in output


async def test_sigterm_lets_a_stream_finish_then_ends_the_model_servers(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        port, servers = await _serving(gateway, pilot)
        body = {
            "model": MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "[[chunks=6]] [[chunk_delay=0.3]] hi"}],
        }
        url = f"https://127.0.0.1:{port}/deployments/{MODEL}/v1/chat/completions"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, ssl=site.client("gateway")) as answer,
        ):
            assert answer.status == 200
            first = await answer.content.readline()
            assert first.startswith(b"data: ")
            async with session.get(
                f"https://127.0.0.1:{port}/pilot/status", ssl=site.client("gateway")
            ) as status:
                assert (await status.json())["in_flight"] == 1
            pilot.process.send_signal(signal.SIGTERM)
            rest = await answer.content.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert await pilot.exit_code(60) == 0, pilot.output()
        assert not any(alive(pid) for pid in servers)
        assert "stopping: SIGTERM" in pilot.output()
    finally:
        await pilot.stop()


async def test_sigterm_while_a_model_loads_ends_it(site: Site, gateway: FakeGateway, tmp_path: Path) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway, load_seconds=120))
    try:
        await until(lambda: bool(gateway.registrations), 30, "registered")
        servers = children(pilot.process.pid)
        assert servers
        pilot.process.send_signal(signal.SIGTERM)
        assert await pilot.exit_code(30) == 0, pilot.output()
        assert not any(alive(pid) for pid in servers)
        assert "failed" not in pilot.output()
    finally:
        await pilot.stop()


async def test_the_gateway_can_stop_the_pilot_on_its_port(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        port, servers = await _serving(gateway, pilot)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"https://127.0.0.1:{port}/pilot/stop", ssl=site.client("gateway")) as answer,
        ):
            assert answer.status == 202
        assert await pilot.exit_code(60) == 0, pilot.output()
        assert "POST /pilot/stop from CN=gateway,O=Test Lab: 202" in pilot.output()
        assert not any(alive(pid) for pid in servers)
    finally:
        await pilot.stop()


async def test_a_401_on_a_heartbeat_stops_the_pilot(site: Site, gateway: FakeGateway, tmp_path: Path) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        _, servers = await _serving(gateway, pilot)
        gateway.token = "another replica's token, as after the gateway ended this one"
        assert await pilot.exit_code(30) == 0, pilot.output()
        assert "no longer knows this replica (401)" in pilot.output()
        assert not any(alive(pid) for pid in servers)
    finally:
        await pilot.stop()


async def test_a_model_server_that_dies_is_reported_and_the_pilot_exits(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        _, servers = await _serving(gateway, pilot)
        os.kill(servers[0], signal.SIGKILL)
        assert await pilot.exit_code(30) == 1, pilot.output()
        last = gateway.heartbeats[-1].models[0]
        assert last.state is ModelState.failed and "exited with status -9" in last.detail
    finally:
        await pilot.stop()


async def test_a_model_server_that_cannot_start_fails(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    crash = [sys.executable, "-c", "import sys; print('no GPU found'); sys.exit(3)"]
    model = {"name": MODEL, "command": crash, "port": 0}
    pilot = PilotProcess(write_config(tmp_path, site, gateway, models=[model]))
    assert await pilot.exit_code(60) == 1, pilot.output()
    reported = [*gateway.registrations, *gateway.heartbeats][-1].models[0]
    assert reported.state is ModelState.failed and reported.detail == "exited with status 3 while loading"
    assert f"[{MODEL}] no GPU found" in pilot.output()


async def test_a_model_server_not_healthy_in_time_fails(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    slow = write_config(tmp_path, site, gateway, load_seconds=60)
    document = json.loads(slow.read_text())
    document["models"][0]["startup_timeout_seconds"] = 1
    slow.write_text(json.dumps(document))
    pilot = PilotProcess(slow)
    try:
        await until(lambda: bool(gateway.registrations), 30, "registered")
        servers = children(pilot.process.pid)
        assert await pilot.exit_code(30) == 1, pilot.output()
        assert [*gateway.registrations, *gateway.heartbeats][-1].models[0].detail == "not healthy within 1 s"
        assert not any(alive(pid) for pid in servers)
    finally:
        await pilot.stop()


async def test_registration_is_retried_while_the_gateway_is_unavailable(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    gateway.unavailable = 2
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        await _serving(gateway, pilot)
        assert gateway.unavailable == 0 and len(gateway.registrations) == 1
        assert pilot.output().count("registration not answered") == 2
    finally:
        await pilot.stop()


async def test_a_refused_registration_ends_the_pilot(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    gateway.register_status = 401
    pilot = PilotProcess(write_config(tmp_path, site, gateway))
    try:
        assert await pilot.exit_code(30) == 1, pilot.output()
        assert "not registered with the gateway" in pilot.output() and TOKEN not in pilot.output()
    finally:
        await pilot.stop()


async def test_the_pilot_stops_before_its_walltime_ends(
    site: Site, gateway: FakeGateway, tmp_path: Path
) -> None:
    pilot = PilotProcess(write_config(tmp_path, site, gateway, walltime_seconds=8))
    try:
        _, servers = await _serving(gateway, pilot)
        assert await pilot.exit_code(15) == 0, pilot.output()
        # It began stopping a tenth of the walltime (0.8 s) before the end; how long stopping
        # takes depends on the machine's load.
        began = re.search(r"^(\S+ \S+) INFO pilot: stopping: the walltime ends at", pilot.output(), re.M)
        assert began, pilot.output()
        moment = datetime.datetime.strptime(began.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        assert moment < gateway.registrations[0].walltime_end - 0.5
        assert not any(alive(pid) for pid in servers)
    finally:
        await pilot.stop()


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


@pytest.mark.parametrize("quiet", ["says-why", "quiet"])
async def test_a_server_whose_port_was_taken_starts_again_on_another(
    site: Site, gateway: FakeGateway, tmp_path: Path, holders: Path, quiet: str
) -> None:
    """Known from the server's output, or, when it prints nothing, from the port held now."""
    pilot = PilotProcess(_config(tmp_path, site, gateway, holders, times=1, quiet=quiet))
    try:
        await _serving(gateway, pilot)
        output = pilot.output()
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
