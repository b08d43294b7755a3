"""The lines of an OpenAI batch input file: one JSON request each (`custom_id`, `method`, `url`,
`body`), checked when the file is uploaded so that every problem is reported at once, with its line
number, before any line reaches a backend.

Reading is blocking (a local file, line by line, never whole): callers run it in a thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from proxy.core.registry import SERVED_PATHS

BATCH_URLS: Final = frozenset(f"/v1/{path}" for path in SERVED_PATHS)
"""What a line's `url` (and a batch's `endpoint`) may name: the paths the gateway serves."""
MAX_PROBLEMS: Final = 50
"""Enough to fix a file in one pass without an answer as large as the file."""


@dataclass(frozen=True)
class BatchLine:
    number: int
    """1-based, as an editor shows it."""
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def openai_path(self) -> str:
        return self.url.removeprefix("/v1/")


def check_file(path: Path, max_lines: int) -> tuple[int, list[str]]:
    """How many requests the file holds, and its problems (at most `MAX_PROBLEMS`), each naming its
    line: invalid JSON, a missing or repeated `custom_id`, a method other than POST, a `url` the
    gateway does not serve, a `body` without a `model`, or more lines than `max_lines`."""
    seen: set[str] = set()
    problems: list[str] = []
    requests = 0
    for number, raw in _raw_lines(path):
        problem = _problem(raw, seen)
        requests += 1
        if problem is None and requests > max_lines:
            problem = f"more than {max_lines} requests in one file"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            if len(problems) >= MAX_PROBLEMS:
                break
    if requests == 0 and not problems:
        problems.append("line 1: the file holds no requests")
    return requests, problems


def read_lines(path: Path) -> Iterator[BatchLine]:
    """The requests of a file `check_file` accepted, in order."""
    for number, raw in _raw_lines(path):
        document = json.loads(raw)
        yield BatchLine(number, document["custom_id"], document["url"], document["body"])


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if raw.strip():
                yield number, raw


def _problem(raw: bytes, seen: set[str]) -> str | None:
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(document, dict):
        return "not a JSON object"
    custom_id = document.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string"
    if custom_id in seen:
        return f"'custom_id' {custom_id[:100]!r} is used by an earlier line"
    seen.add(custom_id)
    if document.get("method") != "POST":
        return "'method' must be 'POST'"
    url = document.get("url")
    if url not in BATCH_URLS:
        return f"'url' must be one of {', '.join(sorted(BATCH_URLS))}"
    body = document.get("body")
    if not isinstance(body, dict):
        return "'body' must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'body.model' must name a model"
    return None
