"""The `server` and `timeouts` sections: the listening socket, the processes serving it, and how
long connections and caches live."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from proxy.settings.files import Strict

__all__ = ["ServerSettings", "TimeoutSettings"]


class ServerSettings(Strict):
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


class TimeoutSettings(Strict):
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
