"""What the server hands to adaptors, so that adaptors never import the server."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

from adaptors.relay import StreamRelay


@dataclass(frozen=True)
class AdaptorContext:
    """Shared resources, given to every adaptor's `startup`.

    `executor` is a bounded thread pool for blocking libraries (SDKs built on `requests`):
    running them on the event loop would freeze every other request. `relay` carries streams of
    backends that call back (see adaptors/relay.py).
    """

    executor: Executor
    relay: StreamRelay
