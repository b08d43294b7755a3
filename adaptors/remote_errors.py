"""Failures reported by compute functions, turned into the status the client should see.

The existing gateway's functions report a vLLM error as text containing
`API request failed with status code: N` and `Response text: <vLLM's JSON>`. A client error from
vLLM (a prompt too long, a bad parameter) must reach the client as that 4xx, not as a gateway fault.
"""

from __future__ import annotations

import json
import re

_STATUS = re.compile(r"status code:?\s*(\d{3})")
_RESPONSE_TEXT = re.compile(r"Response text:?\s*(\{.*\})", re.DOTALL)
_LONGEST_MESSAGE = 1000


def remote_error(text: str) -> tuple[int, str]:
    """(HTTP status, message) for a function's error text."""
    match = _STATUS.search(text)
    status = int(match.group(1)) if match else None
    message = _backend_message(text) or text.strip()[:_LONGEST_MESSAGE] or "The remote task failed."
    if status is not None and 400 <= status < 500:
        return status, message
    return 502, f"The model's backend failed: {message}"


def _backend_message(text: str) -> str | None:
    match = _RESPONSE_TEXT.search(text)
    if match is None:
        return None
    try:
        document = json.loads(match.group(1))
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:_LONGEST_MESSAGE]
    message = document.get("message")
    return str(message)[:_LONGEST_MESSAGE] if isinstance(message, str) else None
