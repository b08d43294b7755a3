"""Batches on Globus Compute, as the existing gateway runs them: the endpoint's batch function reads
an input file on the cluster's file system and writes its results beside it.

The payload is the existing batch function's; a batch's status is read from its tasks' raw
documents, as the result poller reads them, so a failed task fails the batch with its reason.
"""

from __future__ import annotations

from typing import Any

from adaptors.compute_results import UnreadableResult, as_json_text
from adaptors.compute_service import ComputeService
from adaptors.endpoint import BatchStatusEnum, GetBatchStatusResponse

BATCH_FIELDS = ("input_file", "model", "output_folder_path")


def batch_payload(batch_data: dict[str, Any], username: str) -> dict[str, Any]:
    """The file paths on the cluster, the gateway's batch id and the user, as the function takes them."""
    params = {key: batch_data[key] for key in BATCH_FIELDS if batch_data.get(key) is not None}
    return {"model_params": params, "batch_id": str(batch_data["batch_id"]), "username": username}


def task_ids_of(batch: Any) -> list[str]:
    """`batch` is the gateway's record of it; its `task_ids` are comma-separated."""
    return [task_id for task_id in str(batch.task_ids or "").split(",") if task_id]


def batch_status(
    service: ComputeService, documents: list[dict[str, Any]], accept_dill: bool
) -> GetBatchStatusResponse:
    """A batch of several tasks is completed once all are, with their results as one JSON list."""
    states = [str(document.get("status", "")).lower() for document in documents]
    if "failed" in states:
        failed = documents[states.index("failed")]
        message = str(failed.get("exception") or failed.get("reason") or "The batch task failed.")
        return GetBatchStatusResponse(status=BatchStatusEnum.failed, error_message=message[-2000:])
    if states and all(state == "success" for state in states):
        try:
            values = [as_json_text(service.value(document, accept_dill)) for document in documents]
        except UnreadableResult as exc:
            return GetBatchStatusResponse(status=BatchStatusEnum.failed, error_message=str(exc))
        except ValueError:
            return GetBatchStatusResponse(
                status=BatchStatusEnum.failed, error_message="Unreadable batch result."
            )
        result = values[0] if len(values) == 1 else "[" + ",".join(values) + "]"
        return GetBatchStatusResponse(status=BatchStatusEnum.completed, result=result)
    running = any(state in ("running", "success") for state in states)
    return GetBatchStatusResponse(status=BatchStatusEnum.running if running else BatchStatusEnum.pending)
