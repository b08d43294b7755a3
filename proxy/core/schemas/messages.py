"""POST /v1/messages: Anthropic's Messages API, whose fields may not be null unless its SDK
says so."""

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Required, TypeAlias, get_args

from pydantic import Field, Tag
from typing_extensions import TypedDict

from proxy.core.schemas.common import (
    ARRAY,
    INVALID,
    OBJECT,
    STRING,
    Model,
    Object,
    Str,
    Typed,
    by_field,
    either,
    invalid,
    lenient,
    top_level,
)

__all__ = ["MessagesRequest", "check_messages"]


_Blocks: TypeAlias = Annotated[
    Annotated[str, STRING] | Annotated[list[Typed], ARRAY],
    either("a string or an array of content blocks"),
]


@lenient
class _AnthropicMessage(TypedDict):
    role: Literal["user", "assistant", "system"]
    content: _Blocks


@lenient
class _TextBlock(TypedDict):
    type: Literal["text"]
    text: str


@lenient
class _AnthropicMetadata(TypedDict, total=False):
    user_id: Str


@lenient
class _NamedTool(TypedDict):
    """Every Anthropic tool has a name, whatever its type."""

    name: str


@lenient
class _ToolMode(TypedDict, total=False):
    disable_parallel_tool_use: bool


@lenient
class _ChosenTool(TypedDict, total=False):
    name: Required[str]
    disable_parallel_tool_use: bool


_AnthropicToolChoiceType: TypeAlias = Literal["auto", "any", "tool", "none"]


@lenient
class _AnyAnthropicToolChoice(TypedDict):
    type: _AnthropicToolChoiceType


_AnthropicToolChoice: TypeAlias = Annotated[
    Annotated[_ToolMode, Tag("<auto>")]
    | Annotated[_ToolMode, Tag("<any>")]
    | Annotated[_ChosenTool, Tag("<tool>")]
    | Annotated[_ToolMode, Tag("<none>")]
    | Annotated[_AnyAnthropicToolChoice, INVALID],
    by_field("type", get_args(_AnthropicToolChoiceType)),
]


@lenient
class _ThinkingBudget(TypedDict, total=False):
    budget_tokens: Required[Annotated[int, Field(ge=1)]]
    display: Literal["summarized", "omitted"] | None


@lenient
class _ThinkingDisplay(TypedDict, total=False):
    display: Literal["summarized", "omitted"] | None


@lenient
class _TagOnly(TypedDict):
    """An object with nothing to check beyond its tag."""


_ThinkingType: TypeAlias = Literal["enabled", "disabled", "adaptive", "between_tools"]


@lenient
class _AnyThinking(TypedDict):
    type: _ThinkingType


_Thinking: TypeAlias = Annotated[
    Annotated[_ThinkingBudget, Tag("<enabled>")]
    | Annotated[_TagOnly, Tag("<disabled>")]
    | Annotated[_ThinkingDisplay, Tag("<adaptive>")]
    | Annotated[_TagOnly, Tag("<between_tools>")]
    | Annotated[_AnyThinking, INVALID],
    by_field("type", get_args(_ThinkingType)),
]


class _MessagesFields(TypedDict, total=False):
    """Anthropic's fields: those of its Python SDK, and the sampling ones its API documents."""

    model: Required[Model]
    messages: Required[Annotated[list[_AnthropicMessage], Field(min_length=1)]]
    max_tokens: Required[Annotated[int, Field(ge=1)]]
    cache_control: Object
    container: (
        Annotated[
            Annotated[str, STRING] | Annotated[dict[str, Any], OBJECT],
            either("a string or an object"),
        ]
        | None
    )
    diagnostics: Object
    inference_geo: Str
    metadata: _AnthropicMetadata
    output_config: dict[str, Any]
    service_tier: Literal["auto", "standard_only"]
    speed: Literal["standard", "fast"] | None
    stop_sequences: list[str]
    stream: bool
    system: Annotated[
        Annotated[str, STRING] | Annotated[list[_TextBlock], ARRAY],
        either("a string or an array of text blocks"),
    ]
    temperature: Annotated[float, Field(ge=0, le=1)]
    thinking: _Thinking
    tool_choice: _AnthropicToolChoice
    tools: list[_NamedTool]
    top_k: Annotated[int, Field(ge=0)]
    top_p: Annotated[float, Field(ge=0, le=1)]
    user_profile_id: str
    workspace_id: str


@top_level
class MessagesRequest(_MessagesFields, total=False):
    """POST /v1/messages"""


def check_messages(body: Mapping[str, Any]) -> None:
    thinking = body.get("thinking", {})
    if thinking.get("type") == "enabled" and thinking["budget_tokens"] >= body["max_tokens"]:
        raise invalid("thinking.budget_tokens", "Input should be less than max_tokens")
