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
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from proxy.env_values import (
    GroupsPerDomain,
    JsonMapping,
    TextList,
    check_callback_url,
    empty_is_none,
    warn_if_short,
)

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
    """Replace `${NAME}` and `${NAME:-default}` in every string of a loaded document. Every unset
    variable is reported at once, one line each, so a new deployment is fixed in one pass."""
    missing: list[str] = []
    expanded = _expand(value, where, missing)
    if missing:
        names = dict.fromkeys(line.rsplit(" variable ", 1)[1].split()[0] for line in missing)
        summary = f"{where}: set the environment variables {', '.join(names)}"
        raise ConfigError("\n".join([*missing, summary]))
    return expanded


def _expand(value: Any, where: str, missing: list[str]) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(lambda match: _env_value(match, where, missing), value)
    if isinstance(value, list):
        return [_expand(item, where, missing) for item in value]
    if isinstance(value, dict):
        return {key: _expand(item, f"{where}, field '{key}'", missing) for key, item in value.items()}
    return value


def _env_value(match: re.Match[str], where: str, missing: list[str]) -> str:
    name, default = match.group(1), match.group(2)
    if name in os.environ:
        return os.environ[name]
    if default is not None:
        return default
    missing.append(f"{where}: environment variable {name} is not set")
    return ""


def unset_variables(path: Path) -> list[str]:
    """The `${NAME}` references without a default whose variable is unset, in order, for reporting
    those of a file that was not read because an earlier one failed. Comments are not references."""
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return []
    missing: list[str] = []
    _expand(document, str(path), missing)
    return list(dict.fromkeys(line.rsplit(" variable ", 1)[1].split()[0] for line in missing))


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
    """The listening socket and the processes serving it."""

    host: str = Field(default="127.0.0.1", description="address to listen on; 127.0.0.1 behind nginx")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    base_path: str = Field(
        default="/resource_server",
        pattern=r"^(/[A-Za-z0-9_.-]+)*$",
        description="prefix of every route, as in the existing gateway's URLs",
    )
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="largest request body; larger ones get 413"
    )
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
    adaptor_threads: int = Field(
        default=16, ge=1, le=512, description="threads for adaptors' blocking calls (the Globus Compute SDK)"
    )
    workers: int = Field(default=1, ge=1, le=64, description="processes sharing the port")
    pid_file: Path | None = Field(default=None, description="for `inference-gateway reload`")


class TimeoutSettings(_Strict):
    """How long connections and caches live."""

    keepalive_seconds: float = Field(
        default=75.0, gt=0, description="how long an idle client connection stays open"
    )
    shutdown_seconds: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight requests and streams may still run"
    )
    jobs_cache_seconds: float = Field(
        default=60.0, ge=0, description="how long a cluster's job report (`/jobs`, `/status`) is reused"
    )


OptionalUrl = Annotated[str | None, BeforeValidator(empty_is_none)]


class StaticAuthSettings(_Strict):
    """Fixed tokens from a file: for development and tests, never production."""

    tokens_file: Path = Field(description="YAML list of tokens and their users, relative to this file")


class GlobusAuthSettings(_Strict):
    """Globus Auth introspects every token (docs/globus.md)."""

    client_id: str = Field(
        min_length=1, description="the gateway's confidential client (GLOBUS_APPLICATION_ID)"
    )
    client_secret: str = Field(min_length=1, description="its secret (GLOBUS_APPLICATION_SECRET)")
    scope: str = Field(min_length=1, description="the gateway's scope, required in every token")
    authorized_idp_domains: TextList = Field(
        min_length=1, description="identity domains users may log in with, e.g. anl.gov,uchicago.edu"
    )
    policies: TextList = Field(
        default_factory=list, description="Globus Auth policy ids every session must satisfy (high assurance)"
    )
    groups: TextList = Field(
        default_factory=list, description="Globus group ids; if set, a user must be in one of them"
    )
    groups_per_idp: GroupsPerDomain = Field(
        default_factory=dict, description="domain → group ids a user of that domain must be in one of"
    )
    service_usernames: TextList = Field(
        default_factory=list, description="client-credential service accounts accepted as they are"
    )
    auth_url: OptionalUrl = Field(
        default=None, pattern=r"^https?://\S+$", description="Globus Auth's base URL (default: the real one)"
    )
    groups_url: OptionalUrl = Field(
        default=None, pattern=r"^https?://\S+$", description="Globus Groups' base URL (default: the real one)"
    )
    cache_seconds: float = Field(default=600, ge=0, description="how long a token's user is remembered")
    refusal_cache_seconds: float = Field(
        default=60, ge=0, description="how long a refused token is remembered"
    )
    cache_size: int = Field(default=100_000, ge=1, description="tokens remembered per process")
    threads: int = Field(default=8, ge=1, le=256, description="concurrent calls to Globus")
    timeout_seconds: float = Field(default=5, gt=0, description="per HTTP call to Globus")
    retries: int = Field(default=1, ge=0, le=5, description="per HTTP call to Globus")
    queue_size: int = Field(default=64, ge=0, description="Globus calls waiting for a thread; beyond, 503")
    queue_wait_seconds: float = Field(default=5, gt=0, description="longest wait for a thread, then 503")
    unseen_tokens_per_minute: float = Field(
        default=30, ge=0, description="per client address without a recent login; 0: no limit"
    )
    unseen_tokens_burst: int = Field(default=20, ge=1, description="unseen tokens at once per client address")
    refused_tokens_per_minute: float = Field(default=6, ge=0, description="per client address; 0: no limit")
    refused_tokens_burst: int = Field(
        default=10, ge=1, description="refused tokens at once per client address"
    )
    verify_policies_at_startup: bool = Field(
        default=True, description="read `policies` from Globus at start-up and stop if they do not match"
    )


class StreamingSettings(_Strict):
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


class MetricsSettings(_Strict):
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


class LimitSettings(_Strict):
    """Per user; 0 turns a limit off. Tokens per minute come from each endpoint's tpm_model/tpm_user."""

    requests_per_second: float = Field(default=10, ge=0, description="sustained requests per second per user")
    burst: int = Field(
        default=20, ge=0, description="requests a user may send at once before the rate applies"
    )
    concurrent_per_user: int = Field(default=32, ge=0, description="requests and streams in flight per user")


class RequestLogSettings(_Strict):
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


class FederationSettings(_Strict):
    """Requests without a cluster in the path (`/v1/chat/completions`): proxy/core/federation.py picks one."""

    max_attempts: int = Field(default=3, ge=1, le=10, description="endpoints tried before answering 503")
    jobs_wait_seconds: float = Field(
        default=1.0, gt=0, description="longest wait for clusters' job reports; slower ones rank last"
    )


class RetrySettings(_Strict):
    """Retries of non-streamed requests join the work still running for them (proxy/core/retry_join.py)."""

    join_seconds: float = Field(
        default=30, ge=0, description="how long work whose client left waits for its retry; 0: no joining"
    )
    keep_seconds: float = Field(default=60, ge=0, description="how long a result nobody received is kept")
    max_entries: int = Field(default=10_000, ge=1, description="requests and results remembered per process")
    max_kept_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="bytes of finished results kept for retries, per process"
    )


class BatchSettings(_Strict):
    """The batch API (`/v1/batches`)."""

    max_active_per_user: int = Field(default=2, ge=1, description="unfinished batches per user")
    poll_seconds: float = Field(default=30, gt=0, description="how often unfinished batches are advanced")


class TaskSettings(_Strict):
    """Asynchronous tasks (`/{cluster}/{framework}/process`): whose each task is, kept in memory."""

    max_remembered: int = Field(default=100_000, ge=1, description="the oldest are forgotten beyond this")
    lifetime_seconds: float = Field(default=24 * 3600, gt=0, description="how long a result may be read")


class DataStagingSettings(_Strict):
    """`PUT /data/staging`: a folder per user on a Globus guest collection the gateway manages. Off
    while `collection_id` is unset. Credentials default to SERVICE_ACCOUNT_ID / SERVICE_ACCOUNT_SECRET,
    as in the existing gateway; the account must be an access manager of the collection."""

    collection_id: Annotated[str | None, BeforeValidator(empty_is_none)] = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$",
        description="the guest collection users' folders are made on (unset: staging is off)",
    )
    root: str = Field(
        default="/user-staging/",
        pattern=r"^/([A-Za-z0-9_.~-]+/)*$",
        description="the folder on the collection under which each user's folder is made",
    )
    client_id: Annotated[str | None, BeforeValidator(empty_is_none)] = Field(
        default=None, description="the account managing the collection (default: SERVICE_ACCOUNT_ID)"
    )
    client_secret: Annotated[str | None, BeforeValidator(empty_is_none)] = Field(
        default=None, description="its secret (default: SERVICE_ACCOUNT_SECRET)"
    )
    transfer_url: OptionalUrl = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="Globus Transfer's base URL (default: the real one)",
    )
    auth_url: OptionalUrl = Field(
        default=None, pattern=r"^https?://\S+$", description="Globus Auth's base URL (default: the real one)"
    )
    timeout_seconds: float = Field(default=30, gt=0, description="the whole preparation, every call included")

    @model_validator(mode="after")
    def _credentials_known(self) -> DataStagingSettings:
        if self.collection_id is not None:
            self.credentials()
        return self

    def credentials(self) -> tuple[str, str]:
        client_id = self.client_id or os.environ.get("SERVICE_ACCOUNT_ID")
        secret = self.client_secret or os.environ.get("SERVICE_ACCOUNT_SECRET")
        if not client_id or not secret:
            raise ValueError(
                "client_id and client_secret: not configured, and SERVICE_ACCOUNT_ID / "
                "SERVICE_ACCOUNT_SECRET are not set"
            )
        return client_id, secret


class DatabaseSettings(_Strict):
    """How long the gateway waits on its database, and how it behaves while the database is away."""

    statement_timeout_seconds: float = Field(
        default=5, gt=0, description="any statement running longer is cancelled (PostgreSQL: lock waits too)"
    )
    connect_timeout_seconds: float = Field(
        default=5, gt=0, description="to open a connection (SQLite: how long a locked database is waited for)"
    )
    reconnect_seconds: float = Field(
        default=5, gt=0, description="while unreachable at start-up, how often the gateway tries again"
    )


class AuthSettings(_Strict):
    """Who may call the gateway."""

    provider: Literal["static", "globus"] = Field(default="static", description="which section below is used")
    static: StaticAuthSettings | None = Field(default=None, description="Used when auth.provider is static.")
    globus: GlobusAuthSettings | None = Field(default=None, description="Used when auth.provider is globus.")


class GatewaySettings(_Strict):
    """The main file (`--config`, default conf/gateway.yaml)."""

    server: ServerSettings = ServerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    auth: AuthSettings
    streaming: StreamingSettings = StreamingSettings()
    batches: BatchSettings = BatchSettings()
    tasks: TaskSettings = TaskSettings()
    data_staging: DataStagingSettings = DataStagingSettings()
    federation: FederationSettings = FederationSettings()
    retries: RetrySettings = RetrySettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    database: DatabaseSettings = DatabaseSettings()
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
