"""Reading the staged configuration and the pilot's credentials, before anything starts.

A pilot that cannot serve until the end of its walltime must not start at all: the gateway
would route requests to it until the TLS handshakes begin to fail. So the certificate's expiry
is checked against the walltime here, and the certificate, key and CA are loaded into the
server's SSL context once, so that a wrong file is named at start rather than at the first
connection.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from mtls.certificates import expires_at
from mtls.contexts import server_context
from pilot.protocol import PilotConfig


class ConfigError(Exception):
    """A problem with the configuration file or the files it names, one per line, each naming the
    file and the field; the pilot prints it and exits with status 2."""


@dataclass(frozen=True)
class Credentials:
    context: ssl.SSLContext
    not_after: datetime.datetime


def load_config(path: Path) -> PilotConfig:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        config = PilotConfig.model_validate_json(text)
    except ValidationError as exc:
        # The messages never quote the input: the file holds the replica's token.
        lines = [f"{path}: {_location(error['loc'])}: {error['msg']}" for error in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    problems = _conflicts(config)
    if problems:
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in problems))
    return config


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(the whole file)"


def _conflicts(config: PilotConfig) -> list[str]:
    """What each model alone cannot say: two models under one name or on one fixed port."""
    problems = []
    names: set[str] = set()
    ports: set[int] = set()
    for index, model in enumerate(config.models):
        if model.name in names:
            problems.append(f"models.{index}.name: {model.name!r} names another model too")
        if model.port and model.port in ports:
            problems.append(f"models.{index}.port: {model.port} is another model's port too")
        names.add(model.name)
        ports.add(model.port)
    return problems


def credential_paths(config: PilotConfig, config_file: Path) -> tuple[Path, Path, Path]:
    """The certificate, key and CA files; relative paths are read from the configuration's folder,
    where the gateway stages them."""
    base = config_file.parent
    return base / config.certificate, base / config.key, base / config.ca


def load_credentials(config: PilotConfig, config_file: Path, walltime_end: float) -> Credentials:
    certificate, key, ca = credential_paths(config, config_file)
    try:
        context = server_context(certificate, key, ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{config_file}: certificate, key, ca: cannot load {certificate}, {key} and {ca}: {exc}"
        ) from None
    try:
        not_after = expires_at(certificate)
    except ValueError as exc:
        raise ConfigError(
            f"{config_file}: certificate: {certificate} is not a PEM certificate: {exc}"
        ) from None
    end = datetime.datetime.fromtimestamp(walltime_end, datetime.UTC)
    if not_after < end:
        raise ConfigError(
            f"{config_file}: certificate: {certificate} expires at {not_after.isoformat()}, before the "
            f"walltime ends at {end.isoformat()}: issue a pilot certificate valid past it"
        )
    return Credentials(context, not_after)
