"""Per-endpoint Globus Compute credentials, as the existing gateway's
GLOBUS_ENDPOINT_CREDENTIALS_OVERRIDES gives them: a JSON object mapping a compute endpoint's uuid
to `{"client_id", "client_secret"}`. Tasks for that endpoint are submitted with those credentials
instead of SERVICE_ACCOUNT_ID / SERVICE_ACCOUNT_SECRET (an endpoint owned by another project)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

OVERRIDES_ENV = "GLOBUS_ENDPOINT_CREDENTIALS_OVERRIDES"


class _Credentials(BaseModel):
    client_id: str
    client_secret: str


_OVERRIDES = TypeAdapter(dict[str, _Credentials])


def with_endpoint_credentials(config: dict[str, Any], endpoint_field: str) -> dict[str, Any]:
    """`config` with the overriding credentials of the endpoint it names in `endpoint_field`; an
    entry that sets its own `client_id` or `client_secret` keeps them."""
    raw = os.environ.get(OVERRIDES_ENV, "").strip()
    if not raw or config.get("client_id") or config.get("client_secret"):
        return config
    try:
        overrides = _OVERRIDES.validate_json(raw)
    except ValidationError:
        raise ValueError(
            f"{OVERRIDES_ENV} must be a JSON object of endpoint uuid → "
            '{"client_id": ..., "client_secret": ...}'
        ) from None
    found = overrides.get(str(config.get(endpoint_field, "")))
    if found is None:
        return config
    return {**config, "client_id": found.client_id, "client_secret": found.client_secret}
