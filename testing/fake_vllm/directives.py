"""The fault directives a prompt may carry, read once per request (see the package's docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

_DIRECTIVE: Final = re.compile(r"\[\[(\w+)(?:=([0-9.]+))?\]\]")
_INT_DIRECTIVES: Final = frozenset({"status", "chunks", "die_after"})
_FLOAT_DIRECTIVES: Final = frozenset({"delay", "chunk_delay"})


@dataclass(frozen=True, slots=True)
class Faults:
    """The directives found in one prompt."""

    status: int | None = None
    delay: float = 0.0
    chunks: int | None = None
    chunk_delay: float = 0.0
    die_after: int | None = None
    garbage: bool = False


NO_FAULTS: Final = Faults()


def parse_faults(text: str) -> Faults:
    """Read the directives of a prompt; the `[[` test keeps ordinary prompts off the regex."""
    if "[[" not in text:
        return NO_FAULTS
    values: dict[str, Any] = {}
    for name, value in _DIRECTIVE.findall(text):
        try:
            if name == "garbage":
                values[name] = True
            elif name in _INT_DIRECTIVES:
                values[name] = int(value)
            elif name in _FLOAT_DIRECTIVES:
                values[name] = float(value)
        except ValueError:
            continue
    return Faults(**values) if values else NO_FAULTS
