"""Ports on the loopback interface for servers started by tests and benchmarks."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now: another process may take it before the caller binds it, so
    whoever starts a server on it must be ready to try again (testing.services does)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
