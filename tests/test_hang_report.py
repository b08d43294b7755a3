"""The hang report (tests/hang_report.py) names the await a hung test waits in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ["-p", "tests.hang_report", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto", "-c", os.devnull]

HUNG = """
import asyncio
import pytest

async def wait_for_nothing(event):
    await event.wait()

@pytest.mark.timeout(3)
async def test_hangs():
    await wait_for_nothing(asyncio.Event())
"""


def test_a_hung_test_reports_where_each_task_waits(tmp_path: Path) -> None:
    (tmp_path / "test_hung.py").write_text(HUNG)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *OPTIONS,
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_hung.py"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Timeout" in result.stdout
    report = result.stdout[result.stdout.index("hang report:") :]
    assert "in wait_for_nothing" in report and "await event.wait()" in report
