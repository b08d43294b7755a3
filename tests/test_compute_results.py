"""A Compute function's return value as the answer's text: orjson checks it, and what orjson refuses
but the standard library reads stays JSON to the gateway, as it was before orjson did the check; a
result that is a JSON string is read by orjson, exactly as the SDK's serializer reads it."""

from __future__ import annotations

import pytest

from adaptors.compute_results import UnreadableResult, as_json_text, read_result
from adaptors.compute_service import json_serializer


@pytest.mark.parametrize(
    "text",
    [
        '{"choices": [{"message": {"content": "hi"}}]}',
        '{"score": NaN, "limit": Infinity}',
        '{"id": 123456789012345678901234567890}',
        '"\\ud800"',
    ],
)
def test_a_json_string_is_passed_on_as_it_came(text: str) -> None:
    assert as_json_text(text) is text


@pytest.mark.parametrize(
    "text", ["", "{", "not json", '{"a": 1} trailing', "[" * 100_000, "[" * 100_000 + "]" * 100_000]
)
def test_a_string_that_is_not_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        as_json_text(text)


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", {"nested": [frozenset()]}])
def test_a_value_json_cannot_hold_is_a_value_error(value: object) -> None:
    """Plain data from a dill result may hold sets or bytes: the adaptors answer those with a 502."""
    with pytest.raises(ValueError, match="not JSON serializable"):
        as_json_text(value)


def test_other_values_are_encoded() -> None:
    assert as_json_text({"a": [1, 2.5, None]}) == '{"a": [1, 2.5, null]}'


@pytest.mark.parametrize(
    "value",
    ['{"choices": []}', "caf\u00e9 \u2603 \U0001f600", 'quotes " and \\ and \n', "\ud800 lone", "", "\x00"],
)
def test_a_string_result_reads_as_the_sdk_reads_it(value: str) -> None:
    serializer = json_serializer()
    payload = serializer.serialize(value)
    assert read_result(serializer, payload, accept_dill=False) == serializer.deserialize(payload) == value


@pytest.mark.parametrize("payload", ['11\n"unterminated', '11\n"text" trailing', '11\n"\x01"', '11\n"\\x"'])
def test_a_string_result_that_is_not_json_is_unreadable(payload: str) -> None:
    with pytest.raises(UnreadableResult, match="unreadable"):
        read_result(json_serializer(), payload, accept_dill=False)
