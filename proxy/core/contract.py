"""Calling adaptors written to any version of the existing gateway's adaptor contract.

Its documentation (and this gateway) has `submit_streaming_task(data, request_log_id)` and
`get_jobs()` return response models with an `error_code`. Its current code has
`submit_streaming_task(data)` and `get_jobs(auth)`, returns `SubmitTaskResult` (the result as
JSON text or as the parsed document), a Django `StreamingHttpResponse` for streams and the jobs
themselves, and raises exceptions carrying their status. Each adaptor is called with what its
signature asks for, and whatever it returns or raises becomes this gateway's response models, so
the rest of the gateway sees one contract.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from adaptors import BaseCluster, BaseEndpoint, GetJobsResponse, Jobs, StreamError
from adaptors.endpoint import (
    GetBatchStatusResponse,
    SubmitBatchResponse,
    SubmitStreamingTaskResponse,
    SubmitTaskResponse,
)
from adaptors.errors import AdaptorError
from proxy.core.identity import User

_ANY_NUMBER = 1_000


@functools.cache
def _positional_parameters(cls: type, method: str) -> int:
    """How many positional arguments the method takes besides `self`."""
    parameters = inspect.signature(getattr(cls, method)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return _ANY_NUMBER
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in kinds) - 1


def wants_user(cluster: BaseCluster) -> bool:
    """`get_jobs(self, auth)`: the report may depend on who asks."""
    return _positional_parameters(type(cluster), "get_jobs") >= 1


def status_of(error: AdaptorError) -> int:
    """The existing gateway's 500 is a backend fault: 502 here, as for every adaptor."""
    status = int(error.status_code)
    return status if 400 <= status <= 599 and status != 500 else 502


async def submit_task(endpoint: BaseEndpoint, data: dict[str, Any]) -> SubmitTaskResponse:
    try:
        task: Any = await endpoint.submit_task(data)
    except AdaptorError as exc:
        return SubmitTaskResponse(error_code=status_of(exc), error_message=exc.message)
    if isinstance(task, SubmitTaskResponse):
        return task
    task_id = getattr(task, "task_id", None)
    result = getattr(task, "result", None)
    if result is None or isinstance(result, str):
        return SubmitTaskResponse(result=result, task_id=task_id)
    if isinstance(result, bytes | bytearray):
        return SubmitTaskResponse(result=bytes(result).decode("utf-8", "replace"), task_id=task_id)
    try:
        return SubmitTaskResponse(result=json.dumps(result), task_id=task_id)
    except (TypeError, ValueError):
        return SubmitTaskResponse(error_code=502, error_message="The adaptor's result is not JSON.")


async def submit_streaming_task(
    endpoint: BaseEndpoint, data: dict[str, Any], request_log_id: str
) -> SubmitStreamingTaskResponse:
    try:
        if _positional_parameters(type(endpoint), "submit_streaming_task") >= 2:
            opened: Any = await endpoint.submit_streaming_task(data, request_log_id)
        else:
            opened = await endpoint.submit_streaming_task(data)  # type: ignore[call-arg]
    except AdaptorError as exc:
        return SubmitStreamingTaskResponse(error_code=status_of(exc), error_message=exc.message)
    if isinstance(opened, SubmitStreamingTaskResponse) and (
        opened.error_code is not None or isinstance(opened.response, AsyncIterator | None)
    ):
        return opened
    error_code = getattr(opened, "error_code", None)
    if error_code is not None:
        return SubmitStreamingTaskResponse(
            error_code=error_code, error_message=getattr(opened, "error_message", None)
        )
    response = getattr(opened, "response", None)
    if response is None:
        return SubmitStreamingTaskResponse(error_code=502, error_message="The backend sent no stream.")
    return SubmitStreamingTaskResponse(response=_bytes_of(response), task_id=getattr(opened, "task_id", None))


async def _bytes_of(response: Any) -> AsyncIterator[bytes]:
    """A Django `StreamingHttpResponse`'s content (or any iterator) as bytes; a synchronous
    iterator is advanced in a thread, never on the event loop."""
    content = getattr(response, "streaming_content", response)
    if not hasattr(content, "__aiter__") and not hasattr(content, "__iter__"):
        raise StreamError("The adaptor's stream is not an iterator.", 502)
    try:
        if hasattr(content, "__aiter__"):
            async for part in content:
                yield _as_bytes(part)
        else:
            iterator: Iterator[Any] = iter(content)
            end = object()
            while (part := await asyncio.to_thread(next, iterator, end)) is not end:
                yield _as_bytes(part)
    except AdaptorError as exc:
        raise StreamError(exc.message, status_of(exc)) from None
    finally:
        for closing in (getattr(content, "aclose", None), getattr(content, "close", None)):
            if closing is not None:
                result = closing()
                if inspect.isawaitable(result):
                    await result
                break


def _as_bytes(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    if isinstance(part, bytearray | memoryview):
        return bytes(part)
    raise StreamError(f"The adaptor's stream yielded {type(part).__name__}, not text.", 502)


async def get_jobs(cluster: BaseCluster, user: User | None) -> GetJobsResponse:
    try:
        if wants_user(cluster):
            report: Any = await cluster.get_jobs(user)  # type: ignore[call-arg]
        else:
            report = await cluster.get_jobs()
    except AdaptorError as exc:
        return GetJobsResponse(error_code=status_of(exc), error_message=exc.message)
    if isinstance(report, GetJobsResponse):
        return report
    if isinstance(report, Jobs):
        return GetJobsResponse(jobs=report)
    try:
        document = report.model_dump() if isinstance(report, BaseModel) else report
        return GetJobsResponse(jobs=Jobs.model_validate(document))
    except ValidationError:
        return GetJobsResponse(error_code=502, error_message="The cluster adaptor returned no job report.")


class BatchData(dict[str, Any]):
    """A batch request, read as a mapping (the guide's `batch_data: dict`) or by attribute (the
    current code's `BatchSubmit`: `batch_data.input_file`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


async def submit_batch(endpoint: BaseEndpoint, body: dict[str, Any], username: str) -> SubmitBatchResponse:
    try:
        submitted: Any = await endpoint.submit_batch(BatchData(body), username)
    except AdaptorError as exc:
        return SubmitBatchResponse(error_code=status_of(exc), error_message=exc.message)
    if isinstance(submitted, SubmitBatchResponse):
        return submitted
    try:
        return SubmitBatchResponse.model_validate(_fields(submitted, SubmitBatchResponse))
    except ValidationError:
        return SubmitBatchResponse(
            error_code=502, error_message="The adaptor's batch answer is not understood."
        )


async def get_batch_status(endpoint: BaseEndpoint, record: Any) -> GetBatchStatusResponse:
    try:
        report: Any = await endpoint.get_batch_status(record)
    except AdaptorError as exc:
        return GetBatchStatusResponse(error_code=status_of(exc), error_message=exc.message)
    if isinstance(report, GetBatchStatusResponse):
        return report
    try:
        return GetBatchStatusResponse.model_validate(_fields(report, GetBatchStatusResponse))
    except ValidationError:
        return GetBatchStatusResponse(error_message="The adaptor's batch status is not understood.")


def _fields(value: Any, model: type[BaseModel]) -> dict[str, Any]:
    """The attributes of `value` that `model` has (the current code's result types lack some)."""
    return {name: getattr(value, name) for name in model.model_fields if hasattr(value, name)}
