"""The endpoint adaptor contract: what the gateway calls to run one model on one backend.

It mirrors the existing gateway's `BaseEndpoint`; with the `resource_server_async` compatibility
package a site's adaptor moves unchanged, Django's `StreamingHttpResponse` included (see
docs/adaptors.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from enum import Enum
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from adaptors._access import access_list
from adaptors.context import AdaptorContext


class BatchStatusEnum(str, Enum):
    """A batch's state: the one type for adaptors, the compatibility package (`BatchStatus`) and
    the gateway's batch store and routes. `pending` and `running` batches are active (polled, and
    counted against their user's quota); `completed` and `failed` ones are finished for good."""

    pending = "pending"
    running = "running"
    failed = "failed"
    completed = "completed"

    @property
    def finished(self) -> bool:
        return self in (BatchStatusEnum.completed, BatchStatusEnum.failed)


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
    error_detail: str | None = None
    """The backend's own text when `error_message` shows the client less (internal host names, a
    traceback): kept in the request's record, never sent to the client."""


@runtime_checkable
class StreamingContent(Protocol):
    """What the existing gateway's adaptors return: Django's `StreamingHttpResponse`, whose
    `streaming_content` iterates (synchronously or not) over `str` or `bytes`."""

    @property
    def streaming_content(self) -> Any: ...


class SubmitStreamingTaskResponse(BaseModel):
    """`response` yields the bytes of the event stream, written to the client as they come (or
    carries them in `streaming_content`, as a Django `StreamingHttpResponse` does). `retryable` and
    `retry_after` as in `SubmitTaskResponse`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    response: AsyncIterator[bytes] | StreamingContent | None = None
    task_id: str | None = None
    error_message: str | None = None
    error_code: int | None = None
    retryable: bool | None = None
    retry_after: float | None = None
    error_detail: str | None = None
    """As in `SubmitTaskResponse`."""
    keepalive_seconds: float | None = Field(default=None, gt=0)
    """Until `response` yields the model's first output (an item that is not an SSE comment), the
    gateway writes the client a comment after every this many seconds without a write, so that a
    backend that queues the request or loads the model does not leave the client without headers
    or bytes while read timeouts run. None: no comments but the adaptor's own."""


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


class SubmitTaskAsyncResponse(BaseModel):
    """A task accepted to run on its own; the client asks for its result later by `task_id`."""

    task_id: str | None = None
    error_message: str | None = None
    error_code: int | None = None
    retry_after: float | None = None
    """As in `SubmitTaskResponse`: for a refusal that will pass, such as a cold start."""


class GetTaskResultResponse(BaseModel):
    """`done` with the function's return value in `result`, not yet done, or an error."""

    done: bool = False
    result: Any = None
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
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.detail = detail
        """As `error_detail` in `SubmitTaskResponse`."""


BATCH_NOT_ENABLED = "Batch is not enabled for this endpoint."
TASKS_NOT_SUPPORTED = "This endpoint does not run asynchronous tasks."


CLIENT_JSON: Final = "client_json"
"""The key of `data` that holds the client's body bytes, for an adaptor that `forwards_client_json`."""


class BaseEndpoint(ABC):
    forwards_client_json: ClassVar[bool] = False
    """True for an adaptor that sends the client's fields on as JSON: `data[CLIENT_JSON]` then holds
    the body's bytes as the client sent them whenever they mean exactly `data["model_params"]` less
    `openai_endpoint` (the key is absent otherwise), so that they need not be encoded again. Not
    given to other adaptors: one that sends `data` on whole could not encode bytes. A subclass of
    `DirectAPIEndpoint` does not inherit it: it may change the fields before sending them."""

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

    async def submit_task_async(self, data: dict[str, Any]) -> SubmitTaskAsyncResponse:
        """Start the endpoint's function on `data` (the client's JSON object) without waiting for it:
        for services that are not OpenAI-shaped, whose work outlasts an HTTP request."""
        return SubmitTaskAsyncResponse(error_message=TASKS_NOT_SUPPORTED, error_code=400)

    async def get_task_result(self, task_id: str) -> GetTaskResultResponse:
        """Where a task started by `submit_task_async` is; asked again until `done` or an error."""
        return GetTaskResultResponse(error_message=TASKS_NOT_SUPPORTED, error_code=400)

    async def startup(self, context: AdaptorContext) -> None:
        """Open connections and pools; called once the event loop runs."""

    async def shutdown(self) -> None:
        """Release what `startup` opened."""
