"""`--log-format json`: every line the gateway writes, on stdout and stderr, is one JSON object, so the
journal can be read with `jq` alone. The real process, with workers, requests, a malformed request, a
refused reload and a shutdown; and the command's own messages (a configuration error, a busy port)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from testing.processes import exited
from tests.processes import wait_until_serving
from tests.support import Server, auth, chat, free_port, write_gateway_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed; a line that is not a JSON object fails the test, naming it."""
    documents = []
    for line in text.splitlines():
        try:
            document = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(document, dict), line
        documents.append(document)
    return documents


async def _until_logged(path: Path, text: str, count: int = 1, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if path.read_text(errors="replace").count(text) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged {count} times")


async def test_every_line_of_a_running_gateway_is_json(
    backend: Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = write_gateway_config(tmp_path, backend.url, port=port)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config), "--workers", "2",
             "--log-format", "json"],
            cwd=ROOT, stdout=stdout, stderr=stderr, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/resource_server"
    try:
        await wait_until_serving(http, f"{url}/health")
        await _until_logged(err, "serving on", count=2)
        async with http.post(
            f"{url}/local/vllm/v1/chat/completions", json=chat(), headers=auth()
        ) as response:
            assert response.status == 200
        async with http.post(f"{url}/local/vllm/v1/chat/completions", json=chat()) as response:
            assert response.status == 401
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer zq9\x00leak\r\n\r\n")
            raw.recv(4096)
        endpoints = tmp_path / "endpoints.yaml"
        entries = yaml.safe_load(endpoints.read_text())
        entries[0]["endpoint_adapter"] = "adaptors.nowhere.Endpoint"
        write_yaml(endpoints, entries)
        process.send_signal(signal.SIGHUP)
        await _until_logged(err, "reload refused")
    finally:
        process.send_signal(signal.SIGTERM)
        assert await exited(process, 30), "the gateway did not stop"
    assert process.returncode == 0
    records = json_lines(out.read_text())
    assert {200, 401} <= {record["status"] for record in records}
    logs = json_lines(err.read_text())
    messages = [entry["message"] for entry in logs]
    assert sum("serving on" in message for message in messages) == 2
    assert any("refused a malformed request" in message for message in messages)
    refused = next(message for message in messages if "reload refused" in message)
    assert "endpoints.yaml, entry 1" in refused and "\n" in refused, "a multi-line message stays one line"
    assert any("stopped" in message for message in messages)
    assert "zq9" not in err.read_text(), "nothing of the malformed request is logged"
    assert {"time", "level", "logger", "pid", "message"} <= set(logs[0])


def run_json(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "GATEWAY_LOG_FORMAT": "json", **(env or {})},
    )  # fmt: skip


def test_configuration_errors_and_a_busy_port_are_json_too(tmp_path: Path) -> None:
    config = write_gateway_config(tmp_path, "http://127.0.0.1:9")
    write_yaml(tmp_path / "endpoints.yaml", [{"model": "m"}])
    broken = run_json("--config", str(config))
    assert broken.returncode == 2 and broken.stdout == ""
    (error,) = json_lines(broken.stderr)
    assert error["level"] == "ERROR" and "endpoints.yaml, entry 1" in error["message"]

    write_gateway_config(tmp_path, "http://127.0.0.1:9")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        busy = run_json("--config", str(config), "--port", port)
        text = run_json("--config", str(config), "--port", port, env={"GATEWAY_LOG_FORMAT": "text"})
    assert busy.returncode == 1
    (error,) = json_lines(busy.stderr)
    assert error["message"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert text.returncode == 1 and len(text.stderr.splitlines()) == 1 and "Traceback" not in text.stderr


PYTHONS_OWN = """
import threading, warnings
from proxy.process.logs import configure_logging
configure_logging("json")
warnings.warn("a library's deprecation", UserWarning)
thread = threading.Thread(target=lambda: 1 / 0, name="worker-thread")
thread.start(); thread.join()
class Leaky:
    def __del__(self):
        raise ValueError("in a finalizer")
Leaky()
raise SystemError("uncaught at the top")
"""


def test_pythons_own_messages_are_json_too() -> None:
    """Warnings, an exception in a thread, one Python can only ignore, one that ends the program."""
    result = subprocess.run(
        [sys.executable, "-c", PYTHONS_OWN], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and result.stdout == ""
    logs = json_lines(result.stderr)
    messages = " | ".join(f"{entry['message']} {entry.get('exception', '')}" for entry in logs)
    assert "a library's deprecation" in messages
    assert "worker-thread" in messages and "ZeroDivisionError" in messages
    assert "in a finalizer" in messages
    assert "uncaught exception" in messages and "SystemError: uncaught at the top" in messages
