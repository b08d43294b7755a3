"""A batch's result files in OpenAI's JSONL format: one line per answered request, in the input's
order, in the output file (a 2xx answer) or the error file (anything else)."""

from __future__ import annotations

import json
import time

from proxy.core.batch_lines import BatchLine
from proxy.records.file_store import FileRecord
from proxy.records.openai_batch_store import LineResult, OpenAIBatchRecord


def expired_line(line: BatchLine) -> bytes:
    """A line the completion window ran out before, as OpenAI reports it."""
    message = "This request could not be executed before the completion window expired."
    document = {
        "id": f"batch_req_expired_{line.number}",
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": "batch_expired", "message": message},
    }
    return json.dumps(document).encode() + b"\n"


def result_line(result: LineResult) -> bytes:
    """The answer's body is spliced in as the backend sent it (checked JSON), not parsed again."""
    head = json.dumps({"id": result.request_id, "custom_id": result.custom_id})[:-1]
    response = json.dumps({"status_code": result.status_code, "request_id": result.request_id})[:-1]
    body, error = result.body or "null", result.error or "null"
    return f'{head}, "response": {response}, "body": {body}}}, "error": {error}}}\n'.encode()


def result_file(batch: OpenAIBatchRecord, kind: str) -> FileRecord:
    """The same id each time it is written, so a resumed finalizing step replaces it."""
    file_id = f"file-{batch.id.removeprefix('batch_')}-{kind}"
    return FileRecord(
        id=file_id,
        user_id=batch.user_id,
        filename=f"{batch.id}_{kind}.jsonl",
        purpose="batch_output",
        bytes=0,
        created_at=time.time(),
        storage_key=file_id,
    )
