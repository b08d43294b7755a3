"""How much of the gateway's time a request body may take: its deadline, and the turns in which
large bodies are parsed. Policy, set once from the settings; proxy/edge/bodies.py enforces it while
it reads bodies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class BodyDeadline:
    total_seconds: float
    grace_seconds: float
    min_bytes_per_second: float

    def until(self, started: float, received: int) -> float:
        """When the next bytes must have arrived, on the loop's clock."""
        by_rate = started + self.grace_seconds + received / self.min_bytes_per_second
        return min(started + self.total_seconds, by_rate)


@dataclass(frozen=True)
class LargeBodies:
    threshold: int
    turns: asyncio.Semaphore
    wait_seconds: float
