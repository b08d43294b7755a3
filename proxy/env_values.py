"""Setting values that come from the existing gateway's environment variables, in its formats.

A site moves with its `.env` unchanged, so every form the existing gateway reads is read here:
lists separated by whitespace (one item per line) or `;`, JSON lists and objects. Commas are
accepted too. A value in none of these forms is a configuration error, never a silent mis-read.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator

_SEPARATORS = re.compile(r"[\s;,]+")
SHORT_SECRET = 16

log = logging.getLogger("proxy.settings")


def text_list(value: Any) -> Any:
    """`"anl.gov uchicago.edu"`, one item per line, `a;b`, `a,b` or `["a", "b"]`."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"starts with '[' but is not a JSON list: {exc.msg}") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("a JSON list here must hold strings only")
        return [item.strip() for item in items if item.strip()]
    return [item for item in _SEPARATORS.split(text) if item]


def json_mapping(value: Any) -> Any:
    """A JSON object in an environment variable (AUTHORIZED_GROUPS_PER_IDP, MAINTENANCE_ERROR_NOTICES);
    an empty value is an empty mapping."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc.msg}") from exc
    return value


def empty_is_none(value: Any) -> Any:
    """`${NAME:-}` leaves an empty string where an optional setting is meant to be absent."""
    return None if value == "" else value


def check_callback_url(url: str) -> str:
    """`scheme://host[:port]`, checked whole at start-up rather than by every stream.

    The example configuration builds it as `${STREAMING_SERVER_PROTOCOL}://${STREAMING_SERVER_HOST}:
    ${STREAMING_SERVER_PORT}`, and a site's STREAMING_SERVER_HOST may hold `host:port` itself
    (the existing gateway's env.example does): that port is the one meant, so it wins."""
    parts = urlsplit(url.rstrip("/"))
    netloc = parts.netloc
    if not netloc.startswith("[") and netloc.count(":") == 2:
        netloc = netloc.rsplit(":", 1)[0]
    normalized = f"{parts.scheme}://{netloc}"
    try:
        port = urlsplit(normalized).port
    except ValueError:
        raise ValueError(f"'{netloc}' is not host[:port] with a port number") from None
    if not urlsplit(normalized).hostname or (port is not None and port == 0):
        raise ValueError(f"'{netloc}' is not host[:port]")
    return normalized


def warn_if_short(secret: str | None) -> str | None:
    """The deployed compute functions hold the site's secret: refusing it would stop every stream
    until they are redeployed, so a short one is only reported."""
    if secret is not None and len(secret) < SHORT_SECRET:
        log.warning(
            "streaming.internal_secret (INTERNAL_STREAMING_SECRET) has %d characters; use %d or more "
            "and redeploy the compute functions with it",
            len(secret),
            SHORT_SECRET,
        )
    return secret


TextList = Annotated[list[str], BeforeValidator(text_list)]
JsonMapping = Annotated[dict[str, str], BeforeValidator(json_mapping)]
GroupsPerDomain = Annotated[dict[str, TextList], BeforeValidator(json_mapping)]
