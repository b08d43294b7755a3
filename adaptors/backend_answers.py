"""Reading an OpenAI-compatible backend's HTTP answer within the gateway's limits, and what the
client is told of a refusal: shared by the adaptors that call such a backend themselves (a direct
API, an on-demand deployment's replica) and by the clusters that read a status document."""

from __future__ import annotations

import codecs
import contextlib
import json
import ssl
from typing import Any

import aiohttp

from adaptors.context import AnswerLimits


def new_session(max_connections: int, client_ssl: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """One session serves every user of the endpoint, so it keeps no cookies: a cookie a backend (or
    the load balancer in front of it) set in one user's answer would go out with everyone's requests.
    `client_ssl` replaces the default verification (a pilot's mTLS client context)."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        ssl=True if client_ssl is None else client_ssl,
    )
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar()
    )


def refusal_of(response: aiohttp.ClientResponse, text: str | None, limits: AnswerLimits) -> dict[str, Any]:
    """The error fields of an answer for the backend's error status. A backend that failed the
    request (a 5xx other than busy) would fail it again or repeat its work: not retryable. A busy
    backend's own `Retry-After` (in seconds) is passed on. `text` is None when the error answer
    exceeded `limits.error_bytes`."""
    status = _status(response.status)
    retry_after = None
    if status in (429, 503):
        try:
            retry_after = float(response.headers.get("Retry-After", ""))
        except ValueError:
            retry_after = None
    if text is None:
        message: str = f"The backend failed with an error answer over {limits.error_bytes} bytes."
        detail = None
    else:
        message, detail = _upstream_message(response.status, text)
    return {
        "error_code": status,
        "error_message": message[: limits.error_message_chars],
        "error_detail": detail,
        "retryable": False if status == 502 else None,
        "retry_after": retry_after if retry_after is not None and 0 < retry_after < 86400 else None,
    }


async def answer_text(response: aiohttp.ClientResponse, limit: int) -> str | None:
    """The answer as text, or None once it exceeds `limit` bytes. Counted as read, after
    decompression, so neither a huge answer nor a small compressed one that unpacks to a huge one
    is ever held whole. An uncompressed answer of a known length within the limit (the usual one)
    is read in one go."""
    length = response.content_length
    if length is not None and length <= limit and not response.headers.get("Content-Encoding"):
        return (await response.read()).decode(_charset(response), errors="replace")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body.extend(chunk)
        if len(body) > limit:
            return None
    return body.decode(_charset(response), errors="replace")


def _charset(response: aiohttp.ClientResponse) -> str:
    """The declared charset if Python knows it, else UTF-8 (what JSON is)."""
    if response.charset:
        with contextlib.suppress(LookupError):
            return codecs.lookup(response.charset).name
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
