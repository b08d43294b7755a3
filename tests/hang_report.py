"""A pytest plugin: shortly before pytest-timeout fails a test that hangs, the stack of every task
of the running event loop goes to the test's stderr.

pytest-timeout dumps the threads' stacks, and the main thread of a hung asyncio test is always
found in the loop's `select`, which does not say which `await` never returned. A timer thread
sends SIGUSR2 at nine tenths of the test's timeout; the handler runs in the main thread, inside
the running loop, so it can list the loop's tasks.
"""

from __future__ import annotations

import asyncio
import linecache
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

REPORT_AT = 0.9
"""The share of the test's timeout after which its tasks are reported."""


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


def _awaits(task: asyncio.Task[object]) -> list[str]:
    """The task's chain of awaits, outermost first: `Task.print_stack` shows only the outermost
    coroutine's frame, not the `await` inside it that never returned."""
    lines = []
    awaitable: object = task.get_coro()
    while awaitable is not None:
        frame = next(
            (
                getattr(awaitable, name)
                for name in ("cr_frame", "gi_frame", "ag_frame")
                if hasattr(awaitable, name)
            ),
            None,
        )
        if frame is None:
            lines.append(f"    waiting for {awaitable!r}")
            break
        code = frame.f_code
        source = linecache.getline(code.co_filename, frame.f_lineno).strip()
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n    {source}')
        awaitable = next(
            (
                getattr(awaitable, name)
                for name in ("cr_await", "gi_yieldfrom", "ag_await")
                if hasattr(awaitable, name)
            ),
            None,
        )
    return lines


def _report_tasks(signum: int, frame: FrameType | None) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        print("hang report: no event loop is running", file=sys.stderr)
        return
    tasks = asyncio.all_tasks(loop)
    print(f"hang report: {len(tasks)} tasks of the running event loop", file=sys.stderr)
    for task in tasks:
        print(f"{task!r}", *_awaits(task), sep="\n", file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Setup, call and teardown, as pytest-timeout times them."""
    timeout = _timeout_of(item)
    if timeout <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR2, _report_tasks)
    timer = threading.Timer(timeout * REPORT_AT, os.kill, (os.getpid(), signal.SIGUSR2))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)
