"""POST /v1/completions, the legacy API: a prompt of text or token ids."""

from collections.abc import Mapping
from typing import Annotated, Any, Required, TypeAlias

from pydantic import Field
from typing_extensions import TypedDict

from proxy.core.schemas.common import (
    ARRAY,
    ARRAY_KINDS,
    INTEGER,
    STRING,
    Bool,
    Model,
    Str,
    Text,
    TokenIds,
    check_truncation,
    either,
    first_item_kind,
    invalid,
    top_level,
)
from proxy.core.schemas.generation import Generation, ResponseFormat, VllmSampling

__all__ = ["CompletionRequest", "check_completion"]


_PromptArray: TypeAlias = Annotated[
    Annotated[list[str], Field(min_length=1), STRING]
    | Annotated[TokenIds, INTEGER]
    | Annotated[list[TokenIds], Field(min_length=1), ARRAY],
    either(ARRAY_KINDS, first_item_kind),
]


class _CompletionFields(TypedDict, total=False):
    model: Required[Model]
    prompt: Required[
        Annotated[
            Annotated[Text, STRING] | Annotated[_PromptArray, ARRAY],
            either("a string or an array"),
        ]
    ]
    best_of: Annotated[int, Field(ge=1, le=20)] | None
    echo: Bool
    logprobs: Annotated[int, Field(ge=0, le=5)] | None
    suffix: Str


class _VllmCompletionExtras(VllmSampling, total=False):
    """Fields vLLM backends accept on completions beyond OpenAI's."""

    response_format: ResponseFormat


@top_level
class CompletionRequest(_CompletionFields, Generation, _VllmCompletionExtras, total=False):
    """POST /v1/completions"""


def check_completion(body: Mapping[str, Any]) -> None:
    check_truncation(body)
    best_of, n = body.get("best_of"), body.get("n")
    if best_of is not None and n is not None and best_of < n:
        raise invalid("best_of", "Input should be greater than or equal to n")
