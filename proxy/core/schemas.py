"""Request-body validation for the OpenAI routes, so a malformed request never costs a backend.

Validation only checks: the gateway forwards the client's original body, so nothing here may
rewrite it or add defaults. The top level is strict, as OpenAI is, so a misspelt parameter is
reported instead of silently ignored. Chat messages are strict too (`_MESSAGE_KEYS`); other nested
objects tolerate unknown keys, because OpenAI SDKs and vLLM add fields there faster than a gateway
is updated. Types are strict JSON types: `"1"`
is not a number and `1.0` is not an integer.

Unions pick their branch up front (by JSON type or by a tag field such as `role`), so a bad value
yields one error from the branch the client meant rather than one per branch. Pydantic puts the
branch tag into error locations; tags are written `<like-this>` so `_param` can drop them.
"""

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NotRequired, Required, TypeAlias, get_args

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict

from proxy.errors import ApiError

_CONFIG = ConfigDict(strict=True, allow_inf_nan=False)
_top_level = with_config(ConfigDict(**_CONFIG, extra="forbid"))
_lenient = with_config(ConfigDict(**_CONFIG, extra="ignore"))

_MAX_ECHO = 40
"""How much of a client-chosen key an error message may repeat."""

_KIND_TAGS = {
    str: "<string>",
    list: "<array>",
    dict: "<object>",
    int: "<integer>",
    float: "<number>",
}
_STRING, _ARRAY, _OBJECT, _INTEGER, _NUMBER = (Tag(tag) for tag in _KIND_TAGS.values())


def _json_kind(value: Any) -> str | None:
    return _KIND_TAGS.get(type(value))


def _first_item_kind(value: Any) -> str | None:
    """Tell token-id arrays from string arrays; an empty array goes to a branch that rejects it."""
    return _json_kind(value[0]) if value else "<string>"


def _either(expected: str, kind: Callable[[Any], str | None] = _json_kind) -> Discriminator:
    return Discriminator(
        kind, custom_error_type="invalid_type", custom_error_message=f"Input should be {expected}"
    )


def _by_field(field: str, choices: tuple[str, ...]) -> Discriminator:
    """Route an object by its tag field; anything else goes to the `<invalid>` branch, which
    checks only that field, so the error names it."""
    tags = {choice: f"<{choice}>" for choice in choices}

    def pick(value: Any) -> str:
        tag = value.get(field) if isinstance(value, dict) else None
        return tags.get(tag, "<invalid>") if isinstance(tag, str) else "<invalid>"

    return Discriminator(pick)


_INVALID = Tag("<invalid>")

_Bool: TypeAlias = bool | None
_Str: TypeAlias = str | None
_Object: TypeAlias = dict[str, Any] | None
_Count: TypeAlias = Annotated[int, Field(ge=1)] | None
_Int64: TypeAlias = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None
_TokenId: TypeAlias = Annotated[int, Field(ge=0)]
_Text: TypeAlias = Annotated[str, Field(min_length=1)]
_Model: TypeAlias = _Text
_Penalty: TypeAlias = Annotated[float, Field(ge=-2, le=2)] | None
_Temperature: TypeAlias = Annotated[float, Field(ge=0, le=2)] | None
_Probability: TypeAlias = Annotated[float, Field(ge=0, le=1)] | None
_FunctionName: TypeAlias = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Stop: TypeAlias = (
    Annotated[
        Annotated[str, _STRING] | Annotated[list[str], Field(max_length=4), _ARRAY],
        _either("a string or an array of at most 4 strings"),
    ]
    | None
)
_LogitBias: TypeAlias = (
    dict[
        Annotated[str, Field(pattern=r"^[0-9]+$")],
        Annotated[float, Field(ge=-100, le=100)],
    ]
    | None
)
_Truncation: TypeAlias = Annotated[int, Field(ge=-1)] | None
"""-1 asks vLLM for the model's own limit; 0 is refused in `_check_common`."""


# Chat messages


@_lenient
class _ImageUrl(TypedDict, total=False):
    url: Required[str]
    detail: Literal["auto", "low", "high"] | None


@_lenient
class _MediaUrl(TypedDict, total=False):
    url: Required[str]


@_lenient
class _InputAudio(TypedDict, total=False):
    data: Required[str]
    format: Required[str]


@_lenient
class _File(TypedDict, total=False):
    file_data: _Str
    file_id: _Str
    filename: _Str


@_lenient
class _TextPart(TypedDict):
    text: str


@_lenient
class _ImagePart(TypedDict):
    image_url: _ImageUrl


@_lenient
class _InputAudioPart(TypedDict):
    input_audio: _InputAudio


@_lenient
class _FilePart(TypedDict):
    file: _File


@_lenient
class _RefusalPart(TypedDict):
    refusal: str


@_lenient
class _AudioUrlPart(TypedDict):
    audio_url: _MediaUrl


@_lenient
class _VideoUrlPart(TypedDict):
    video_url: _MediaUrl


@_lenient
class _ImageEmbedsPart(TypedDict, total=False):
    image_embeds: (
        Annotated[
            Annotated[str, _STRING] | Annotated[dict[str, str], _OBJECT],
            _either("a string or an object of strings"),
        ]
        | None
    )


_PartType: TypeAlias = Literal[
    "text", "image_url", "input_audio", "file", "refusal", "audio_url", "video_url", "image_embeds"
]
"""OpenAI's content parts, then the ones vLLM adds for its multi-modal models."""


@_lenient
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
    | Annotated[_AnyPart, _INVALID],
    _by_field("type", get_args(_PartType)),
]
_Content: TypeAlias = Annotated[
    Annotated[str, _STRING] | Annotated[list[_Part], _ARRAY],
    _either("a string or an array of content parts"),
]


@_lenient
class _FunctionCall(TypedDict):
    name: str
    arguments: str


@_lenient
class _ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: _FunctionCall


@_lenient
class _AssistantAudio(TypedDict):
    id: str


@_lenient
class _PlainMessage(TypedDict, total=False):
    content: Required[_Content]
    name: _Str


@_lenient
class _AssistantMessage(TypedDict, total=False):
    content: _Content | None
    name: _Str
    refusal: _Str
    tool_calls: list[_ToolCall] | None
    function_call: _FunctionCall | None
    audio: _AssistantAudio | None


@_lenient
class _ToolMessage(TypedDict):
    content: _Content
    tool_call_id: str


@_lenient
class _FunctionMessage(TypedDict):
    content: str | None
    name: str


_Role: TypeAlias = Literal["system", "developer", "user", "assistant", "tool", "function"]


@_lenient
class _AnyMessage(TypedDict):
    role: _Role


_Message: TypeAlias = Annotated[
    Annotated[_PlainMessage, Tag("<system>")]
    | Annotated[_PlainMessage, Tag("<developer>")]
    | Annotated[_PlainMessage, Tag("<user>")]
    | Annotated[_AssistantMessage, Tag("<assistant>")]
    | Annotated[_ToolMessage, Tag("<tool>")]
    | Annotated[_FunctionMessage, Tag("<function>")]
    | Annotated[_AnyMessage, _INVALID],
    _by_field("role", get_args(_Role)),
]


# Tools, output formats and other nested chat options


@_lenient
class _FunctionDefinition(TypedDict, total=False):
    name: Required[_FunctionName]
    description: _Str
    parameters: _Object
    strict: _Bool


@_lenient
class _Tool(TypedDict):
    type: Literal["function"]
    function: _FunctionDefinition


@_lenient
class _NamedFunction(TypedDict):
    name: str


@_lenient
class _NamedToolChoice(TypedDict):
    type: Literal["function"]
    function: _NamedFunction


_ToolChoiceMode: TypeAlias = Literal["none", "auto", "required"]


@_lenient
class _JsonSchema(TypedDict, total=False):
    name: Required[str]
    description: _Str
    schema: _Object
    strict: _Bool


@_lenient
class _JsonSchemaFormat(TypedDict):
    json_schema: _JsonSchema


@_lenient
class _PlainFormat(TypedDict):
    """A format with nothing to check beyond its type."""


_FormatType: TypeAlias = Literal["text", "json_object", "json_schema", "structural_tag"]
"""OpenAI's formats, then vLLM's `structural_tag`, whose body vLLM checks itself."""


@_lenient
class _AnyFormat(TypedDict):
    type: _FormatType


_ResponseFormat: TypeAlias = (
    Annotated[
        Annotated[_PlainFormat, Tag("<text>")]
        | Annotated[_PlainFormat, Tag("<json_object>")]
        | Annotated[_JsonSchemaFormat, Tag("<json_schema>")]
        | Annotated[_PlainFormat, Tag("<structural_tag>")]
        | Annotated[_AnyFormat, _INVALID],
        _by_field("type", get_args(_FormatType)),
    ]
    | None
)


@_lenient
class _StreamOptions(TypedDict, total=False):
    include_usage: _Bool
    include_obfuscation: _Bool
    continuous_usage_stats: _Bool


@_lenient
class _Audio(TypedDict):
    voice: Annotated[
        Annotated[str, _STRING] | Annotated[dict[str, Any], _OBJECT],
        _either("a string or an object"),
    ]
    format: str


@_lenient
class _Prediction(TypedDict):
    type: Literal["content"]
    content: _Content


@_lenient
class _WebSearchOptions(TypedDict, total=False):
    search_context_size: Literal["low", "medium", "high"] | None
    user_location: _Object


# Fields shared by several routes


class _Generation(TypedDict, total=False):
    """OpenAI's sampling and streaming options, common to chat and legacy completions."""

    frequency_penalty: _Penalty
    logit_bias: _LogitBias
    max_tokens: _Count
    n: Annotated[int, Field(ge=1, le=128)] | None
    presence_penalty: _Penalty
    seed: _Int64
    stop: _Stop
    stream: _Bool
    stream_options: _StreamOptions | None
    temperature: _Temperature
    top_p: _Probability
    user: _Str


_Scalar: TypeAlias = Annotated[
    Annotated[str, _STRING] | Annotated[int, _INTEGER] | Annotated[float, _NUMBER],
    _either("a string or a number"),
]
_ExtraArg: TypeAlias = Annotated[
    Annotated[str, _STRING]
    | Annotated[int, _INTEGER]
    | Annotated[float, _NUMBER]
    | Annotated[list[_Scalar], _ARRAY],
    _either("a string, a number or an array of those"),
]


class _VllmSampling(TypedDict, total=False):
    """Engine options vLLM backends accept on both generation routes."""

    top_k: Annotated[int, Field(ge=-1)] | None
    min_p: _Probability
    repetition_penalty: Annotated[float, Field(gt=0)] | None
    length_penalty: float | None
    min_tokens: Annotated[int, Field(ge=0)] | None
    ignore_eos: _Bool
    skip_special_tokens: _Bool
    spaces_between_special_tokens: _Bool
    include_stop_str_in_output: _Bool
    stop_token_ids: list[_TokenId] | None
    bad_words: list[str] | None
    use_beam_search: _Bool
    truncate_prompt_tokens: _Truncation
    prompt_logprobs: Annotated[int, Field(ge=-1)] | None
    allowed_token_ids: list[_TokenId] | None
    add_special_tokens: _Bool
    guided_json: (
        Annotated[
            Annotated[str, _STRING] | Annotated[dict[str, Any], _OBJECT],
            _either("a string or an object"),
        ]
        | None
    )
    guided_regex: _Str
    guided_choice: list[str] | None
    guided_grammar: _Str
    guided_decoding_backend: _Str
    guided_whitespace_pattern: _Str
    structured_outputs: _Object
    priority: _Int64
    request_id: _Str
    return_tokens_as_token_ids: _Bool
    logits_processors: (
        list[
            Annotated[
                Annotated[str, _STRING] | Annotated[dict[str, Any], _OBJECT],
                _either("a string or an object"),
            ]
        ]
        | None
    )
    cache_salt: Annotated[str, Field(min_length=1)] | None
    kv_transfer_params: _Object
    vllm_xargs: dict[str, _ExtraArg] | None


# Routes


class _ChatFields(TypedDict, total=False):
    model: Required[_Model]
    messages: Required[Annotated[list[_Message], Field(min_length=1)]]
    audio: _Audio | None
    function_call: (
        Annotated[
            Annotated[Literal["none", "auto"], _STRING] | Annotated[_NamedFunction, _OBJECT],
            _either("'none', 'auto' or an object naming a function"),
        ]
        | None
    )
    functions: Annotated[list[_FunctionDefinition], Field(max_length=128)] | None
    logprobs: _Bool
    max_completion_tokens: _Count
    metadata: dict[str, str] | None
    modalities: list[Literal["text", "audio"]] | None
    parallel_tool_calls: _Bool
    prediction: _Prediction | None
    prompt_cache_key: _Str
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None
    response_format: _ResponseFormat
    safety_identifier: _Str
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None
    store: _Bool
    tool_choice: (
        Annotated[
            Annotated[_ToolChoiceMode, _STRING] | Annotated[_NamedToolChoice, _OBJECT],
            _either("'none', 'auto', 'required' or an object naming a function"),
        ]
        | None
    )
    tools: Annotated[list[_Tool], Field(max_length=128)] | None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None
    verbosity: Literal["low", "medium", "high"] | None
    web_search_options: _WebSearchOptions | None


class _VllmChatExtras(_VllmSampling, total=False):
    """Fields vLLM backends accept on chat/completions beyond OpenAI's."""

    echo: _Bool
    chat_template: _Str
    chat_template_kwargs: _Object
    add_generation_prompt: _Bool
    continue_final_message: _Bool
    documents: list[dict[str, str]] | None
    mm_processor_kwargs: _Object


@_top_level
class _ChatRequest(_ChatFields, _Generation, _VllmChatExtras, total=False):
    """POST /v1/chat/completions"""


_TokenIds: TypeAlias = Annotated[list[_TokenId], Field(min_length=1)]
_ARRAY_KINDS = "an array of strings, of token ids or of token-id arrays"
_PromptArray: TypeAlias = Annotated[
    Annotated[list[str], Field(min_length=1), _STRING]
    | Annotated[_TokenIds, _INTEGER]
    | Annotated[list[_TokenIds], Field(min_length=1), _ARRAY],
    _either(_ARRAY_KINDS, _first_item_kind),
]


class _CompletionFields(TypedDict, total=False):
    model: Required[_Model]
    prompt: Required[
        Annotated[
            Annotated[_Text, _STRING] | Annotated[_PromptArray, _ARRAY],
            _either("a string or an array"),
        ]
    ]
    best_of: Annotated[int, Field(ge=1, le=20)] | None
    echo: _Bool
    logprobs: Annotated[int, Field(ge=0, le=5)] | None
    suffix: _Str


class _VllmCompletionExtras(_VllmSampling, total=False):
    """Fields vLLM backends accept on completions beyond OpenAI's."""

    response_format: _ResponseFormat


@_top_level
class _CompletionRequest(_CompletionFields, _Generation, _VllmCompletionExtras, total=False):
    """POST /v1/completions"""


_InputArray: TypeAlias = Annotated[
    Annotated[list[_Text], Field(min_length=1, max_length=2048), _STRING]
    | Annotated[_TokenIds, _INTEGER]
    | Annotated[list[_TokenIds], Field(min_length=1, max_length=2048), _ARRAY],
    _either(_ARRAY_KINDS, _first_item_kind),
]


class _EmbeddingFields(TypedDict, total=False):
    model: Required[_Model]
    input: Required[
        Annotated[
            Annotated[_Text, _STRING] | Annotated[_InputArray, _ARRAY],
            _either("a string or an array"),
        ]
    ]
    dimensions: _Count
    encoding_format: Literal["float", "base64"] | None
    user: _Str


class _VllmEmbeddingExtras(TypedDict, total=False):
    """Fields vLLM backends accept on embeddings beyond OpenAI's."""

    truncate_prompt_tokens: _Truncation
    add_special_tokens: _Bool
    priority: _Int64
    additional_data: Any
    normalize: _Bool


@_top_level
class _EmbeddingRequest(_EmbeddingFields, _VllmEmbeddingExtras, total=False):
    """POST /v1/embeddings"""


# The Responses API


@_lenient
class _Typed(TypedDict):
    """An object of one of many kinds that backends check themselves; here only its tag is."""

    type: str


_ResponsesContent: TypeAlias = Annotated[
    Annotated[str, _STRING] | Annotated[list[_Typed], _ARRAY],
    _either("a string or an array of content parts"),
]


@_lenient
class _InputMessage(TypedDict, total=False):
    role: Required[Literal["user", "assistant", "system", "developer"]]
    content: Required[_ResponsesContent]
    type: Literal["message"]


def _input_item_kind(value: Any) -> str:
    """A message may leave out its `type`; every other input item names its kind in `type`."""
    return "<message>" if isinstance(value, dict) and "role" in value else "<item>"


_InputItem: TypeAlias = Annotated[
    Annotated[_InputMessage, Tag("<message>")] | Annotated[_Typed, Tag("<item>")],
    Discriminator(_input_item_kind),
]


@_lenient
class _Reasoning(TypedDict, total=False):
    effort: _Str
    summary: _Str
    generate_summary: _Str


@_lenient
class _TextConfig(TypedDict, total=False):
    format: _Typed | None
    verbosity: Literal["low", "medium", "high"] | None


@_lenient
class _PromptTemplate(TypedDict, total=False):
    id: Required[str]
    variables: _Object
    version: _Str


@_lenient
class _ConversationRef(TypedDict):
    id: str


@_lenient
class _ResponsesStreamOptions(TypedDict, total=False):
    include_obfuscation: _Bool


class _ResponsesFields(TypedDict, total=False):
    """OpenAI's fields, as its Python SDK sends them."""

    model: Required[_Model]
    input: Required[
        Annotated[
            Annotated[_Text, _STRING] | Annotated[list[_InputItem], Field(min_length=1), _ARRAY],
            _either("a string or an array of input items"),
        ]
    ]
    access_programs: _Object
    background: _Bool
    background_options: _Object
    context_management: list[_Typed] | None
    conversation: (
        Annotated[
            Annotated[str, _STRING] | Annotated[_ConversationRef, _OBJECT],
            _either("a string or an object with an id"),
        ]
        | None
    )
    image: _Object
    include: list[str] | None
    instructions: _Str
    max_output_tokens: _Count
    max_tool_calls: _Count
    metadata: dict[str, str] | None
    moderation: _Object
    parallel_tool_calls: _Bool
    previous_response_id: _Str
    prompt: _PromptTemplate | None
    prompt_cache_key: _Str
    prompt_cache_options: _Object
    prompt_cache_retention: Literal["in_memory", "24h"] | None
    reasoning: _Reasoning | None
    safety_identifier: _Str
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None
    store: _Bool
    stream: _Bool
    stream_options: _ResponsesStreamOptions | None
    temperature: _Temperature
    text: _TextConfig | None
    tool_choice: (
        Annotated[
            Annotated[_ToolChoiceMode, _STRING] | Annotated[_Typed, _OBJECT],
            _either("'none', 'auto', 'required' or an object naming a tool"),
        ]
        | None
    )
    tools: list[_Typed] | None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None
    top_p: _Probability
    truncation: Literal["auto", "disabled"] | None
    user: _Str


class _VllmResponsesExtras(TypedDict, total=False):
    """Fields vLLM backends accept on responses beyond OpenAI's."""

    cache_salt: Annotated[str, Field(min_length=1)] | None
    chat_template_kwargs: _Object
    enable_response_messages: _Bool
    frequency_penalty: _Penalty
    ignore_eos: _Bool
    include_reasoning: _Bool
    include_stop_str_in_output: _Bool
    kv_transfer_params: _Object
    logit_bias: _LogitBias
    mm_processor_kwargs: _Object
    presence_penalty: _Penalty
    previous_input_messages: list[dict[str, Any]] | None
    priority: _Int64
    repetition_penalty: Annotated[float, Field(gt=0)] | None
    request_id: _Str
    seed: _Int64
    skip_special_tokens: _Bool
    stop: _Stop
    structured_outputs: _Object
    top_k: Annotated[int, Field(ge=-1)] | None
    vllm_xargs: dict[str, _ExtraArg] | None


@_top_level
class _ResponsesRequest(_ResponsesFields, _VllmResponsesExtras, total=False):
    """POST /v1/responses"""


# Anthropic's Messages API: its fields may not be null unless its SDK says so.


_Blocks: TypeAlias = Annotated[
    Annotated[str, _STRING] | Annotated[list[_Typed], _ARRAY],
    _either("a string or an array of content blocks"),
]


@_lenient
class _AnthropicMessage(TypedDict):
    role: Literal["user", "assistant", "system"]
    content: _Blocks


@_lenient
class _TextBlock(TypedDict):
    type: Literal["text"]
    text: str


@_lenient
class _AnthropicMetadata(TypedDict, total=False):
    user_id: _Str


@_lenient
class _NamedTool(TypedDict):
    """Every Anthropic tool has a name, whatever its type."""

    name: str


@_lenient
class _ToolMode(TypedDict, total=False):
    disable_parallel_tool_use: bool


@_lenient
class _ChosenTool(TypedDict, total=False):
    name: Required[str]
    disable_parallel_tool_use: bool


_AnthropicToolChoiceType: TypeAlias = Literal["auto", "any", "tool", "none"]


@_lenient
class _AnyAnthropicToolChoice(TypedDict):
    type: _AnthropicToolChoiceType


_AnthropicToolChoice: TypeAlias = Annotated[
    Annotated[_ToolMode, Tag("<auto>")]
    | Annotated[_ToolMode, Tag("<any>")]
    | Annotated[_ChosenTool, Tag("<tool>")]
    | Annotated[_ToolMode, Tag("<none>")]
    | Annotated[_AnyAnthropicToolChoice, _INVALID],
    _by_field("type", get_args(_AnthropicToolChoiceType)),
]


@_lenient
class _ThinkingBudget(TypedDict, total=False):
    budget_tokens: Required[Annotated[int, Field(ge=1)]]
    display: Literal["summarized", "omitted"] | None


@_lenient
class _ThinkingDisplay(TypedDict, total=False):
    display: Literal["summarized", "omitted"] | None


@_lenient
class _TagOnly(TypedDict):
    """An object with nothing to check beyond its tag."""


_ThinkingType: TypeAlias = Literal["enabled", "disabled", "adaptive", "between_tools"]


@_lenient
class _AnyThinking(TypedDict):
    type: _ThinkingType


_Thinking: TypeAlias = Annotated[
    Annotated[_ThinkingBudget, Tag("<enabled>")]
    | Annotated[_TagOnly, Tag("<disabled>")]
    | Annotated[_ThinkingDisplay, Tag("<adaptive>")]
    | Annotated[_TagOnly, Tag("<between_tools>")]
    | Annotated[_AnyThinking, _INVALID],
    _by_field("type", get_args(_ThinkingType)),
]


class _MessagesFields(TypedDict, total=False):
    """Anthropic's fields: those of its Python SDK, and the sampling ones its API documents."""

    model: Required[_Model]
    messages: Required[Annotated[list[_AnthropicMessage], Field(min_length=1)]]
    max_tokens: Required[Annotated[int, Field(ge=1)]]
    cache_control: _Object
    container: (
        Annotated[
            Annotated[str, _STRING] | Annotated[dict[str, Any], _OBJECT],
            _either("a string or an object"),
        ]
        | None
    )
    diagnostics: _Object
    inference_geo: _Str
    metadata: _AnthropicMetadata
    output_config: dict[str, Any]
    service_tier: Literal["auto", "standard_only"]
    speed: Literal["standard", "fast"] | None
    stop_sequences: list[str]
    stream: bool
    system: Annotated[
        Annotated[str, _STRING] | Annotated[list[_TextBlock], _ARRAY],
        _either("a string or an array of text blocks"),
    ]
    temperature: Annotated[float, Field(ge=0, le=1)]
    thinking: _Thinking
    tool_choice: _AnthropicToolChoice
    tools: list[_NamedTool]
    top_k: Annotated[int, Field(ge=0)]
    top_p: Annotated[float, Field(ge=0, le=1)]
    user_profile_id: str
    workspace_id: str


@_top_level
class _MessagesRequest(_MessagesFields, total=False):
    """POST /v1/messages"""


_Path: TypeAlias = Annotated[str, Field(min_length=1, max_length=4096)]


@_top_level
class _BatchRequest(TypedDict):
    """POST /{cluster}/{framework}/v1/batches, as the existing gateway takes it: files on the
    cluster's file system, not OpenAI's uploaded-file batches."""

    input_file: _Path
    model: _Model
    output_folder_path: NotRequired[_Path | None]


# Checks across fields


def _check_common(body: Mapping[str, Any]) -> None:
    if body.get("truncate_prompt_tokens") == 0:
        raise _invalid("truncate_prompt_tokens", "Input should be -1 or at least 1")


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


def _check_message_keys(body: Mapping[str, Any]) -> None:
    """Runs before the types are checked: a misspelt key usually explains a missing one."""
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(message, dict):
            continue
        unknown = sorted(key for key in message if key not in _MESSAGE_KEYS)
        if unknown:
            param = f"messages.{index}.{_clip(unknown[0])}"
            raise ApiError(
                400, f"Unrecognized message key supplied: {param}", param=param, code="unknown_parameter"
            )


def _check_chat(body: Mapping[str, Any]) -> None:
    _check_common(body)
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        raise _invalid("top_logprobs", "Only allowed when logprobs is true")


def _check_completion(body: Mapping[str, Any]) -> None:
    _check_common(body)
    best_of, n = body.get("best_of"), body.get("n")
    if best_of is not None and n is not None and best_of < n:
        raise _invalid("best_of", "Input should be greater than or equal to n")


def _check_messages(body: Mapping[str, Any]) -> None:
    thinking = body.get("thinking", {})
    if thinking.get("type") == "enabled" and thinking["budget_tokens"] >= body["max_tokens"]:
        raise _invalid("thinking.budget_tokens", "Input should be less than max_tokens")


_ROUTES: dict[str, tuple[TypeAdapter[Any], Callable[[Mapping[str, Any]], None]]] = {
    "chat/completions": (TypeAdapter(_ChatRequest), _check_chat),
    "completions": (TypeAdapter(_CompletionRequest), _check_completion),
    "embeddings": (TypeAdapter(_EmbeddingRequest), _check_common),
    "responses": (TypeAdapter(_ResponsesRequest), lambda _: None),
    "messages": (TypeAdapter(_MessagesRequest), _check_messages),
    "batches": (TypeAdapter(_BatchRequest), lambda _: None),
}


_KEY_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {"chat/completions": _check_message_keys}


def validate_request(openai_path: str, body: object) -> None:
    """Raise the 400 `ApiError` OpenAI would answer for this body; return if it is acceptable."""
    if openai_path not in _ROUTES:
        raise ValueError(f"no request schema for {openai_path!r}")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_body")
    adapter, check = _ROUTES[openai_path]
    if openai_path in _KEY_CHECKS:
        _KEY_CHECKS[openai_path](body)
    try:
        adapter.validate_python(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    check(body)


def _first_error(exc: ValidationError) -> ApiError:
    """Report a misspelt parameter ahead of anything else: it usually explains the rest."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])
    if first["type"] == "extra_forbidden":
        name = _clip(str(first["loc"][0]))
        message = f"Unrecognized request argument supplied: {name}"
        return ApiError(400, message, param=name, code="unknown_parameter")
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return _invalid(_param(first["loc"]), first["msg"], code)


def _param(loc: tuple[int | str, ...]) -> str:
    parts = (str(part) for part in loc)
    return ".".join(_clip(part) for part in parts if not _is_tag(part))


def _is_tag(part: str) -> bool:
    return part == "[key]" or (part.startswith("<") and part.endswith(">"))


def _clip(part: str) -> str:
    return part if len(part) <= _MAX_ECHO else part[:_MAX_ECHO] + "…"


def _invalid(param: str, problem: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {problem}", param=param, code=code)
