"""What every request schema is built from: the strict JSON types, unions that pick their branch
up front, the field types several routes share, and the 400 errors a check raises."""

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import ConfigDict, Discriminator, Field, Tag, with_config
from typing_extensions import TypedDict

from proxy.errors import ApiError

__all__ = [
    "ARRAY",
    "ARRAY_KINDS",
    "INTEGER",
    "INVALID",
    "NUMBER",
    "OBJECT",
    "STRING",
    "Bool",
    "Count",
    "ExtraArg",
    "Int64",
    "LogitBias",
    "Model",
    "Object",
    "Penalty",
    "Probability",
    "Stop",
    "Str",
    "Temperature",
    "Text",
    "TokenId",
    "TokenIds",
    "ToolChoiceMode",
    "Truncation",
    "Typed",
    "by_field",
    "check_truncation",
    "clip",
    "either",
    "first_item_kind",
    "invalid",
    "lenient",
    "top_level",
]

_CONFIG = ConfigDict(strict=True, allow_inf_nan=False)
top_level = with_config(ConfigDict(**_CONFIG, extra="forbid"))
lenient = with_config(ConfigDict(**_CONFIG, extra="ignore"))

_MAX_ECHO = 40
"""How much of a client-chosen key an error message may repeat."""

_KIND_TAGS = {
    str: "<string>",
    list: "<array>",
    dict: "<object>",
    int: "<integer>",
    float: "<number>",
}
STRING, ARRAY, OBJECT, INTEGER, NUMBER = (Tag(tag) for tag in _KIND_TAGS.values())


def _json_kind(value: Any) -> str | None:
    return _KIND_TAGS.get(type(value))


def first_item_kind(value: Any) -> str | None:
    """Tell token-id arrays from string arrays; an empty array goes to a branch that rejects it."""
    return _json_kind(value[0]) if value else "<string>"


def either(expected: str, kind: Callable[[Any], str | None] = _json_kind) -> Discriminator:
    return Discriminator(
        kind, custom_error_type="invalid_type", custom_error_message=f"Input should be {expected}"
    )


def by_field(field: str, choices: tuple[str, ...]) -> Discriminator:
    """Route an object by its tag field; anything else goes to the `<invalid>` branch, which
    checks only that field, so the error names it."""
    tags = {choice: f"<{choice}>" for choice in choices}

    def pick(value: Any) -> str:
        tag = value.get(field) if isinstance(value, dict) else None
        return tags.get(tag, "<invalid>") if isinstance(tag, str) else "<invalid>"

    return Discriminator(pick)


INVALID = Tag("<invalid>")


# Field types several routes share


Bool: TypeAlias = bool | None
Str: TypeAlias = str | None
Object: TypeAlias = dict[str, Any] | None
Count: TypeAlias = Annotated[int, Field(ge=1)] | None
Int64: TypeAlias = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None
TokenId: TypeAlias = Annotated[int, Field(ge=0)]
Text: TypeAlias = Annotated[str, Field(min_length=1)]
Model: TypeAlias = Text
Penalty: TypeAlias = Annotated[float, Field(ge=-2, le=2)] | None
Temperature: TypeAlias = Annotated[float, Field(ge=0, le=2)] | None
Probability: TypeAlias = Annotated[float, Field(ge=0, le=1)] | None
Stop: TypeAlias = (
    Annotated[
        Annotated[str, STRING] | Annotated[list[str], Field(max_length=4), ARRAY],
        either("a string or an array of at most 4 strings"),
    ]
    | None
)
LogitBias: TypeAlias = (
    dict[
        Annotated[str, Field(pattern=r"^[0-9]+$")],
        Annotated[float, Field(ge=-100, le=100)],
    ]
    | None
)
Truncation: TypeAlias = Annotated[int, Field(ge=-1)] | None
"""-1 asks vLLM for the model's own limit; 0 is refused in `check_truncation`."""
ToolChoiceMode: TypeAlias = Literal["none", "auto", "required"]


_Scalar: TypeAlias = Annotated[
    Annotated[str, STRING] | Annotated[int, INTEGER] | Annotated[float, NUMBER],
    either("a string or a number"),
]
ExtraArg: TypeAlias = Annotated[
    Annotated[str, STRING]
    | Annotated[int, INTEGER]
    | Annotated[float, NUMBER]
    | Annotated[list[_Scalar], ARRAY],
    either("a string, a number or an array of those"),
]
"""A value of vLLM's `vllm_xargs`, the engine's free-form extra arguments."""


TokenIds: TypeAlias = Annotated[list[TokenId], Field(min_length=1)]
ARRAY_KINDS = "an array of strings, of token ids or of token-id arrays"
"""What a prompt or an input array may hold, on completions and embeddings."""


@lenient
class Typed(TypedDict):
    """An object of one of many kinds that backends check themselves; here only its tag is."""

    type: str


# Checks across fields


def check_truncation(body: Mapping[str, Any]) -> None:
    """`Truncation` lets 0 through for a clearer message: a prompt cut to nothing is refused here."""
    if body.get("truncate_prompt_tokens") == 0:
        raise invalid("truncate_prompt_tokens", "Input should be -1 or at least 1")


# Errors


def clip(part: str) -> str:
    return part if len(part) <= _MAX_ECHO else part[:_MAX_ECHO] + "…"


def invalid(param: str, problem: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {problem}", param=param, code=code)
