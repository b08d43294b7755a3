"""What chat completions and legacy completions share: OpenAI's sampling and streaming options,
vLLM's engine options, and the output format."""

from typing import Annotated, Any, Literal, Required, TypeAlias, get_args

from pydantic import Field, Tag
from typing_extensions import TypedDict

from proxy.core.schemas.common import (
    INVALID,
    OBJECT,
    STRING,
    Bool,
    Count,
    ExtraArg,
    Int64,
    LogitBias,
    Object,
    Penalty,
    Probability,
    Stop,
    Str,
    Temperature,
    TokenId,
    Truncation,
    by_field,
    either,
    lenient,
)

__all__ = ["Generation", "ResponseFormat", "VllmSampling"]


@lenient
class _JsonSchema(TypedDict, total=False):
    name: Required[str]
    description: Str
    schema: Object
    strict: Bool


@lenient
class _JsonSchemaFormat(TypedDict):
    json_schema: _JsonSchema


@lenient
class _PlainFormat(TypedDict):
    """A format with nothing to check beyond its type."""


_FormatType: TypeAlias = Literal["text", "json_object", "json_schema", "structural_tag"]
"""OpenAI's formats, then vLLM's `structural_tag`, whose body vLLM checks itself."""


@lenient
class _AnyFormat(TypedDict):
    type: _FormatType


ResponseFormat: TypeAlias = (
    Annotated[
        Annotated[_PlainFormat, Tag("<text>")]
        | Annotated[_PlainFormat, Tag("<json_object>")]
        | Annotated[_JsonSchemaFormat, Tag("<json_schema>")]
        | Annotated[_PlainFormat, Tag("<structural_tag>")]
        | Annotated[_AnyFormat, INVALID],
        by_field("type", get_args(_FormatType)),
    ]
    | None
)


@lenient
class _StreamOptions(TypedDict, total=False):
    include_usage: Bool
    include_obfuscation: Bool
    continuous_usage_stats: Bool


class Generation(TypedDict, total=False):
    """OpenAI's sampling and streaming options, common to chat and legacy completions."""

    frequency_penalty: Penalty
    logit_bias: LogitBias
    max_tokens: Count
    n: Annotated[int, Field(ge=1, le=128)] | None
    presence_penalty: Penalty
    seed: Int64
    stop: Stop
    stream: Bool
    stream_options: _StreamOptions | None
    temperature: Temperature
    top_p: Probability
    user: Str


class VllmSampling(TypedDict, total=False):
    """Engine options vLLM backends accept on both generation routes."""

    top_k: Annotated[int, Field(ge=-1)] | None
    min_p: Probability
    repetition_penalty: Annotated[float, Field(gt=0)] | None
    length_penalty: float | None
    min_tokens: Annotated[int, Field(ge=0)] | None
    ignore_eos: Bool
    skip_special_tokens: Bool
    spaces_between_special_tokens: Bool
    include_stop_str_in_output: Bool
    stop_token_ids: list[TokenId] | None
    bad_words: list[str] | None
    use_beam_search: Bool
    truncate_prompt_tokens: Truncation
    prompt_logprobs: Annotated[int, Field(ge=-1)] | None
    allowed_token_ids: list[TokenId] | None
    add_special_tokens: Bool
    guided_json: (
        Annotated[
            Annotated[str, STRING] | Annotated[dict[str, Any], OBJECT],
            either("a string or an object"),
        ]
        | None
    )
    guided_regex: Str
    guided_choice: list[str] | None
    guided_grammar: Str
    guided_decoding_backend: Str
    guided_whitespace_pattern: Str
    structured_outputs: Object
    priority: Int64
    request_id: Str
    return_tokens_as_token_ids: Bool
    logits_processors: (
        list[
            Annotated[
                Annotated[str, STRING] | Annotated[dict[str, Any], OBJECT],
                either("a string or an object"),
            ]
        ]
        | None
    )
    cache_salt: Annotated[str, Field(min_length=1)] | None
    kv_transfer_params: Object
    vllm_xargs: dict[str, ExtraArg] | None
