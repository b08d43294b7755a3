"""POST /v1/embeddings: an input of text or token ids, and vLLM's pooling options."""

from typing import Annotated, Any, Literal, Required, TypeAlias

from pydantic import Field
from typing_extensions import TypedDict

from proxy.core.schemas.common import (
    ARRAY,
    ARRAY_KINDS,
    INTEGER,
    STRING,
    Bool,
    Count,
    Int64,
    Model,
    Str,
    Text,
    TokenIds,
    Truncation,
    either,
    first_item_kind,
    top_level,
)

__all__ = ["EmbeddingRequest"]


_InputArray: TypeAlias = Annotated[
    Annotated[list[Text], Field(min_length=1, max_length=2048), STRING]
    | Annotated[TokenIds, INTEGER]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=2048), ARRAY],
    either(ARRAY_KINDS, first_item_kind),
]


class _EmbeddingFields(TypedDict, total=False):
    model: Required[Model]
    input: Required[
        Annotated[
            Annotated[Text, STRING] | Annotated[_InputArray, ARRAY],
            either("a string or an array"),
        ]
    ]
    dimensions: Count
    encoding_format: Literal["float", "base64"] | None
    user: Str


class _VllmEmbeddingExtras(TypedDict, total=False):
    """Fields vLLM backends accept on embeddings beyond OpenAI's."""

    truncate_prompt_tokens: Truncation
    add_special_tokens: Bool
    priority: Int64
    additional_data: Any
    normalize: Bool


@top_level
class EmbeddingRequest(_EmbeddingFields, _VllmEmbeddingExtras, total=False):
    """POST /v1/embeddings"""
