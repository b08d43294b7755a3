"""What a request record may hold so that both databases always take it.

A record describes what a client or a backend sent, so its text can hold anything Python can: a
lone surrogate (an undecodable header byte, a ``\\ud800`` escape in JSON) that neither SQLite's nor
PostgreSQL's driver can encode, or a NUL (``%00`` in a path), which PostgreSQL's text refuses. A
record the database refuses would be lost, and a client could then hide its own requests: such
characters are written as backslash escapes instead. Building a record checks its client-given
text (``stored_text``); ``storable`` is the last resort for a record the database still refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Final, TypeVar, overload

MAX_TOKENS: Final = 2**31 - 1
"""The largest count kept (PostgreSQL's INTEGER): a backend that reports more is wrong, and a count
the database refuses would lose the whole request record."""
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")

R = TypeVar("R")


@overload
def stored_text(text: str) -> str: ...
@overload
def stored_text(text: None) -> None: ...
def stored_text(text: str | None) -> str | None:
    """``text`` as both databases store it; the common case, plain text, costs a scan in C."""
    if text is None or ("\x00" not in text if text.isascii() else _UNSTORABLE.search(text) is None):
        return text
    return _UNSTORABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match[0]):02x}" if match[0] == "\x00" else f"\\u{ord(match[0]):04x}"


def storable(record: R) -> R:
    """A copy of a record (a dataclass) with every text made storable and every whole number in the
    columns' range: a negative count is no count, a larger one the largest (INTEGER is 32-bit in
    PostgreSQL)."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(record):  # type: ignore[arg-type]
        value = getattr(record, field.name)
        if isinstance(value, str):
            changes[field.name] = stored_text(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            changes[field.name] = None if value < 0 else min(value, MAX_TOKENS)
    return dataclasses.replace(record, **changes)  # type: ignore[type-var]
