"""Endpoints and clusters, read from YAML or from the existing gateway's fixture JSON.

Entries are either Django fixture records (`{"model", "pk", "fields"}`) or the `fields` mapping
alone. Everything is checked before the gateway serves: a typo in an access list must stop
start-up, not silently open an endpoint to everyone.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from adaptors import BaseCluster, BaseEndpoint
from proxy.core.slug import endpoint_slug
from proxy.settings.files import ConfigError, describe_validation_error, load_document
from proxy.settings.plugins import import_class

AccessList = str | list[str] | None

EXISTING_GATEWAY_ADAPTORS = {
    "resource_server_async.endpoints.direct_api.DirectAPIEndpoint": "adaptors.direct_api.DirectAPIEndpoint",
    "resource_server_async.clusters.direct_api.DirectAPICluster": "adaptors.direct_api.DirectAPICluster",
    "resource_server_async.endpoints.globus_compute.GlobusComputeEndpoint": (
        "adaptors.globus_compute.GlobusComputeEndpoint"
    ),
    "resource_server_async.clusters.globus_compute.GlobusComputeCluster": (
        "adaptors.globus_compute.GlobusComputeCluster"
    ),
    "resource_server_async.clusters.metis.MetisCluster": "adaptors.status_url.MetisCluster",
    "resource_server_async.endpoints.metis.MetisEndpoint": "adaptors.metis.MetisEndpoint",
}
"""The existing gateway's own adaptors, so that its fixture files load without edits."""
Adaptor = TypeVar("Adaptor", BaseEndpoint, BaseCluster)

SERVED_PATHS = ("chat/completions", "completions", "embeddings", "responses", "messages")
"""The OpenAI paths (and Anthropic's `messages`) a cluster may offer under `/{cluster}/{framework}/v1/`."""
MONITOR_PATHS = ("health", "metrics")
"""Also listed in the existing gateway's fixtures, for its health monitor, which calls the compute
functions itself: accepted, and served by no route."""

DJANGO_TPM_DEFAULTS = (100_000, 60_000)
"""The existing gateway's model defaults for `tpm_model` and `tpm_user`, which its fixture records
get when they leave the fields out."""


def _config_text(value: Any) -> Any:
    """`manage.py dumpdata` writes `config` (a text column there) as a string: JSON, or the Python
    literal the existing gateway reads with `ast.literal_eval`. Parsed as a literal, never run."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return {}
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError("is a string that is neither JSON nor a Python literal") from None


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_globus_groups: AccessList = None
    allowed_domains: AccessList = None
    config: Annotated[dict[str, Any], BeforeValidator(_config_text)] = Field(default_factory=dict)


class EndpointEntry(_Entry):
    endpoint_slug: str | None = None
    cluster: str = Field(min_length=1)
    framework: str = Field(min_length=1)
    model: str = Field(min_length=1)
    endpoint_adapter: str = Field(min_length=1)
    tpm_model: int | None = Field(default=None, ge=0)
    tpm_user: int | None = Field(default=None, ge=0)


class ClusterEntry(_Entry):
    cluster_name: str = Field(min_length=1, pattern=r"^[^/\s]+$")
    cluster_adapter: str = Field(min_length=1)
    frameworks: list[str] = Field(min_length=1)
    openai_endpoints: list[str]

    @field_validator("openai_endpoints")
    @classmethod
    def _known_paths(cls, paths: list[str]) -> list[str]:
        """A typo would pass start-up and then refuse every request of that path."""
        normalized = [path.strip("/").removeprefix("v1/") for path in paths]
        unknown = [path for path in normalized if path not in SERVED_PATHS + MONITOR_PATHS]
        if unknown:
            raise ValueError(
                f"unknown {', '.join(repr(path) for path in unknown)}; the gateway serves "
                f"{', '.join(SERVED_PATHS)} (and accepts {' and '.join(MONITOR_PATHS)})"
            )
        return normalized


@dataclass(frozen=True)
class TokenLimits:
    model: int | None
    user: int | None


class GenerationHolds:
    """Requests still using one generation of adaptors: a reload shuts the old generation down
    only once the last of them has ended, so nothing in flight loses its backend connection."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def take(self) -> None:
        self.count += 1
        self._idle.clear()

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


@dataclass
class Registry:
    clusters: dict[str, BaseCluster]
    endpoints: dict[str, BaseEndpoint]
    token_limits: dict[str, TokenLimits] = field(default_factory=dict)
    """endpoint slug → the entry's `tpm_model` / `tpm_user` (tokens per minute; None or 0: no limit)"""
    holds: GenerationHolds = field(default_factory=GenerationHolds)

    def adaptors(self) -> Iterator[BaseEndpoint | BaseCluster]:
        yield from self.clusters.values()
        yield from self.endpoints.values()

    def replace(self, new: Registry) -> Registry:
        """Serve `new` from now on, in place (every holder of this object sees it at once); returns
        the previous generation, for retiring."""
        old = Registry(self.clusters, self.endpoints, self.token_limits, self.holds)
        self.clusters, self.endpoints = new.clusters, new.endpoints
        self.token_limits, self.holds = new.token_limits, new.holds
        return old


@dataclass(frozen=True)
class _Record:
    where: str
    id: str
    fields: dict[str, Any]
    django: bool
    """A Django fixture record (`{"model", "pk", "fields"}`): the existing gateway's model
    defaults apply to the fields it leaves out."""


class _Problems:
    """Collects every problem of every file so one start-up attempt reports them all."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines))


def load_registry(endpoints_file: Path, clusters_file: Path) -> Registry:
    problems = _Problems()
    clusters = _load_clusters(_records(clusters_file, "cluster_name"), problems)
    endpoints, token_limits = _load_endpoints(_records(endpoints_file, "model"), clusters, problems)
    problems.raise_if_any()
    return Registry(clusters=clusters, endpoints=endpoints, token_limits=token_limits)


def _records(path: Path, name_field: str) -> list[_Record]:
    document = load_document(path)
    if not isinstance(document, list):
        raise ConfigError(f"{path}: must be a list of entries")
    records = []
    for index, item in enumerate(document, start=1):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}, entry {index}: must be a mapping")
        django = "fields" in item and "model" in item
        fields = item["fields"] if django else item
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}, entry {index}: field 'fields': must be a mapping")
        fields = dict(fields)
        record_id = item.get("pk", fields.pop("id", index))
        label = f"{path}, entry {index}"
        if isinstance(fields.get(name_field), str):
            label += f" ({fields[name_field]})"
        records.append(_Record(where=label, id=str(record_id), fields=fields, django=django))
    return records


def _load_clusters(records: list[_Record], problems: _Problems) -> dict[str, BaseCluster]:
    clusters: dict[str, BaseCluster] = {}
    for record in records:
        entry = _validate(ClusterEntry, record, problems)
        if entry is None:
            continue
        if entry.cluster_name in clusters:
            problems.add(record.where, f"field 'cluster_name': '{entry.cluster_name}' is defined twice")
            continue
        cluster = _instantiate(
            entry.cluster_adapter, "cluster_adapter", BaseCluster, record, problems,
            id=record.id, cluster_name=entry.cluster_name, cluster_adapter=entry.cluster_adapter,
            frameworks=entry.frameworks, openai_endpoints=entry.openai_endpoints,
            allowed_globus_groups=entry.allowed_globus_groups,
            allowed_domains=entry.allowed_domains, config=entry.config,
        )  # fmt: skip
        if cluster is not None:
            clusters[entry.cluster_name] = cluster
    return clusters


def _load_endpoints(
    records: list[_Record], clusters: dict[str, BaseCluster], problems: _Problems
) -> tuple[dict[str, BaseEndpoint], dict[str, TokenLimits]]:
    endpoints: dict[str, BaseEndpoint] = {}
    token_limits: dict[str, TokenLimits] = {}
    defined_at: dict[str, str] = {}
    for record in records:
        entry = _validate(EndpointEntry, record, problems)
        if entry is None or not _fits_cluster(entry, clusters, record, problems):
            continue
        slug = endpoint_slug(entry.cluster, entry.framework, entry.model)
        if entry.endpoint_slug is not None and entry.endpoint_slug != slug:
            problems.add(
                record.where,
                f"field 'endpoint_slug': is '{entry.endpoint_slug}' but cluster, framework and "
                f"model give '{slug}'",
            )
            continue
        if slug in defined_at:
            problems.add(
                record.where, f"field 'endpoint_slug': '{slug}' is also defined at {defined_at[slug]}"
            )
            continue
        defined_at[slug] = record.where
        limits = _token_limits(entry, record)
        endpoint = _instantiate(
            entry.endpoint_adapter, "endpoint_adapter", BaseEndpoint, record, problems,
            if_named={"tpm_model": limits.model or 0, "tpm_user": limits.user or 0},
            id=record.id, endpoint_slug=slug, cluster=entry.cluster, framework=entry.framework,
            model=entry.model, endpoint_adapter=entry.endpoint_adapter,
            allowed_globus_groups=entry.allowed_globus_groups,
            allowed_domains=entry.allowed_domains, config=entry.config,
        )  # fmt: skip
        if endpoint is not None:
            endpoints[slug] = endpoint
            token_limits[slug] = limits
    return endpoints, token_limits


def _token_limits(entry: EndpointEntry, record: _Record) -> TokenLimits:
    """YAML entries without a limit have none; fixture records get the existing gateway's defaults."""
    if not record.django:
        return TokenLimits(entry.tpm_model, entry.tpm_user)
    model = entry.tpm_model if "tpm_model" in record.fields else DJANGO_TPM_DEFAULTS[0]
    user = entry.tpm_user if "tpm_user" in record.fields else DJANGO_TPM_DEFAULTS[1]
    return TokenLimits(model, user)


def _fits_cluster(
    entry: EndpointEntry, clusters: dict[str, BaseCluster], record: _Record, problems: _Problems
) -> bool:
    cluster = clusters.get(entry.cluster)
    if cluster is None:
        problems.add(record.where, f"field 'cluster': no cluster named '{entry.cluster}' is defined")
        return False
    if entry.framework not in cluster.frameworks:
        problems.add(
            record.where,
            f"field 'framework': '{entry.framework}' is not among cluster '{entry.cluster}''s "
            f"frameworks {cluster.frameworks}",
        )
        return False
    return True


def _validate(model: type[_Entry], record: _Record, problems: _Problems) -> Any:
    try:
        return model.model_validate(record.fields)
    except ValidationError as exc:
        problems.add(record.where, describe_validation_error(exc))
        return None


def _instantiate(
    dotted_path: str,
    field: str,
    base: type[Adaptor],
    record: _Record,
    problems: _Problems,
    if_named: dict[str, Any] | None = None,
    **arguments: Any,
) -> Adaptor | None:
    """`if_named` arguments are passed only to constructors that name them: the existing gateway's
    current adaptors take `tpm_model` and `tpm_user`, those of its documentation do not."""
    try:
        adaptor_class = import_adaptor(dotted_path, base)
    except ConfigError as exc:
        problems.add(record.where, f"field '{field}': {exc}")
        return None
    try:
        named = set(inspect.signature(adaptor_class).parameters)
    except (TypeError, ValueError):
        named = set()
    arguments.update({name: value for name, value in (if_named or {}).items() if name in named})
    try:
        return adaptor_class(**arguments)
    except ValidationError as exc:
        problems.add(record.where, describe_validation_error(exc, prefix="config"))
    except TypeError as exc:
        problems.add(record.where, f"field '{field}': {dotted_path} cannot be built: {exc}")
    except (ValueError, KeyError) as exc:
        problems.add(record.where, f"field 'config': {exc}")
    return None


def import_adaptor(dotted_path: str, base: type[Adaptor]) -> type[Adaptor]:
    """Import a site's adaptor class, the existing gateway's paths standing for ours."""
    try:
        return import_class(EXISTING_GATEWAY_ADAPTORS.get(dotted_path, dotted_path), base)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
