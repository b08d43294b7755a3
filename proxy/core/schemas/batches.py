"""Batch submission, the one request body here that follows the existing gateway, not OpenAI."""

from typing import Annotated, NotRequired, TypeAlias

from pydantic import Field
from typing_extensions import TypedDict

from proxy.core.schemas.common import Model, top_level

__all__ = ["BatchRequest"]


_Path: TypeAlias = Annotated[str, Field(min_length=1, max_length=4096)]


@top_level
class BatchRequest(TypedDict):
    """POST /{cluster}/{framework}/v1/batches, as the existing gateway takes it: files on the
    cluster's file system, not OpenAI's uploaded-file batches."""

    input_file: _Path
    model: Model
    output_folder_path: NotRequired[_Path | None]
