"""The operator's tools say what happened: `--version`, `--help` listing every command, exit statuses
of `maintenance` and `reload`, the configured listen backlog, metrics on their own address."""

from __future__ import annotations

import argparse
import asyncio
import configparser
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.core.maintenance import read_state
from proxy.process.cli import build_parser, main
from tests.processes import gateway_process, wait_until_serving
from tests.support import Server, free_port, start_gateway, value, write_gateway_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def configure(tmp_path: Path, backend_url: str = "http://127.0.0.1:9", **change: object) -> Path:
    config = write_gateway_config(tmp_path, backend_url)
    document = yaml.safe_load(config.read_text())
    for key, setting in change.items():
        section, _, field = key.partition("__")
        if field:
            document.setdefault(section, {})[field] = setting
        else:
            document[section] = setting
    return write_yaml(config, document)


def test_version_is_the_packages() -> None:
    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"inference-gateway {metadata['metadata']['version']}"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: command
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, command in action.choices.items()
    }


def listed(help_text: str) -> set[str]:
    """The command names a `--help` lists, one a line under its commands' heading."""
    return set(re.findall(r"^    (\w+) +\S", help_text, re.MULTILINE))


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` names every command, and each command, nested ones included (`usage prune`,
    `token get`), answers its own `--help` and names the commands under it."""
    commands = subcommands(build_parser())
    assert {"maintenance", "usage", "reload", "token"} <= set(commands)
    result = run_cli("--help")
    assert result.returncode == 0
    assert listed(result.stdout) == set(commands)
    pending: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [
        ((name,), command) for name, command in commands.items()
    ]
    answered = set()
    while pending:
        path, command = pending.pop()
        assert main([*path, "--help"]) == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith(f"usage: inference-gateway {' '.join(path)} ")
        under = subcommands(command)
        assert listed(help_text) == set(under)
        pending += [((*path, name), nested) for name, nested in under.items()]
        answered.add(" ".join(path))
    assert {"usage prune", "token login", "token get", "token logout"} <= answered


def test_maintenance_on_an_unknown_cluster_fails_and_changes_nothing(tmp_path: Path) -> None:
    config = configure(tmp_path)
    result = run_cli("--config", str(config), "maintenance", "on", "loacl")
    assert result.returncode == 1
    assert "no cluster named 'loacl'" in result.stderr and "clusters: chatonly, local, uni" in result.stderr
    assert not (tmp_path / "maintenance.yaml").exists()
    assert run_cli("maintenance", "--config", str(config), "on", "local").returncode == 0
    assert list(read_state(tmp_path / "maintenance.yaml")) == ["local"]
    off = run_cli("maintenance", "--config", str(config), "off", "loacl")
    assert off.returncode == 1 and "no cluster named 'loacl'" in off.stderr
    assert run_cli("maintenance", "--config", str(config), "off", "local").returncode == 0
    assert read_state(tmp_path / "maintenance.yaml") == {}


def test_maintenance_off_cannot_end_the_configurations_own(tmp_path: Path) -> None:
    config = configure(tmp_path, maintenance={"local": "Down for a week"})
    result = run_cli("maintenance", "--config", str(config), "off", "local")
    assert result.returncode == 1 and "remove it there and restart" in result.stderr


def test_a_refused_reload_fails_with_the_reason_and_signals_nothing(tmp_path: Path) -> None:
    config = configure(tmp_path, server__pid_file="gateway.pid")
    endpoints = tmp_path / "endpoints.yaml"
    entries = yaml.safe_load(endpoints.read_text())
    entries[0]["endpoint_adapter"] = "adaptors.nowhere.Endpoint"
    write_yaml(endpoints, entries)
    stand_in = subprocess.Popen(["sleep", "60"])  # SIGHUP would end it
    try:
        (tmp_path / "gateway.pid").write_text(f"{stand_in.pid}\n")
        result = run_cli("reload", "--config", str(config))
        assert result.returncode == 2
        assert "reload refused" in result.stderr
        assert "endpoints.yaml, entry 1" in result.stderr and "endpoint_adapter" in result.stderr
        assert stand_in.poll() is None, "the gateway was signalled"
    finally:
        stand_in.kill()
        stand_in.wait()


def test_reload_without_a_gateway_fails(tmp_path: Path) -> None:
    config = configure(tmp_path, server__pid_file="gateway.pid")
    result = run_cli("reload", "--config", str(config))
    assert result.returncode == 1 and "no running gateway to reload" in result.stderr


def listen_backlog(port: int) -> int:
    """The accept queue's length as the kernel has it: `ss` shows it as Send-Q of a listener."""
    output = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    (line,) = output.splitlines()
    return int(line.split()[2])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_configured_backlog_is_the_sockets(backend: Server, tmp_path: Path, workers: str) -> None:
    """3000: neither aiohttp's 128 nor the default 4096, and below this host's somaxconn (4096)."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < 3000:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: the kernel would cap any backlog to it")
    port = free_port()
    config = configure(tmp_path, backend.url, server__port=port, server__backlog=3000)
    async with gateway_process(config, "--workers", workers) as gateway:
        if workers == "2":
            deadline = time.monotonic() + 20
            while gateway.log_text().count("serving on") < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        assert listen_backlog(port) == 3000


async def test_metrics_bind_their_own_host(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The API on 127.0.0.1 only, metrics on 127.0.0.2 (any loopback address works on Linux): a
    scraper reaches metrics at an address the API does not listen on."""
    port = free_port()
    config = configure(tmp_path, backend.url, metrics={"port": port, "host": "127.0.0.2"})
    with socket.socket() as blocker:
        # Bound, never listening: the API's own ephemeral port cannot be `port` (bound on
        # 127.0.0.2 only, it is free on 127.0.0.1), and a connection to it there is refused.
        blocker.bind(("127.0.0.1", port))
        runner, _ = await start_gateway(config)
        try:
            async with http.get(f"http://127.0.0.2:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            assert value(text, "gateway_build_info", version=_version(), python=sys.version.split()[0]) == 1
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"http://127.0.0.1:{port}/metrics"):
                    pass
        finally:
            await runner.cleanup()


def _version() -> str:
    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    return metadata["metadata"]["version"]


def test_the_repository_ships_a_license_and_ignores_no_tracked_file() -> None:
    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    assert metadata["metadata"]["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    ignored = subprocess.run(
        ["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert ignored.stdout == ""


def make_run(*variables: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["make", "-s", "run", *variables],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("variable", ["PORT", "BACKEND_PORT"])
def test_make_run_on_a_busy_port_says_so_in_one_line(variable: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports = {"PORT": str(free_port()), "BACKEND_PORT": str(free_port())}
        ports[variable] = str(taken.getsockname()[1])
        run = make_run(*(f"{name}={port}" for name, port in ports.items()))
        _, stderr = run.communicate(timeout=60)
    assert run.returncode != 0
    # make's own "Error 1" line is "make[1]: ***" when the tests themselves run under make (make test)
    ours = [line for line in stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert ours == [
        f"make run: port {ports[variable]} is not free (Address already in use); "
        f"choose another: make run {variable}=..."
    ]


async def test_make_run_serves_on_the_chosen_ports(http: aiohttp.ClientSession) -> None:
    port, backend_port = free_port(), free_port()
    run = make_run(f"PORT={port}", f"BACKEND_PORT={backend_port}")
    try:
        await wait_until_serving(http, f"http://127.0.0.1:{port}/resource_server/health", timeout=60)
        url = f"http://127.0.0.1:{port}/resource_server/local/vllm/v1/chat/completions"
        body = {
            "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with http.post(url, json=body, headers={"Authorization": "Bearer dev-token"}) as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{backend_port}/health") as response:
            assert response.status == 200
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.communicate(timeout=60)
    assert listening(backend_port) is False, "the backend stopped with the gateway"


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


FAILING_ADAPTOR = """
from adaptors.direct_api import DirectAPIEndpoint


class FailsToStart(DirectAPIEndpoint):
    async def startup(self, context):
        raise RuntimeError("the model registry is unreachable")
"""


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_reload_exits_1_with_the_gateways_reason_when_an_adaptor_fails_to_start(
    backend: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    """The files are valid, so only the running gateway can tell: its processes answer the command."""
    (tmp_path / "site_failing.py").write_text(FAILING_ADAPTOR)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    config = configure(tmp_path, backend.url, server__port=free_port(), server__pid_file="gateway.pid")
    async with gateway_process(config, "--workers", workers) as gateway:
        while gateway.log_text().count("serving on") < int(workers):
            await asyncio.sleep(0.05)
        reloaded = await asyncio.to_thread(run_cli, "reload", "--config", str(config))
        assert reloaded.returncode == 0, reloaded.stderr
        assert "reloaded: 3 clusters, 7 endpoints" in reloaded.stdout
        endpoints = tmp_path / "endpoints.yaml"
        entries = yaml.safe_load(endpoints.read_text())
        entries[0]["endpoint_adapter"] = "site_failing.FailsToStart"
        write_yaml(endpoints, entries)
        refused = await asyncio.to_thread(run_cli, "reload", "--config", str(config))
        assert refused.returncode == 1
        assert "FailsToStart failed to start: the model registry is unreachable" in refused.stderr
        assert refused.stderr.count("failed to start") == int(workers)
