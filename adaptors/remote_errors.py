"""Failures reported by compute functions, turned into the status and message the client should see.

Both functions report a vLLM error as text containing `API request failed with status code: N` and
`Response text: <vLLM's body>`. The existing gateway's function goes on with
`Response headers: {...}` and `Response time: ...`, and the endpoint wraps a raised error in its
traceback. A client error from vLLM (a prompt too long, a bad parameter) must reach the client as
that 4xx with vLLM's message; no traceback or header dump reaches a client. Anything but vLLM's own
structured message (an exception's text, which names internal hosts and paths) is replaced by a
generic message naming only the exception's type; the text is the failure's `detail`, for the
request's record and the gateway's log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_STATUS = re.compile(r"status code:?\s*(\d{3})")
_RESPONSE_TEXT = re.compile(r"Response text:?[ \t]*")
_TRACEBACK = "Traceback (most recent call last):"
_NOISE = re.compile(r"\n(Response headers|Response time):.*", re.DOTALL)
_EXCEPTION_PREFIX = re.compile(r"^(?:[\w.]*(?:Error|Exception): )?(?:Unexpected error of type \w+: )?")
_EXCEPTION_TYPE = re.compile(r"^(?:[\w.]*\.)?(\w*(?:Error|Exception)):")
_LONGEST_MESSAGE = 1000
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class RemoteFailure:
    status: int
    message: str
    """What the client sees."""
    detail: str | None
    """The function's own text when the client sees less of it: for the record and the log only."""


def remote_error(text: str) -> RemoteFailure:
    """The client's status and message for a function's error text."""
    match = _STATUS.search(text)
    status = int(match.group(1)) if match else None
    backend_message = _backend_message(text)
    detail = None
    if backend_message is not None:
        message = backend_message
    else:
        last = _last_exception(text)
        detail = _plain(last) or None
        kind = _EXCEPTION_TYPE.match(last)
        if status is not None:
            message = f"The model's server answered HTTP {status}."
        else:
            message = f"The remote task failed ({kind.group(1)})." if kind else "The remote task failed."
    if status is not None and 400 <= status < 500:
        return RemoteFailure(status, message, detail)
    return RemoteFailure(502, f"The model's backend failed: {message}", detail)


def _backend_message(text: str) -> str | None:
    """vLLM's own message: the JSON object right after `Response text:`, whatever follows it."""
    for match in _RESPONSE_TEXT.finditer(text):
        try:
            document, _ = _DECODER.raw_decode(text, match.end())
        except ValueError:
            continue
        message = _message_of(document)
        if message:
            return message[:_LONGEST_MESSAGE]
    return None


def _message_of(document: Any) -> str | None:
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    message = document.get("message")
    return message if isinstance(message, str) else None


def _last_exception(text: str) -> str:
    """The last exception's line and what follows, without the traceback before it."""
    if _TRACEBACK in text:
        lines = text[text.rindex(_TRACEBACK) + len(_TRACEBACK) :].split("\n")
        first = next((n for n, line in enumerate(lines) if line and not line[0].isspace()), len(lines))
        text = "\n".join(lines[first:])
    return text.strip()


def _plain(last_exception: str) -> str:
    """The last exception's own text, without its type, or the response headers and timing the
    existing function appends."""
    text = _NOISE.sub("", last_exception)
    return _EXCEPTION_PREFIX.sub("", text, count=1).strip()[:_LONGEST_MESSAGE]
