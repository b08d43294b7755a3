"""Ports on the loopback interface for servers started by tests and benchmarks.

A port the kernel picks (binding port 0) comes from its ephemeral range, the range it also gives
every outgoing connection its local port from. Between `free_port` returning and the server
binding, a connection opened meanwhile (any test's client, the server's own) could take that very
port, and the server's bind then failed (a test's metrics port lost that race in `make test`). So
the ports come from just below the ephemeral range, where the kernel never picks one on its own.
Each pytest-xdist worker takes its own slice of them, and a process hands each out once before it
goes round again: workers never share a port, and a port handed out a moment ago is not handed out
again while its server may still be starting. Each is checked free (bound, then let go) before it
is handed out; whoever starts a server on it must still be ready to try again if another program
took it (testing.services does).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

SPAN = 12_000
"""How many ports below the ephemeral range are used."""
LOWEST = 10_000
"""Never below this: the registered ports of common services (PostgreSQL's, Redis's) lie lower."""
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A port nobody listens on right now, outside the kernel's ephemeral range when there is room."""
    with _lock:
        if not _rotations:
            ports = _slice()
            _rotations.append((len(ports), _rotation(ports)))
        size, candidates = _rotations[0]
        for port in itertools.islice(candidates, size):
            if _bindable(port):
                return port
    return _kernel_port()


def _slice() -> range:
    """This process's own ports: its xdist worker's share of the span below the ephemeral range."""
    try:
        low = int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    start = max(LOWEST, low - SPAN)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % workers if worker.isdigit() else 0
    size = (low - start) // workers
    return range(start + index * size, start + (index + 1) * size)


def _rotation(ports: range) -> Iterator[int]:
    """The slice round and round, starting at a place of its own so that two runs of the same
    worker (a test's subprocess, a benchmark beside the tests) start apart."""
    if not ports:
        return iter(())
    offset = (os.getpid() * 7919) % len(ports)
    return itertools.cycle([*ports[offset:], *ports[:offset]])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


_lock = threading.Lock()
_rotations: list[tuple[int, Iterator[int]]] = []
"""This process's slice, made at the first call (pytest-xdist names the worker after imports)."""
