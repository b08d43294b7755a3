"""The `limits`, `federation` and `retries` sections: how much each user may send, which cluster
serves a request without one, and how a retried request finds its earlier work."""

from __future__ import annotations

from pydantic import Field

from proxy.settings.files import Strict

__all__ = ["FederationSettings", "LimitSettings", "RetrySettings"]


class LimitSettings(Strict):
    """Per user; 0 turns a limit off. Tokens per minute come from each endpoint's tpm_model/tpm_user."""

    requests_per_second: float = Field(default=10, ge=0, description="sustained requests per second per user")
    burst: int = Field(
        default=20, ge=0, description="requests a user may send at once before the rate applies"
    )
    concurrent_per_user: int = Field(default=32, ge=0, description="requests and streams in flight per user")


class FederationSettings(Strict):
    """Requests without a cluster in the path (`/v1/chat/completions`): proxy/core/federation.py picks one."""

    max_attempts: int = Field(default=3, ge=1, le=10, description="endpoints tried before answering 503")
    jobs_wait_seconds: float = Field(
        default=1.0, gt=0, description="longest wait for clusters' job reports; slower ones rank last"
    )


class RetrySettings(Strict):
    """Retries of non-streamed requests join the work still running for them (proxy/core/retry_join.py)."""

    join_seconds: float = Field(
        default=30, ge=0, description="how long work whose client left waits for its retry; 0: no joining"
    )
    keep_seconds: float = Field(default=60, ge=0, description="how long a result nobody received is kept")
    max_entries: int = Field(default=10_000, ge=1, description="requests and results remembered per process")
    max_kept_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="bytes of finished results kept for retries, per process"
    )
