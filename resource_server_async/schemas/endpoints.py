"""`resource_server_async.schemas.endpoints`: the existing gateway's current result types.

`SubmitTaskResult.result` may be the answer's JSON text or the parsed document; the gateway
sends it as JSON either way. `SubmitStreamingTaskResponse.response` is a Django
`StreamingHttpResponse` there: anything with a `streaming_content` iterator of `str` or `bytes`
(or such an iterator itself) works here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from adaptors.endpoint import BatchStatusEnum


class SubmitTaskResult(BaseModel):
    result: Any
    task_id: str | None = None


@dataclass
class SubmitStreamingTaskResponse:
    response: Any
    task_id: str | None = None


class SubmitBatchResult(BaseModel):
    batch_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    input_file: str
    output_folder_path: str | None = None
    task_ids: str | None = None
    status: BatchStatusEnum = BatchStatusEnum.failed


class BatchStatusResult(BaseModel):
    status: BatchStatusEnum
    result: str | None = None
