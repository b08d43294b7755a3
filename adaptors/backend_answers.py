"""Reading an OpenAI-compatible backend's HTTP answer within the gateway's limits, and what the
client is told of a refusal: shared by the adaptors that call such a backend themselves (a direct
API, an on-demand deployment's replica) and by the clusters that read a status document."""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
from typing import Any

from adaptors.context import AnswerLimits
from adaptors.http_wire import Head


def refusal_of(head: Head, text: str | None, limits: AnswerLimits) -> dict[str, Any]:
    """The error fields of an answer for the backend's error status. A backend that failed the
    request (a 5xx other than busy) would fail it again or repeat its work: not retryable. A busy
    backend's own `Retry-After` (in seconds) is passed on. `text` is None when the error answer
    exceeded `limits.error_bytes`."""
    status = _status(head.status)
    retry_after = None
    if status in (429, 503):
        try:
            retry_after = float(head.header("Retry-After") or "")
        except ValueError:
            retry_after = None
    if text is None:
        message: str = f"The backend failed with an error answer over {limits.error_bytes} bytes."
        detail = None
    else:
        message, detail = _upstream_message(head.status, text)
    return {
        "error_code": status,
        "error_message": message[: limits.error_message_chars],
        "error_detail": detail,
        "retryable": False if status == 502 else None,
        "retry_after": retry_after if retry_after is not None and 0 < retry_after < 86400 else None,
    }


def answer_text(head: Head, body: bytes | None) -> str | None:
    """The answer as text, or None when it exceeded its limit (the client read it within the
    limit, counted after decompression: adaptors/http_client.py)."""
    if body is None:
        return None
    return body.decode(_charset(head.header("Content-Type")), errors="replace")


@functools.lru_cache(maxsize=64)
def _charset(content_type: str | None) -> str:
    """The declared charset if Python knows it, else UTF-8 (what JSON is)."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            with contextlib.suppress(LookupError, ValueError):
                return codecs.lookup(value.strip().strip('"')).name
    return "utf-8"


def too_large(limit: int) -> str:
    return f"The backend's answer is larger than the gateway's limit of {limit} bytes."


def is_redirect(status: int) -> bool:
    return 300 <= status < 400


def redirected(status: int) -> str:
    """Redirects are never followed: a backend (or whoever answers in its place) could send the
    prompt and the gateway's credentials to any URL, loopback services included."""
    return f"The backend answered with a redirect (HTTP {status}), which the gateway does not follow."


def _status(upstream_status: int) -> int:
    """A client error stays the client's; a backend failure is a bad gateway, unless it says busy."""
    if upstream_status < 500 or upstream_status in (503, 504):
        return upstream_status
    return 502


def _upstream_message(status: int, text: str) -> tuple[str, str | None]:
    """(message, detail): a backend's own structured message (vLLM's `{"error": {"message"}}`, or a
    `message` or `detail` string) reaches the client; any other text (an HTML error page, a proxy's
    or a traceback, naming internal hosts) is the detail, kept in the record and replaced by a
    generic message."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_LONGEST_MESSAGE], None
        for key in ("message", "detail", "error"):
            if isinstance(document.get(key), str):
                return str(document[key])[:_LONGEST_MESSAGE], None
    detail = text.strip()[:_LONGEST_DETAIL] or None
    return f"The backend failed with HTTP status {status} and no error message to pass on.", detail


_LONGEST_MESSAGE = 2000
_LONGEST_DETAIL = 4000
