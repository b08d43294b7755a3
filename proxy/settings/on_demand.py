"""The `on_demand` section: the controller that starts pilot jobs for deployments (docs/on-demand.md).

The deployments themselves are endpoints (their `config` says the model, scheduler, resources and
replicas); this section says which schedulers exist, how a job starts the pilot on each, and the
mTLS identities of both ends. Each scheduler's adaptor is imported and built here, while the file
is read, so a dotted path that does not import or a `config` it refuses stops start-up naming the
file and the entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from adaptors.schedulers.contract import Scheduler
from proxy.settings.files import ConfigError, Strict
from proxy.settings.plugins import import_class

__all__ = ["OnDemandSettings", "SchedulerSettings", "import_scheduler"]


def import_scheduler(dotted_path: str) -> type[Scheduler]:
    return import_class(dotted_path, Scheduler)


class SchedulerSettings(Strict):
    """One batch system, and how a job on it starts the pilot."""

    adapter: str = Field(
        description="the scheduler adaptor's class, e.g. adaptors.schedulers.local.LocalScheduler"
    )
    config: dict[str, Any] = Field(default_factory=dict, description="the adaptor's own settings")
    pilot_command: tuple[str, ...] = Field(
        min_length=1,
        description='how the job starts the pilot, e.g. ["/opt/venv/bin/python", "-m", "pilot"]',
    )
    pilot_certificate: str = Field(description="the pilot's certificate, as the cluster's nodes see it")
    pilot_key: str = Field(description="the pilot's private key, as the cluster's nodes see it")
    pilot_ca: str = Field(description="the site CA, as the cluster's nodes see it")
    listen_host: str = Field(default="0.0.0.0", description="where the pilot listens on its node")
    advertise_host: str | None = Field(
        default=None, description="the address the gateway dials (default: the node's own)"
    )
    environment: dict[str, str] = Field(default_factory=dict, description="added to the job's environment")

    @model_validator(mode="after")
    def _builds(self) -> SchedulerSettings:
        try:
            scheduler_class = import_scheduler(self.adapter)
        except ValueError as exc:
            raise ValueError(f"adapter: {exc}") from exc
        scheduler_class("check", self.config)
        return self


class OnDemandSettings(Strict):
    """Pilot jobs started when a deployment is asked for (off unless enabled)."""

    enabled: bool = Field(default=False, description="run the controller; deployments answer 503 without it")
    schedulers: dict[str, SchedulerSettings] = Field(
        default_factory=dict, description="name → scheduler; a deployment's `scheduler` names one"
    )
    ca_file: Path | None = Field(default=None, description="the site CA that signed the pilots' certificates")
    gateway_certificate: Path | None = Field(
        default=None, description="the gateway's mTLS client certificate"
    )
    gateway_key: Path | None = Field(default=None, description="its private key")
    gateway_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="where pilots register and heartbeat (default: this server + base_path + /pilots)",
    )
    gateway_subjects: tuple[str, ...] = Field(
        default=(), description="subjects a pilot serves inference to (default: the gateway certificate's)"
    )
    metrics_subjects: tuple[str, ...] = Field(default=(), description="subjects a pilot serves /metrics to")
    heartbeat_seconds: float = Field(default=10, gt=0, description="how often pilots heartbeat")
    heartbeat_timeout_seconds: float = Field(
        default=60, gt=0, description="a replica silent this long is ended and replaced"
    )
    register_timeout_seconds: float = Field(
        default=600, gt=0, description="a running job whose pilot has not registered by then is ended"
    )
    reconcile_seconds: float = Field(default=2, gt=0, description="how often the controller reconciles")
    refresh_seconds: float = Field(
        default=1, gt=0, description="how often each process reloads its routing map from the database"
    )
    usage_report_seconds: float = Field(
        default=3, gt=0, description="how often each process reports its load and last use"
    )
    lease_seconds: float = Field(
        default=15, gt=0, description="a controller that stops renewing its lease hands over after this"
    )
    start_backoff_seconds: float = Field(default=30, gt=0, description="wait after a failed start")
    start_backoff_max_seconds: float = Field(
        default=900, gt=0, description="the wait doubles with each failure up to this"
    )
    undeclared_grace_seconds: float = Field(
        default=60,
        ge=0,
        description="a deployment no longer declared (restart, reload) loses its replicas after this",
    )
    replace_before_walltime_seconds: float = Field(
        default=600, ge=0, description="a replica this close to its walltime is replaced"
    )

    @field_validator("schedulers")
    @classmethod
    def _names(cls, schedulers: dict[str, SchedulerSettings]) -> dict[str, SchedulerSettings]:
        for name in schedulers:
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"scheduler name {name!r}: letters, digits, '-' and '_' only")
        return schedulers

    @model_validator(mode="after")
    def _lease_outlives_passes(self) -> OnDemandSettings:
        if self.lease_seconds <= 2 * self.reconcile_seconds:
            raise ValueError(
                "lease_seconds: must exceed twice reconcile_seconds, or the lease lapses between passes"
            )
        return self

    def resolve_paths(self, base: Path) -> OnDemandSettings:
        update: dict[str, Any] = {}
        for name in ("ca_file", "gateway_certificate", "gateway_key"):
            value = getattr(self, name)
            if value is not None:
                update[name] = base / value
        return self.model_copy(update=update)

    def check(self, where: str, host: str, port: int) -> None:
        """What a validator cannot see: the files (after paths are resolved) and the server's port."""
        if not self.enabled:
            return
        for name in ("ca_file", "gateway_certificate", "gateway_key"):
            value = getattr(self, name)
            if value is None:
                raise ConfigError(f"{where}: field 'on_demand.{name}': required when on_demand.enabled")
            if not value.is_file():
                raise ConfigError(f"{where}: field 'on_demand.{name}': no such file: {value}")
        if self.gateway_url is None and port == 0:
            raise ConfigError(f"{where}: field 'on_demand.gateway_url': required when server.port is 0")
        if self.gateway_url is None and host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                f"{where}: field 'on_demand.gateway_url': required when server.host is a wildcard ({host!r})"
            )
