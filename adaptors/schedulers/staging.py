"""Staging a file where a job will read it: written whole, then put in place at once (a reader never
sees half of it), readable by its owner only (a pilot's configuration holds its token)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from adaptors.schedulers.contract import SchedulerError

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def checked_file_name(file_name: str) -> str:
    """A staged file's name: one path component, of letters, digits, `.`, `_` and `-`."""
    if not FILE_NAME.fullmatch(file_name):
        raise SchedulerError(f"file name {file_name[:80]!r} is not a plain file name", retryable=False)
    return file_name


def write_private(directory: str, file_name: str, content: bytes) -> str:
    """Writes `content` to `directory/file_name`, readable by its owner only, replacing the file
    at once (a reader never sees half of it). Blocking: call it in a worker thread."""
    target = Path(directory) / checked_file_name(file_name)
    try:
        Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{file_name}.", dir=directory)
    except OSError as exc:
        raise SchedulerError(f"cannot write in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise SchedulerError(f"cannot write {target}: {exc.strerror}") from None
    return str(target)
