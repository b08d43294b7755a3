"""Asynchronous tasks on Globus Compute: the function starts now and the client comes back for its
result (the existing gateway's SAM3 service, and any other function that is not OpenAI-shaped).

The status is read from the raw task document, as the poller reads it, so a failed task is an
error the client sees rather than a task that stays pending forever.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import globus_sdk

from adaptors.compute_results import UnreadableResult
from adaptors.compute_service import GLOBUS_COMPUTE, ComputeService
from adaptors.endpoint import GetTaskResultResponse, SubmitTaskAsyncResponse
from adaptors.remote_errors import remote_error
from adaptors.transport import transport_failure

log = logging.getLogger(__name__)


async def start_task(
    service: ComputeService,
    endpoint_uuid: str,
    function_uuid: str,
    data: dict[str, Any],
    config_fields: dict[str, str],
) -> SubmitTaskAsyncResponse:
    """The client's object is the function's one argument, as the existing gateway sends it, less
    the fields that configure the endpoint rather than the call (`config_fields`: the existing
    SAM3 service's `weights_dir_override` becomes the endpoint template's `sam3_weights_dir`)."""
    argument = {key: value for key, value in data.items() if key not in config_fields}
    endpoint_config = {
        config_fields[key]: value for key, value in data.items() if key in config_fields and value is not None
    }
    try:
        task_id = await service.submit(
            endpoint_uuid, function_uuid, argument, endpoint_config=endpoint_config
        )
    except globus_sdk.GlobusError as exc:
        log.warning("Globus Compute refused an asynchronous task: %s", type(exc).__name__)
        failure = transport_failure(exc, GLOBUS_COMPUTE)
        return SubmitTaskAsyncResponse(error_code=failure.status, error_message=failure.message)
    return SubmitTaskAsyncResponse(task_id=task_id)


async def task_result(service: ComputeService, task_id: str) -> GetTaskResultResponse:
    try:
        documents = await service.statuses([task_id])
    except globus_sdk.GlobusError as exc:
        log.warning("Globus Compute status of an asynchronous task failed: %s", type(exc).__name__)
        failure = transport_failure(exc, GLOBUS_COMPUTE)
        return GetTaskResultResponse(error_code=failure.status, error_message=failure.message)
    document = documents.get(task_id)
    if not isinstance(document, dict):
        return GetTaskResultResponse(error_code=502, error_message="Globus Compute does not know the task.")
    status = str(document.get("status", "")).lower()
    if status == "success" and "result" in document:
        try:
            return GetTaskResultResponse(done=True, result=_decoded(service.value(document)))
        except UnreadableResult as exc:
            return GetTaskResultResponse(error_code=502, error_message=str(exc))
        except Exception as exc:
            message = f"The task's result is unreadable ({type(exc).__name__})."
            return GetTaskResultResponse(error_code=502, error_message=message)
    if status == "failed" or "exception" in document:
        remote = remote_error(str(document.get("exception") or document.get("reason") or ""))
        if remote.detail is not None:
            log.warning("asynchronous task %s failed: %s", task_id, remote.detail[:2000])
        return GetTaskResultResponse(error_code=remote.status, error_message=remote.message)
    return GetTaskResultResponse()


def _decoded(value: Any) -> Any:
    """Functions often return their document as a JSON string; the client gets the document."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
