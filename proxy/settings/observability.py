"""The `metrics` and `request_log` sections: what the gateway tells its operators about itself and
every request (docs/observability.md)."""

from __future__ import annotations

from pydantic import Field

from proxy.env_values import TextList
from proxy.settings.files import Strict

__all__ = ["MetricsSettings", "RequestLogSettings"]


class MetricsSettings(Strict):
    """Prometheus metrics (docs/observability.md)."""

    enabled: bool = Field(default=True, description="false: nothing measured, no metrics route")
    path: str = Field(default="/metrics", pattern=r"^/[A-Za-z0-9_./-]*$", description="the metrics route")
    port: int | None = Field(default=None, ge=1, le=65535, description="serve metrics on this port only")
    host: str | None = Field(
        default=None, description="address `port` binds (default: server.host); 0.0.0.0: any host may scrape"
    )
    allow: TextList = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"], description="networks that may scrape"
    )


class RequestLogSettings(Strict):
    """One record per request (docs/observability.md)."""

    stdout: bool = Field(default=True, description="one JSON line per request on stdout")
    store: bool = Field(default=True, description="the same records in the database")
    store_prompts: bool = Field(default=False, description="also keep prompts and (non-streamed) results")
    trusted_proxies: TextList = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="peers whose X-Forwarded-For is believed (nginx on the same host)",
    )
    buffer_records: int = Field(
        default=10_000, ge=1, description="records held while the database is down; more are dropped"
    )
    unauthenticated_per_minute: int = Field(
        default=60,
        ge=0,
        description="records of requests without a user stored per minute and process (bursts of as many);"
        " the rest are counted in gateway_log_records_sampled_out_total",
    )
    retention_days: float | None = Field(
        default=None, gt=0, description="records older than this are deleted, hourly (default: kept)"
    )
