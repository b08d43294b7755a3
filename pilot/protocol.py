"""What the gateway and a pilot tell each other: the configuration the gateway stages for the
job, and the registration and heartbeats the pilot sends back. One definition for both ends.

Pilot -> gateway (plain HTTPS through the site's proxy, `Authorization: Bearer <token>`, the
per-replica token from the staged configuration):
- `POST {gateway_url}/register` with `Registration` -> 200 `PilotOrders`; 401 for an unknown or
  wrong token (the pilot exits).
- `POST {gateway_url}/heartbeat` with `Heartbeat` every `heartbeat_seconds` -> 200 `PilotOrders`;
  401 as above; `stop` true: the pilot stops its model servers and exits.

Gateway -> pilot (mTLS on the pilot's port; the client certificate's subject decides):
- `{gateway_subjects}`: `ANY /deployments/{model name}/{path}` forwarded to that model server's
  `http://127.0.0.1:{port}/{path}`; `GET /pilot/status` -> `Heartbeat`; `POST /pilot/stop`.
- `{metrics_subjects}`: `GET /metrics` (Prometheus text).
- any other subject: 403; no certificate or another CA: the handshake fails.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """The deployment's name: the path segment under `/deployments/`."""
    command: tuple[str, ...] = Field(min_length=1)
    """The model server's argv; `{port}` in any argument is replaced by `port`."""
    port: int = Field(ge=0, le=65535)
    """The model server's port on 127.0.0.1; 0: the pilot picks a free one."""
    health_path: str = "/health"
    startup_timeout_seconds: float = Field(default=1800, gt=0)
    """A model server not healthy by then is reported `failed` (and the pilot exits)."""


class PilotConfig(_Strict):
    """Staged by the gateway for one replica, read by `python -m pilot --config FILE`."""

    replica_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    gateway_url: str = Field(pattern=r"^https?://\S+$")
    """Where the pilot registers and heartbeats, e.g. https://gw.example.org/resource_server/pilots."""
    token: str = Field(min_length=32)
    listen_host: str = "0.0.0.0"
    listen_port: int = Field(default=0, ge=0, le=65535)
    advertise_host: str | None = None
    """The address the gateway dials; by default the node's address towards the gateway."""
    certificate: str
    key: str
    ca: str
    gateway_subjects: tuple[str, ...] = Field(min_length=1)
    metrics_subjects: tuple[str, ...] = ()
    walltime_seconds: int = Field(gt=0)
    """The job's walltime: the pilot refuses to start with a certificate that expires sooner."""
    heartbeat_seconds: float = Field(default=10, gt=0)
    models: tuple[ModelConfig, ...] = Field(min_length=1)


class ModelState(str, enum.Enum):
    loading = "loading"
    ready = "ready"
    failed = "failed"


class ModelReport(_Strict):
    name: str
    state: ModelState
    detail: str = ""


class Registration(_Strict):
    replica_id: str
    address: str
    port: int = Field(ge=1, le=65535)
    models: tuple[ModelReport, ...]
    walltime_end: float
    """Epoch seconds at which the scheduler will kill the job."""
    certificate_not_after: float


class Heartbeat(_Strict):
    replica_id: str
    models: tuple[ModelReport, ...]
    in_flight: int = Field(default=0, ge=0)


class PilotOrders(_Strict):
    stop: bool = False
    heartbeat_seconds: float | None = None
