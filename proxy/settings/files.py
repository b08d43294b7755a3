"""Reading the gateway's configuration files, once at start-up.

Every problem is reported as a `ConfigError` naming the file, the entry and the field, so an
administrator can fix a broken deployment without reading a traceback. The main file and the
endpoint, cluster and token files are all read by `load_document`, so `${ENV}` works in each, and
every settings model derives from `Strict`, which reports a misspelt field instead of ignoring it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from proxy.env_values import empty_is_none

__all__ = [
    "ConfigError",
    "OptionalUrl",
    "Strict",
    "describe_validation_error",
    "expand_env",
    "load_document",
    "unset_variables",
]

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


class Strict(BaseModel):
    """The base of every settings model: an unknown field stops start-up, so a misspelt one is named."""

    model_config = ConfigDict(extra="forbid")


OptionalUrl = Annotated[str | None, BeforeValidator(empty_is_none)]
"""A URL left empty, as an unset `${NAME:-}` leaves it, is the default."""
