"""The endpoint adaptor contract: what the gateway calls to run one model on one backend.

It mirrors the existing gateway's `BaseEndpoint` so that a site's adaptor moves with an import
change; the one difference aiohttp forces is the streaming response (see docs/adaptors.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

from adaptors._access import access_list
from adaptors.context import AdaptorContext


class BatchStatusEnum(str, Enum):
    pending = "pending"
    running = "running"
    failed = "failed"
    completed = "completed"


class SubmitTaskResponse(BaseModel):
    """On failure, two hints for the client's retries. `retryable` False: a retry would repeat
    work that is still running, or fail the same way (a task that failed, a configuration the
    backend refused); the client is told not to retry. A 504 is never retried whatever this says.
    `retry_after`: seconds until a retry may succeed (a model loading, a busy backend); a 503
    without it gets a short default."""

    result: str | None = None
    task_id: str | None = None
    error_message: str | None = None
    error_code: int | None = None
    retryable: bool | None = None
    retry_after: float | None = None


class SubmitStreamingTaskResponse(BaseModel):
    """`response` yields the bytes of the event stream, written to the client as they come.
    `retryable` and `retry_after` as in `SubmitTaskResponse`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    response: AsyncIterator[bytes] | None = None
    task_id: str | None = None
    error_message: str | None = None
    error_code: int | None = None
    retryable: bool | None = None
    retry_after: float | None = None


class SubmitBatchResponse(BaseModel):
    batch_id: str | None = None
    task_ids: str | None = None
    status: BatchStatusEnum | None = None
    error_message: str | None = None
    error_code: int | None = None


class GetBatchStatusResponse(BaseModel):
    status: BatchStatusEnum | None = None
    result: str | None = None
    error_message: str | None = None
    error_code: int | None = None


class StreamError(Exception):
    """Raised by a stream's iterator once bytes were sent: the gateway ends the stream with an
    SSE error event carrying this message instead of truncating it silently. Raised before the
    first byte, it is a plain error status with the retry hints of `SubmitTaskResponse`."""

    def __init__(
        self,
        message: str,
        code: int = 502,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after


BATCH_NOT_ENABLED = "Batch is not enabled for this endpoint."


class BaseEndpoint(ABC):
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
    ) -> None:
        self.id = id
        self.endpoint_slug = endpoint_slug
        self.cluster = cluster
        self.framework = framework
        self.model = model
        self.endpoint_adapter = endpoint_adapter
        self.allowed_globus_groups = access_list(allowed_globus_groups)
        self.allowed_domains = access_list(allowed_domains)

    @abstractmethod
    async def submit_task(self, data: dict[str, Any]) -> SubmitTaskResponse:
        """Run one request; `data["model_params"]` holds the client's fields and `openai_endpoint`."""

    @abstractmethod
    async def submit_streaming_task(
        self, data: dict[str, Any], request_log_id: str
    ) -> SubmitStreamingTaskResponse:
        """Start one streaming request; fail here (error_code) while nothing was sent yet."""

    def has_batch_enabled(self) -> bool:
        return False

    async def submit_batch(self, batch_data: dict[str, Any], username: str) -> SubmitBatchResponse:
        return SubmitBatchResponse(error_message=BATCH_NOT_ENABLED, error_code=400)

    async def get_batch_status(self, batch: Any) -> GetBatchStatusResponse:
        return GetBatchStatusResponse(error_message=BATCH_NOT_ENABLED, error_code=400)

    async def startup(self, context: AdaptorContext) -> None:
        """Open connections and pools; called once the event loop runs."""

    async def shutdown(self) -> None:
        """Release what `startup` opened."""
