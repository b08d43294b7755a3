"""The `openai_batches` section: OpenAI's Files and Batch API (`/v1/files`, `/v1/batches` with an
`input_file_id`), run by the gateway itself line by line."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from proxy.settings.files import Strict

__all__ = ["OpenAIBatchSettings"]


class OpenAIBatchSettings(Strict):
    """Uploaded files and the background runner that answers their lines."""

    storage_dir: Path = Field(
        default=Path("batch-files"),
        description="where uploaded and result files are kept (relative to this file, like the SQLite file)",
    )
    max_file_bytes: int = Field(default=200 * 2**20, ge=1, description="largest file one upload may be")
    max_user_bytes: int = Field(default=2 * 2**30, ge=1, description="all of one user's files together")
    max_lines: int = Field(default=50_000, ge=1, description="requests in one batch input file")
    concurrent_per_batch: int = Field(default=8, ge=1, description="lines of one batch in flight at once")
    concurrent_per_user: int = Field(default=16, ge=1, description="lines of one user's batches in flight")
    concurrent_total: int = Field(
        default=32, ge=1, description="batch lines in flight in this process: live requests keep the rest"
    )
    poll_seconds: float = Field(default=2, gt=0, description="how often the runner looks for batches to run")
    lease_seconds: float = Field(
        default=30, gt=0, description="a runner that stops renewing its batch's lease loses it after this"
    )
