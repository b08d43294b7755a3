"""Adaptor bases that carry the entry's constructor and validate its `config` once, at start-up.

Every adaptor used to repeat the eight-argument constructor and parse `config` its own way. On
these bases a site adaptor is its behaviour and its config model:

    class EchoConfig(AdaptorConfig):
        prefix: str = "echo: "

    class EchoEndpoint(ConfiguredEndpoint[EchoConfig]):
        async def submit_task(self, data): ... self.config.prefix ...

The type argument is the model the entry's `config` is validated against when the adaptor is
built (never per request); `self.config` is the validated model. A mistake raises pydantic's
`ValidationError`, which the gateway reports as `field 'config.<name>'` against the file and entry.
A subclass may set `config_model` itself to a subclass of its parent's model (a cluster that reads
a default from the environment). Adaptors that derive from `BaseEndpoint` or `BaseCluster` directly
and parse `config` themselves keep working: these bases only add to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Generic, TypeVar, cast, get_args

from pydantic import BaseModel, ConfigDict

from adaptors.cluster import BaseCluster
from adaptors.endpoint import BaseEndpoint

Config = TypeVar("Config", bound=BaseModel)


class AdaptorConfig(BaseModel):
    """A config model that refuses unknown fields: a misspelt field stops start-up, naming it,
    instead of silently leaving its default in force."""

    model_config = ConfigDict(extra="forbid")


class _Configured(Generic[Config]):
    config_model: ClassVar[type[BaseModel]]
    """What `config` is validated against: the class's type argument unless the class sets it."""
    config: Config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """`class X(ConfiguredEndpoint[XConfig])` declares the model once, for validation and for
        the type of `self.config` alike."""
        super().__init_subclass__(**kwargs)
        if "config_model" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):
            for argument in get_args(base):
                if isinstance(argument, type) and issubclass(argument, BaseModel):
                    cls.config_model = argument

    def _validate_config(self, config: Mapping[str, Any] | None) -> None:
        model = getattr(type(self), "config_model", None)
        if model is None:
            raise TypeError(
                f"{type(self).__name__} declares no config model: derive it from "
                "ConfiguredEndpoint[ItsConfig] or ConfiguredCluster[ItsConfig], or set config_model"
            )
        self.config = cast(Config, model.model_validate(config or {}))


class ConfiguredEndpoint(BaseEndpoint, _Configured[Config]):
    """A `BaseEndpoint` whose `config` is validated against its config model when it is built."""

    def __init__(
        self,
        id: str,
        endpoint_slug: str,
        cluster: str,
        framework: str,
        model: str,
        endpoint_adapter: str,
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id, endpoint_slug, cluster, framework, model, endpoint_adapter,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self._validate_config(config)


class ConfiguredCluster(BaseCluster, _Configured[Config]):
    """A `BaseCluster` whose `config` is validated against its config model when it is built."""

    def __init__(
        self,
        id: str,
        cluster_name: str,
        cluster_adapter: str,
        frameworks: Iterable[str],
        openai_endpoints: Iterable[str],
        allowed_globus_groups: str | Iterable[str] | None = None,
        allowed_domains: str | Iterable[str] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            id, cluster_name, cluster_adapter, frameworks, openai_endpoints,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self._validate_config(config)
