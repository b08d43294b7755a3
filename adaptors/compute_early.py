"""Results pushed over the result queue before any request waits for them, kept a short while.

The message with a task's result can beat the answer to its submission: the request that submitted
the task then finds its result here when it starts waiting. Results nobody waits for (those of
batches and asynchronous tasks, read by status calls; a request that gave up) come this way too, so
the store is bounded in count, size and age, and loses its oldest first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from adaptors.compute_result_queue import QueuedResult

MAX_RESULTS = 10_000
MAX_CHARS = 32 * 1024 * 1024
KEEP_SECONDS = 10.0


@dataclass
class EarlyResults:
    _results: OrderedDict[str, tuple[float, QueuedResult]] = field(default_factory=OrderedDict)
    _chars: int = 0

    def keep(self, result: QueuedResult) -> None:
        now = time.monotonic()
        self.take(result.task_id)
        self._results[result.task_id] = (now, result)
        self._chars += _size(result)
        while self._results:
            task_id, (arrived, _) = next(iter(self._results.items()))
            bounded = len(self._results) <= MAX_RESULTS and self._chars <= MAX_CHARS
            if bounded and now - arrived < KEEP_SECONDS:
                break
            self.take(task_id)

    def take(self, task_id: str) -> QueuedResult | None:
        kept = self._results.pop(task_id, None)
        if kept is None:
            return None
        self._chars -= _size(kept[1])
        return kept[1]

    def __len__(self) -> int:
        return len(self._results)


def _size(result: QueuedResult) -> int:
    return len(result.data or "")
