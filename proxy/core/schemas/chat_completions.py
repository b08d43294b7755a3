"""POST /v1/chat/completions: the messages and their content parts, tools, and the checks across
fields, including the one nested object that is strict, the message (`_MESSAGE_KEYS`)."""

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Required, TypeAlias, get_args

from pydantic import Field, Tag
from typing_extensions import TypedDict

from proxy.core.schemas.common import (
    ARRAY,
    INVALID,
    OBJECT,
    STRING,
    Bool,
    Count,
    Model,
    Object,
    Str,
    ToolChoiceMode,
    by_field,
    check_truncation,
    clip,
    either,
    invalid,
    lenient,
    top_level,
)
from proxy.core.schemas.generation import Generation, ResponseFormat, VllmSampling
from proxy.errors import ApiError

__all__ = ["ChatRequest", "check_chat", "check_message_keys"]


# Chat messages


@lenient
class _ImageUrl(TypedDict, total=False):
    url: Required[str]
    detail: Literal["auto", "low", "high"] | None


@lenient
class _MediaUrl(TypedDict, total=False):
    url: Required[str]


@lenient
class _InputAudio(TypedDict, total=False):
    data: Required[str]
    format: Required[str]


@lenient
class _File(TypedDict, total=False):
    file_data: Str
    file_id: Str
    filename: Str


@lenient
class _TextPart(TypedDict):
    text: str


@lenient
class _ImagePart(TypedDict):
    image_url: _ImageUrl


@lenient
class _InputAudioPart(TypedDict):
    input_audio: _InputAudio


@lenient
class _FilePart(TypedDict):
    file: _File


@lenient
class _RefusalPart(TypedDict):
    refusal: str


@lenient
class _AudioUrlPart(TypedDict):
    audio_url: _MediaUrl


@lenient
class _VideoUrlPart(TypedDict):
    video_url: _MediaUrl


@lenient
class _ImageEmbedsPart(TypedDict, total=False):
    image_embeds: (
        Annotated[
            Annotated[str, STRING] | Annotated[dict[str, str], OBJECT],
            either("a string or an object of strings"),
        ]
        | None
    )


_PartType: TypeAlias = Literal[
    "text", "image_url", "input_audio", "file", "refusal", "audio_url", "video_url", "image_embeds"
]
"""OpenAI's content parts, then the ones vLLM adds for its multi-modal models."""


@lenient
class _AnyPart(TypedDict):
    type: _PartType


_Part: TypeAlias = Annotated[
    Annotated[_TextPart, Tag("<text>")]
    | Annotated[_ImagePart, Tag("<image_url>")]
    | Annotated[_InputAudioPart, Tag("<input_audio>")]
    | Annotated[_FilePart, Tag("<file>")]
    | Annotated[_RefusalPart, Tag("<refusal>")]
    | Annotated[_AudioUrlPart, Tag("<audio_url>")]
    | Annotated[_VideoUrlPart, Tag("<video_url>")]
    | Annotated[_ImageEmbedsPart, Tag("<image_embeds>")]
    | Annotated[_AnyPart, INVALID],
    by_field("type", get_args(_PartType)),
]
_Content: TypeAlias = Annotated[
    Annotated[str, STRING] | Annotated[list[_Part], ARRAY],
    either("a string or an array of content parts"),
]


@lenient
class _FunctionCall(TypedDict):
    name: str
    arguments: str


@lenient
class _ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: _FunctionCall


@lenient
class _AssistantAudio(TypedDict):
    id: str


@lenient
class _PlainMessage(TypedDict, total=False):
    content: Required[_Content]
    name: Str


@lenient
class _AssistantMessage(TypedDict, total=False):
    content: _Content | None
    name: Str
    refusal: Str
    tool_calls: list[_ToolCall] | None
    function_call: _FunctionCall | None
    audio: _AssistantAudio | None


@lenient
class _ToolMessage(TypedDict):
    content: _Content
    tool_call_id: str


@lenient
class _FunctionMessage(TypedDict):
    content: str | None
    name: str


_Role: TypeAlias = Literal["system", "developer", "user", "assistant", "tool", "function"]


@lenient
class _AnyMessage(TypedDict):
    role: _Role


_Message: TypeAlias = Annotated[
    Annotated[_PlainMessage, Tag("<system>")]
    | Annotated[_PlainMessage, Tag("<developer>")]
    | Annotated[_PlainMessage, Tag("<user>")]
    | Annotated[_AssistantMessage, Tag("<assistant>")]
    | Annotated[_ToolMessage, Tag("<tool>")]
    | Annotated[_FunctionMessage, Tag("<function>")]
    | Annotated[_AnyMessage, INVALID],
    by_field("role", get_args(_Role)),
]


# Tools and other nested chat options


_FunctionName: TypeAlias = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


@lenient
class _FunctionDefinition(TypedDict, total=False):
    name: Required[_FunctionName]
    description: Str
    parameters: Object
    strict: Bool


@lenient
class _Tool(TypedDict):
    type: Literal["function"]
    function: _FunctionDefinition


@lenient
class _NamedFunction(TypedDict):
    name: str


@lenient
class _NamedToolChoice(TypedDict):
    type: Literal["function"]
    function: _NamedFunction


@lenient
class _Audio(TypedDict):
    voice: Annotated[
        Annotated[str, STRING] | Annotated[dict[str, Any], OBJECT],
        either("a string or an object"),
    ]
    format: str


@lenient
class _Prediction(TypedDict):
    type: Literal["content"]
    content: _Content


@lenient
class _WebSearchOptions(TypedDict, total=False):
    search_context_size: Literal["low", "medium", "high"] | None
    user_location: Object


# The request


class _ChatFields(TypedDict, total=False):
    model: Required[Model]
    messages: Required[Annotated[list[_Message], Field(min_length=1)]]
    audio: _Audio | None
    function_call: (
        Annotated[
            Annotated[Literal["none", "auto"], STRING] | Annotated[_NamedFunction, OBJECT],
            either("'none', 'auto' or an object naming a function"),
        ]
        | None
    )
    functions: Annotated[list[_FunctionDefinition], Field(max_length=128)] | None
    logprobs: Bool
    max_completion_tokens: Count
    metadata: dict[str, str] | None
    modalities: list[Literal["text", "audio"]] | None
    parallel_tool_calls: Bool
    prediction: _Prediction | None
    prompt_cache_key: Str
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None
    response_format: ResponseFormat
    safety_identifier: Str
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None
    store: Bool
    tool_choice: (
        Annotated[
            Annotated[ToolChoiceMode, STRING] | Annotated[_NamedToolChoice, OBJECT],
            either("'none', 'auto', 'required' or an object naming a function"),
        ]
        | None
    )
    tools: Annotated[list[_Tool], Field(max_length=128)] | None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None
    verbosity: Literal["low", "medium", "high"] | None
    web_search_options: _WebSearchOptions | None


class _VllmChatExtras(VllmSampling, total=False):
    """Fields vLLM backends accept on chat/completions beyond OpenAI's."""

    echo: Bool
    chat_template: Str
    chat_template_kwargs: Object
    add_generation_prompt: Bool
    continue_final_message: Bool
    documents: list[dict[str, str]] | None
    mm_processor_kwargs: Object


@top_level
class ChatRequest(_ChatFields, Generation, _VllmChatExtras, total=False):
    """POST /v1/chat/completions"""


# Checks across fields


_MESSAGE_KEYS = frozenset(
    {
        # OpenAI's message types, every role
        "role",
        "content",
        "name",
        "refusal",
        "tool_calls",
        "tool_call_id",
        "function_call",
        "audio",
        # vLLM's own message type (any role) and what its chat templates read back
        "reasoning",
        "reasoning_content",
        "tools",
        "task",
    }
)
"""Keys a chat message may carry: those of OpenAI's message types and of vLLM's.

A message is the one nested object where an unknown key is refused rather than ignored. OpenAI refuses
it too ("Additional properties are not allowed"), while vLLM silently drops it, so a misspelt
`tool_call_id` or `contents` would reach the model as a different conversation than the client meant.
Elsewhere (content parts, tools, formats) vLLM and the SDKs add keys faster than a gateway is updated.
"""


def check_message_keys(body: Mapping[str, Any]) -> None:
    """Runs before the types are checked: a misspelt key usually explains a missing one."""
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict) or _MESSAGE_KEYS.issuperset(message):
            continue  # one check in C per message: a conversation may hold hundreds
        unknown = sorted(key for key in message if key not in _MESSAGE_KEYS)
        if unknown:
            param = f"messages.{index}.{clip(unknown[0])}"
            raise ApiError(
                400, f"Unrecognized message key supplied: {param}", param=param, code="unknown_parameter"
            )


def check_chat(body: Mapping[str, Any]) -> None:
    check_truncation(body)
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        raise invalid("top_logprobs", "Only allowed when logprobs is true")
