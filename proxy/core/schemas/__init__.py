"""Request-body validation for the OpenAI routes, so a malformed request never costs a backend.

Validation only checks: the gateway forwards the client's original body, so nothing here may
rewrite it or add defaults. The top level is strict, as OpenAI is, so a misspelt parameter is
reported instead of silently ignored. Chat messages are strict too (see `chat_completions`); other
nested objects tolerate unknown keys, because OpenAI SDKs and vLLM add fields there faster than a
gateway is updated. Types are strict JSON types: `"1"` is not a number and `1.0` is not an integer.

Unions pick their branch up front (by JSON type or by a tag field such as `role`), so a bad value
yields one error from the branch the client meant rather than one per branch. Pydantic puts the
branch tag into error locations; tags are written `<like-this>` so `_param` can drop them.

One module per API family, each built from the parts in `common`; `validate_request` below is the
one entry point, so a route never needs to know which module holds its schema.
"""

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from proxy.core.schemas.batches import BatchRequest
from proxy.core.schemas.chat_completions import ChatRequest, check_chat, check_message_keys
from proxy.core.schemas.common import check_truncation, clip, invalid
from proxy.core.schemas.completions import CompletionRequest, check_completion
from proxy.core.schemas.embeddings import EmbeddingRequest
from proxy.core.schemas.messages import MessagesRequest, check_messages
from proxy.core.schemas.responses import ResponsesRequest
from proxy.errors import ApiError

__all__ = ["validate_request"]


_ROUTES: dict[str, tuple[TypeAdapter[Any], Callable[[Mapping[str, Any]], None]]] = {
    "chat/completions": (TypeAdapter(ChatRequest), check_chat),
    "completions": (TypeAdapter(CompletionRequest), check_completion),
    "embeddings": (TypeAdapter(EmbeddingRequest), check_truncation),
    "responses": (TypeAdapter(ResponsesRequest), lambda _: None),
    "messages": (TypeAdapter(MessagesRequest), check_messages),
    "batches": (TypeAdapter(BatchRequest), lambda _: None),
}


_KEY_CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {"chat/completions": check_message_keys}


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
        name = clip(str(first["loc"][0]))
        message = f"Unrecognized request argument supplied: {name}"
        return ApiError(400, message, param=name, code="unknown_parameter")
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return invalid(_param(first["loc"]), first["msg"], code)


def _param(loc: tuple[int | str, ...]) -> str:
    parts = (str(part) for part in loc)
    return ".".join(clip(part) for part in parts if not _is_tag(part))


def _is_tag(part: str) -> bool:
    return part == "[key]" or (part.startswith("<") and part.endswith(">"))
