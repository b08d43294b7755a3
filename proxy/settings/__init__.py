"""The gateway's main configuration file (`GatewaySettings`), validated once at start-up by
`load_settings`.

Each section's model is in a module beside this one (`server`, `auth`, `streaming`, ...), which is
what the code using that section imports; reading files and reporting their problems is `files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from proxy.env_values import JsonMapping
from proxy.settings.auth import AuthSettings
from proxy.settings.batches import BatchSettings, TaskSettings
from proxy.settings.dashboard import DashboardSettings
from proxy.settings.database import DatabaseSettings
from proxy.settings.files import ConfigError, OptionalUrl, Strict, describe_validation_error, load_document
from proxy.settings.observability import MetricsSettings, RequestLogSettings
from proxy.settings.on_demand import OnDemandSettings
from proxy.settings.openai_batches import OpenAIBatchSettings
from proxy.settings.server import ServerSettings, TimeoutSettings
from proxy.settings.staging import DataStagingSettings
from proxy.settings.streaming import StreamingSettings
from proxy.settings.traffic import FederationSettings, LimitSettings, RetrySettings

__all__ = ["GatewaySettings", "load_settings"]


class GatewaySettings(Strict):
    """The main file (`--config`, default conf/gateway.yaml)."""

    server: ServerSettings = ServerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    auth: AuthSettings
    streaming: StreamingSettings = StreamingSettings()
    batches: BatchSettings = BatchSettings()
    tasks: TaskSettings = TaskSettings()
    openai_batches: OpenAIBatchSettings = OpenAIBatchSettings()
    data_staging: DataStagingSettings = DataStagingSettings()
    federation: FederationSettings = FederationSettings()
    retries: RetrySettings = RetrySettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    database: DatabaseSettings = DatabaseSettings()
    dashboard: DashboardSettings = DashboardSettings()
    on_demand: OnDemandSettings = OnDemandSettings()
    maintenance: JsonMapping = Field(default_factory=dict, description="cluster → message for users")
    maintenance_file: Path = Field(
        default=Path("maintenance.yaml"), description="what `inference-gateway maintenance` writes"
    )
    database_url: str = Field(
        default="sqlite:///gateway.db",
        pattern=r"^(sqlite:///\S+|postgres(ql)?://\S+)$",
        description="SQLite (a path relative to this file) or PostgreSQL",
    )
    endpoints_file: Path = Field(description="endpoints (YAML, or the existing gateway's JSON fixtures)")
    clusters_file: Path = Field(description="clusters (YAML, or the existing gateway's JSON fixtures)")
    redis_url: OptionalUrl = Field(
        default=None,
        pattern=r"^rediss?://\S+$",
        description="shares limits, the token cache and the stream relay between processes and hosts",
    )

    def resolve_paths(self, base: Path) -> GatewaySettings:
        """Relative paths in the file are relative to the file, not to the working directory."""
        update: dict[str, Any] = {
            "endpoints_file": base / self.endpoints_file,
            "clusters_file": base / self.clusters_file,
            "database_url": _sqlite_relative_to(self.database_url, base),
            "maintenance_file": base / self.maintenance_file,
            "on_demand": self.on_demand.resolve_paths(base),
            "openai_batches": self.openai_batches.model_copy(
                update={"storage_dir": base / self.openai_batches.storage_dir}
            ),
        }
        if self.server.pid_file is not None:
            update["server"] = self.server.model_copy(update={"pid_file": base / self.server.pid_file})
        if self.auth.static is not None:
            static = self.auth.static.model_copy(update={"tokens_file": base / self.auth.static.tokens_file})
            update["auth"] = self.auth.model_copy(update={"static": static})
        return self.model_copy(update=update)


def _sqlite_relative_to(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == prefix + ":memory:":
        return url
    path = Path(url.removeprefix(prefix))
    return prefix + str(path if path.is_absolute() else (base / path).resolve())


def load_settings(path: Path) -> GatewaySettings:
    document = load_document(path)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: must be a mapping of settings")
    try:
        settings = GatewaySettings.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc
    provider = settings.auth.provider
    if getattr(settings.auth, provider) is None:
        raise ConfigError(f"{path}: field 'auth.{provider}': required when auth.provider is '{provider}'")
    settings = settings.resolve_paths(path.parent)
    settings.on_demand.check(str(path), settings.server.host, settings.server.port)
    return settings
