"""testing/ports.py: ports for the tests' servers come from below the kernel's ephemeral range, so
that no outgoing connection can take one between `free_port` and the server's bind, and each
pytest-xdist worker has its own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from testing import ports


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_are_below_the_ephemeral_range_distinct_and_free() -> None:
    handed = [ports.free_port() for _ in range(50)]
    assert len(set(handed)) == 50
    assert all(ports.LOWEST <= port < ephemeral_low() for port in handed)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", handed[-1]))


def test_a_port_taken_meanwhile_is_skipped() -> None:
    last, own = ports.free_port(), ports._slice()
    nxt = last + 1 if last + 1 in own else own.start
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", nxt))
        assert ports.free_port() != nxt


def test_each_worker_has_its_own_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(set(ports._slice()))
    assert all(slices) and not (slices[0] & slices[1] or slices[1] & slices[2] or slices[0] & slices[2])
    assert max(max(part) for part in slices) < ephemeral_low()


def test_without_room_below_the_range_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_RANGE_FILE", narrow)
    assert ports._slice() == range(0)
    monkeypatch.setattr(ports, "_rotations", [])
    assert 1024 <= ports.free_port() <= 65535
