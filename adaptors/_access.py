"""Access lists as the existing gateway's fixtures write them: a list or a comma-separated string."""

from __future__ import annotations

from collections.abc import Iterable


def access_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]
