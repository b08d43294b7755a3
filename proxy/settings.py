"""The gateway's main configuration file, validated once at start-up.

Every problem is reported as a `ConfigError` naming the file, the entry and the field, so an
administrator can fix a broken deployment without reading a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A configuration problem that must stop start-up."""


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        problems.append(f"field '{field or '(root)'}': {item['msg']}")
    return "; ".join(problems)


def expand_env(value: Any, where: str) -> Any:
    """Replace `${NAME}` and `${NAME:-default}` in every string of a loaded document."""
    if isinstance(value, str):
        return _ENV_REF.sub(lambda match: _env_value(match, where), value)
    if isinstance(value, list):
        return [expand_env(item, where) for item in value]
    if isinstance(value, dict):
        return {key: expand_env(item, f"{where}, field '{key}'") for key, item in value.items()}
    return value


def _env_value(match: re.Match[str], where: str) -> str:
    name, default = match.group(1), match.group(2)
    if name in os.environ:
        return os.environ[name]
    if default is not None:
        return default
    raise ConfigError(f"{where}: environment variable {name} is not set")


def load_document(path: Path) -> Any:
    """Read a YAML or JSON file, with `${ENV}` references expanded."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: is not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    return expand_env(document, str(path))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    base_path: str = Field(default="/resource_server", pattern=r"^(/[A-Za-z0-9_.-]+)*$")
    max_body_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    body_timeout_seconds: float = Field(default=120, gt=0, description="a request body arrives whole within")
    body_grace_seconds: float = Field(default=10, ge=0, description="before body_min_bytes_per_second counts")
    body_min_bytes_per_second: float = Field(
        default=8192, gt=0, description="average body rate after the grace"
    )
    large_body_bytes: int = Field(
        default=1024 * 1024, ge=0, description="bodies over this are parsed in turns"
    )
    large_bodies_at_once: int = Field(default=1, ge=1, description="large bodies parsed at once")
    max_answer_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="a backend's whole (non-streamed) answer, decompressed"
    )
    max_error_bytes: int = Field(
        default=64 * 1024, gt=0, description="a backend's error answer, decompressed"
    )
    backlog: int = Field(default=4096, ge=1, description="pending connections; bursts of clients queue here")
    adaptor_threads: int = Field(default=16, ge=1, le=512)
    workers: int = Field(default=1, ge=1, le=64, description="processes sharing the port")
    pid_file: Path | None = Field(default=None, description="for `inference-gateway reload`")


class TimeoutSettings(_Strict):
    keepalive_seconds: float = Field(default=75.0, gt=0)
    shutdown_seconds: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight requests and streams may still run"
    )
    jobs_cache_seconds: float = Field(default=60.0, ge=0)


def _comma_list(value: Any) -> Any:
    """The existing gateway's environment variables hold comma-separated lists."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _json_mapping(value: Any) -> Any:
    """AUTHORIZED_GROUPS_PER_IDP is a JSON object in an environment variable."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc.msg}") from exc
    return value


def _empty_is_none(value: Any) -> Any:
    """`${NAME:-}` leaves an empty string where an optional setting is meant to be absent."""
    return None if value == "" else value


CommaList = Annotated[list[str], BeforeValidator(_comma_list)]
OptionalUrl = Annotated[str | None, BeforeValidator(_empty_is_none)]
GroupsPerDomain = Annotated[dict[str, CommaList], BeforeValidator(_json_mapping)]


class StaticAuthSettings(_Strict):
    tokens_file: Path


class GlobusAuthSettings(_Strict):
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    scope: str = Field(min_length=1, description="the gateway's scope, required in every token")
    authorized_idp_domains: CommaList = Field(min_length=1)
    policies: CommaList = Field(default_factory=list)
    groups: CommaList = Field(default_factory=list)
    groups_per_idp: GroupsPerDomain = Field(default_factory=dict)
    service_usernames: CommaList = Field(default_factory=list)
    auth_url: OptionalUrl = Field(default=None, pattern=r"^https?://\S+$")
    groups_url: OptionalUrl = Field(default=None, pattern=r"^https?://\S+$")
    cache_seconds: float = Field(default=600, ge=0)
    refusal_cache_seconds: float = Field(default=60, ge=0)
    cache_size: int = Field(default=100_000, ge=1)
    threads: int = Field(default=8, ge=1, le=256)
    timeout_seconds: float = Field(default=5, gt=0)
    retries: int = Field(default=1, ge=0, le=5)
    queue_size: int = Field(default=64, ge=0, description="Globus calls waiting for a thread; beyond, 503")
    queue_wait_seconds: float = Field(default=5, gt=0, description="longest wait for a thread, then 503")
    unseen_tokens_per_minute: float = Field(
        default=30, ge=0, description="per client address without a recent login; 0: no limit"
    )
    unseen_tokens_burst: int = Field(default=20, ge=1)
    refused_tokens_per_minute: float = Field(default=6, ge=0, description="per client address; 0: no limit")
    refused_tokens_burst: int = Field(default=10, ge=1)
    verify_policies_at_startup: bool = True


class StreamingSettings(_Strict):
    """The callback relay for backends that stream by calling back (Globus Compute functions)."""

    callback_url: str = Field(
        default="http://127.0.0.1:8000",
        pattern=r"^https?://[^/\s]+/?$",
        description="scheme://host[:port] where remote functions reach this gateway",
    )
    internal_secret: Annotated[str | None, BeforeValidator(_empty_is_none)] = Field(
        default=None, min_length=16
    )
    first_chunk_timeout_seconds: float = Field(default=900, gt=0)
    silence_timeout_seconds: float = Field(default=300, gt=0)
    total_timeout_seconds: float = Field(default=3600, gt=0)
    keepalive_seconds: float = Field(default=15, gt=0)
    max_queued_chunks: int = Field(default=1000, ge=1)
    max_streams: int = Field(default=10_000, ge=1)
    gone_memory_seconds: float = Field(default=600, gt=0)


class MetricsSettings(_Strict):
    enabled: bool = Field(default=True, description="false: nothing measured, no metrics route")
    path: str = Field(default="/metrics", pattern=r"^/[A-Za-z0-9_./-]*$")
    port: int | None = Field(default=None, ge=1, le=65535, description="serve metrics on this port only")
    allow: CommaList = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"], description="networks that may scrape"
    )


class LimitSettings(_Strict):
    """Per user; 0 turns a limit off. Tokens per minute come from each endpoint's tpm_model/tpm_user."""

    requests_per_second: float = Field(default=10, ge=0)
    burst: int = Field(default=20, ge=0)
    concurrent_per_user: int = Field(default=32, ge=0)


class RequestLogSettings(_Strict):
    stdout: bool = Field(default=True, description="one JSON line per request on stdout")
    store: bool = Field(default=True, description="the same records in the database")
    store_prompts: bool = Field(default=False, description="also keep prompts and (non-streamed) results")
    trusted_proxies: CommaList = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="peers whose X-Forwarded-For is believed (nginx on the same host)",
    )
    buffer_records: int = Field(default=10_000, ge=1)


class FederationSettings(_Strict):
    """Requests without a cluster in the path (`/v1/chat/completions`): proxy/federation.py picks one."""

    max_attempts: int = Field(default=3, ge=1, le=10, description="endpoints tried before answering 503")
    jobs_wait_seconds: float = Field(
        default=1.0, gt=0, description="longest wait for clusters' job reports; slower ones rank last"
    )


class BatchSettings(_Strict):
    max_active_per_user: int = Field(default=2, ge=1)
    poll_seconds: float = Field(default=30, gt=0, description="how often unfinished batches are advanced")


class AuthSettings(_Strict):
    provider: Literal["static", "globus"] = "static"
    static: StaticAuthSettings | None = None
    globus: GlobusAuthSettings | None = None


class GatewaySettings(_Strict):
    server: ServerSettings = ServerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    auth: AuthSettings
    streaming: StreamingSettings = StreamingSettings()
    batches: BatchSettings = BatchSettings()
    federation: FederationSettings = FederationSettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    maintenance: dict[str, str] = Field(default_factory=dict, description="cluster → message for users")
    maintenance_file: Path = Path("maintenance.yaml")
    database_url: str = Field(
        default="sqlite:///gateway.db",
        pattern=r"^(sqlite:///\S+|postgres(ql)?://\S+)$",
        description="SQLite (a path relative to this file) or PostgreSQL",
    )
    endpoints_file: Path
    clusters_file: Path
    redis_url: OptionalUrl = Field(default=None, pattern=r"^rediss?://\S+$")

    def resolve_paths(self, base: Path) -> GatewaySettings:
        """Relative paths in the file are relative to the file, not to the working directory."""
        update: dict[str, Any] = {
            "endpoints_file": base / self.endpoints_file,
            "clusters_file": base / self.clusters_file,
            "database_url": _sqlite_relative_to(self.database_url, base),
            "maintenance_file": base / self.maintenance_file,
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
    return settings.resolve_paths(path.parent)
