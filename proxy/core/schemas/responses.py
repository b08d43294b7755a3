"""POST /v1/responses: OpenAI's Responses API, whose many kinds of input items, tools and
formats the backend checks; here only their tags are."""

from typing import Annotated, Any, Literal, Required, TypeAlias

from pydantic import Discriminator, Field, Tag
from typing_extensions import TypedDict

from proxy.core.schemas.common import (
    ARRAY,
    OBJECT,
    STRING,
    Bool,
    Count,
    ExtraArg,
    Int64,
    LogitBias,
    Model,
    Object,
    Penalty,
    Probability,
    Stop,
    Str,
    Temperature,
    Text,
    ToolChoiceMode,
    Typed,
    either,
    lenient,
    top_level,
)

__all__ = ["ResponsesRequest"]


_ResponsesContent: TypeAlias = Annotated[
    Annotated[str, STRING] | Annotated[list[Typed], ARRAY],
    either("a string or an array of content parts"),
]


@lenient
class _InputMessage(TypedDict, total=False):
    role: Required[Literal["user", "assistant", "system", "developer"]]
    content: Required[_ResponsesContent]
    type: Literal["message"]


def _input_item_kind(value: Any) -> str:
    """A message may leave out its `type`; every other input item names its kind in `type`."""
    return "<message>" if isinstance(value, dict) and "role" in value else "<item>"


_InputItem: TypeAlias = Annotated[
    Annotated[_InputMessage, Tag("<message>")] | Annotated[Typed, Tag("<item>")],
    Discriminator(_input_item_kind),
]


@lenient
class _Reasoning(TypedDict, total=False):
    effort: Str
    summary: Str
    generate_summary: Str


@lenient
class _TextConfig(TypedDict, total=False):
    format: Typed | None
    verbosity: Literal["low", "medium", "high"] | None


@lenient
class _PromptTemplate(TypedDict, total=False):
    id: Required[str]
    variables: Object
    version: Str


@lenient
class _ConversationRef(TypedDict):
    id: str


@lenient
class _ResponsesStreamOptions(TypedDict, total=False):
    include_obfuscation: Bool


class _ResponsesFields(TypedDict, total=False):
    """OpenAI's fields, as its Python SDK sends them."""

    model: Required[Model]
    input: Required[
        Annotated[
            Annotated[Text, STRING] | Annotated[list[_InputItem], Field(min_length=1), ARRAY],
            either("a string or an array of input items"),
        ]
    ]
    access_programs: Object
    background: Bool
    background_options: Object
    context_management: list[Typed] | None
    conversation: (
        Annotated[
            Annotated[str, STRING] | Annotated[_ConversationRef, OBJECT],
            either("a string or an object with an id"),
        ]
        | None
    )
    image: Object
    include: list[str] | None
    instructions: Str
    max_output_tokens: Count
    max_tool_calls: Count
    metadata: dict[str, str] | None
    moderation: Object
    parallel_tool_calls: Bool
    previous_response_id: Str
    prompt: _PromptTemplate | None
    prompt_cache_key: Str
    prompt_cache_options: Object
    prompt_cache_retention: Literal["in_memory", "24h"] | None
    reasoning: _Reasoning | None
    safety_identifier: Str
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None
    store: Bool
    stream: Bool
    stream_options: _ResponsesStreamOptions | None
    temperature: Temperature
    text: _TextConfig | None
    tool_choice: (
        Annotated[
            Annotated[ToolChoiceMode, STRING] | Annotated[Typed, OBJECT],
            either("'none', 'auto', 'required' or an object naming a tool"),
        ]
        | None
    )
    tools: list[Typed] | None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None
    top_p: Probability
    truncation: Literal["auto", "disabled"] | None
    user: Str


class _VllmResponsesExtras(TypedDict, total=False):
    """Fields vLLM backends accept on responses beyond OpenAI's."""

    cache_salt: Annotated[str, Field(min_length=1)] | None
    chat_template_kwargs: Object
    enable_response_messages: Bool
    frequency_penalty: Penalty
    ignore_eos: Bool
    include_reasoning: Bool
    include_stop_str_in_output: Bool
    kv_transfer_params: Object
    logit_bias: LogitBias
    mm_processor_kwargs: Object
    presence_penalty: Penalty
    previous_input_messages: list[dict[str, Any]] | None
    priority: Int64
    repetition_penalty: Annotated[float, Field(gt=0)] | None
    request_id: Str
    seed: Int64
    skip_special_tokens: Bool
    stop: Stop
    structured_outputs: Object
    top_k: Annotated[int, Field(ge=-1)] | None
    vllm_xargs: dict[str, ExtraArg] | None


@top_level
class ResponsesRequest(_ResponsesFields, _VllmResponsesExtras, total=False):
    """POST /v1/responses"""
