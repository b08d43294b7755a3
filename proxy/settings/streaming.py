"""The `streaming` section: the callback relay for backends that stream by calling back."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

from proxy.env_values import check_callback_url, empty_is_none, warn_if_short
from proxy.settings.files import Strict

__all__ = ["StreamingSettings"]


class StreamingSettings(Strict):
    """The callback relay for backends that stream by calling back (Globus Compute functions)."""

    callback_url: Annotated[str, AfterValidator(check_callback_url)] = Field(
        default="http://127.0.0.1:8000",
        pattern=r"^https?://[^/\s]+/?$",
        description="scheme://host[:port] where remote functions reach this gateway",
    )
    internal_secret: Annotated[str | None, BeforeValidator(empty_is_none), AfterValidator(warn_if_short)] = (
        Field(
            default=None,
            description="shared with the remote functions (INTERNAL_STREAMING_SECRET); under 16 characters"
            " is a logged warning",
        )
    )
    first_chunk_timeout_seconds: float = Field(
        default=900, gt=0, description="longest wait for a stream's first chunk (the job may queue)"
    )
    silence_timeout_seconds: float = Field(default=300, gt=0, description="longest wait between two chunks")
    total_timeout_seconds: float = Field(default=3600, gt=0, description="longest stream")
    keepalive_seconds: float = Field(
        default=15, gt=0, description="an SSE comment to the client after this much silence"
    )
    max_queued_chunks: int = Field(
        default=1000, ge=1, description="chunks waiting for a slow client, per stream"
    )
    max_streams: int = Field(default=10_000, ge=1, description="streams relayed at once")
    gone_memory_seconds: float = Field(
        default=600,
        gt=0,
        description="how long a finished stream's id is remembered, to refuse late callbacks",
    )
