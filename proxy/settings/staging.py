"""The `data_staging` section: a folder per user on a Globus collection the gateway manages."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator

from proxy.env_values import empty_is_none
from proxy.settings.files import OptionalUrl, Strict

__all__ = ["DataStagingSettings"]


class DataStagingSettings(Strict):
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
