"""Request validation against a corpus of realistic bodies, plus properties over arbitrary JSON."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.schemas import validate_request
from proxy.errors import ApiError

CORPUS = Path(__file__).parent / "corpus"
ROUTES = {
    "chat/completions": "chat_completions.json",
    "completions": "completions.json",
    "embeddings": "embeddings.json",
}


def load(route: str) -> dict[str, list[Any]]:
    corpus: dict[str, list[Any]] = json.loads((CORPUS / ROUTES[route]).read_text(encoding="utf-8"))
    return corpus


VALID = [(route, body) for route in ROUTES for body in load(route)["valid"]]
INVALID = [(route, case) for route in ROUTES for case in load(route)["invalid"]]
VALID_IDS = [f"{route}:{index}" for index, (route, _) in enumerate(VALID)]
INVALID_IDS = [f"{route}:{case['why']}" for route, case in INVALID]


@pytest.mark.parametrize("route, body", VALID, ids=VALID_IDS)
def test_valid_body_passes_unchanged(route: str, body: dict[str, Any]) -> None:
    original = copy.deepcopy(body)
    validate_request(route, body)
    assert body == original


@pytest.mark.parametrize("route, case", INVALID, ids=INVALID_IDS)
def test_invalid_body_is_rejected(route: str, case: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as raised:
        validate_request(route, case["body"])
    assert raised.value.status == 400
    assert raised.value.param == case["param"]
    assert "\n" not in raised.value.message


@pytest.mark.parametrize("route", ROUTES)
def test_corpus_is_big_enough_and_safe_to_replay(route: str) -> None:
    corpus = load(route)
    assert len(corpus["valid"]) >= 12
    assert len(corpus["invalid"]) >= 22
    for body in corpus["valid"]:
        assert isinstance(body["model"], str)
        assert body.get("stream") is not True


def rejection(route: str, body: object) -> ApiError:
    with pytest.raises(ApiError) as raised:
        validate_request(route, body)
    return raised.value


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}


def test_error_codes() -> None:
    assert rejection("chat/completions", []).code == "invalid_body"
    assert rejection("chat/completions", chat(foo=1)).code == "unknown_parameter"
    assert rejection("chat/completions", {"model": "m"}).code == "missing_required_parameter"
    assert rejection("chat/completions", chat(n=0)).code == "invalid_value"


def test_messages_name_the_field_and_the_problem() -> None:
    error = rejection("chat/completions", chat(temperature=2.5))
    assert error.message == "temperature: Input should be less than or equal to 2"
    error = rejection("chat/completions", chat(foo=1))
    assert error.message == "Unrecognized request argument supplied: foo"
    assert rejection("embeddings", "x").message == "The request body must be a JSON object."


def test_non_finite_numbers_are_rejected() -> None:
    assert rejection("chat/completions", chat(temperature=float("nan"))).param == "temperature"
    infinite = chat(length_penalty=float("inf"))
    assert rejection("chat/completions", infinite).param == "length_penalty"


def test_a_misspelt_parameter_is_reported_first() -> None:
    error = rejection("chat/completions", {"model": "m", "mesages": [], "temperature": 9})
    assert error.param == "mesages"


def test_unknown_route_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        validate_request("audio/speech", {"model": "m"})


HUGE = "Q" * 100_000
HUGE_BODIES = [
    ("chat/completions", {**chat(), HUGE: 1}),
    ("chat/completions", chat(messages=[{"role": HUGE, "content": "x"}])),
    ("chat/completions", chat(messages=[{"role": "user", "content": [{"type": HUGE}]}])),
    ("chat/completions", chat(metadata={HUGE: 1})),
    ("chat/completions", chat(logit_bias={HUGE: 1})),
    ("chat/completions", chat(tool_choice=HUGE)),
    ("chat/completions", chat(tools=[{"type": "function", "function": {"name": HUGE}}])),
    ("completions", {"model": "m", "prompt": "x", "vllm_xargs": {HUGE: {}}}),
    ("completions", {"model": HUGE, "prompt": [HUGE, 1]}),
    ("embeddings", {"model": "m", "input": "x", "encoding_format": HUGE}),
    ("embeddings", {"model": "m", "input": [HUGE] * 2049}),
]


@pytest.mark.parametrize("route, body", HUGE_BODIES)
def test_errors_do_not_echo_huge_input(route: str, body: object) -> None:
    error = rejection(route, body)
    assert error.message.count("Q") <= 200
    assert len(error.message) <= 400
    assert error.param is None or len(error.param) <= 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
FIELD_NAMES = sorted({key for _, body in VALID for key in body})


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document where a value could be swapped for another."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            found += paths(item, (*prefix, index))
    return found


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copied = copy.copy(document)
    copied[path[0]] = replaced(document[path[0]], path[1:], value)
    return copied


def accepts_or_rejects_with_400(route: str, body: object) -> None:
    try:
        validate_request(route, body)
    except ApiError as error:
        assert error.status == 400
        assert error.message
        assert error.code in {
            "invalid_body",
            "unknown_parameter",
            "invalid_value",
            "missing_required_parameter",
        }


@settings(max_examples=300, deadline=None)
@given(route=st.sampled_from(list(ROUTES)), body=json_values)
def test_any_json_value_passes_or_is_a_400(route: str, body: object) -> None:
    accepts_or_rejects_with_400(route, body)


@settings(max_examples=300, deadline=None)
@given(
    case=st.sampled_from(VALID),
    key=st.sampled_from(FIELD_NAMES) | st.text(max_size=12),
    value=json_values,
)
def test_valid_body_with_a_field_added_or_changed(
    case: tuple[str, dict[str, Any]], key: str, value: Any
) -> None:
    route, body = case
    accepts_or_rejects_with_400(route, {**body, key: value})


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(VALID), data=st.data(), value=json_values)
def test_valid_body_with_a_nested_value_changed(
    case: tuple[str, dict[str, Any]], data: st.DataObject, value: Any
) -> None:
    route, body = case
    path = data.draw(st.sampled_from(paths(body)))
    accepts_or_rejects_with_400(route, replaced(body, path, value))


def test_a_message_with_an_unknown_key_is_refused_naming_it() -> None:
    body = chat(messages=[{"role": "user", "content": "x"}, {"role": "user", "contents": "y"}])
    error = rejection("chat/completions", body)
    assert (error.status, error.code, error.param) == (400, "unknown_parameter", "messages.1.contents")
    assert error.message == "Unrecognized message key supplied: messages.1.contents"


def test_message_keys_of_openai_and_vllm_are_accepted() -> None:
    assistant = {
        "role": "assistant",
        "content": None,
        "reasoning_content": "thought",
        "reasoning": "thought",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    tool = {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}
    developer = {"role": "developer", "content": "be brief", "name": "ops", "tools": []}
    validate_request("chat/completions", chat(messages=[developer, assistant, tool]))


def test_nested_objects_other_than_messages_still_tolerate_unknown_keys() -> None:
    part = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    validate_request("chat/completions", chat(messages=[{"role": "user", "content": [part]}]))
