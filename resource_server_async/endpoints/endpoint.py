"""`resource_server_async.endpoints.endpoint`: the endpoint contract of either version of the
existing gateway.

Its documentation's adaptors call `super().__init__(id, endpoint_slug, cluster, framework, model,
endpoint_adapter, allowed_globus_groups, allowed_domains)`; its current ones put `tpm_model,
tpm_user` before the access lists. `BaseEndpoint` here takes both and keeps the limits as
attributes (the gateway enforces them from the entry, see proxy/core/registry.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adaptors.endpoint import BaseEndpoint as _Base
from adaptors.endpoint import (
    BatchStatusEnum,
    GetBatchStatusResponse,
    StreamError,
    SubmitBatchResponse,
    SubmitStreamingTaskResponse,
    SubmitTaskResponse,
)
from resource_server_async.schemas.endpoints import BatchStatusResult, SubmitBatchResult, SubmitTaskResult

AccessList = str | Iterable[str] | None


class BaseEndpoint(_Base):
    def __init__(
        self,
        id: str,
        endpoint_slug: str,
        cluster: str,
        framework: str,
        model: str,
        endpoint_adapter: str,
        *rest: Any,
        tpm_model: int | None = None,
        tpm_user: int | None = None,
        allowed_globus_groups: AccessList = None,
        allowed_domains: AccessList = None,
    ) -> None:
        positional = list(rest)
        if positional and isinstance(positional[0], int) and not isinstance(positional[0], bool):
            tpm_model = positional.pop(0)
            if positional:
                tpm_user = positional.pop(0)
        if len(positional) > 2:
            raise TypeError(f"BaseEndpoint takes at most 10 positional arguments, got {6 + len(rest)}")
        if positional:
            allowed_globus_groups = positional[0]
        if len(positional) == 2:
            allowed_domains = positional[1]
        super().__init__(
            id, endpoint_slug, cluster, framework, model, endpoint_adapter,
            allowed_globus_groups, allowed_domains,
        )  # fmt: skip
        self.tpm_model = tpm_model
        self.tpm_user = tpm_user


__all__ = [
    "BaseEndpoint",
    "BatchStatusEnum",
    "BatchStatusResult",
    "GetBatchStatusResponse",
    "StreamError",
    "SubmitBatchResponse",
    "SubmitBatchResult",
    "SubmitStreamingTaskResponse",
    "SubmitTaskResponse",
    "SubmitTaskResult",
]
