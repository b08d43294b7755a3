"""A Compute function's return value as the answer's text: orjson checks it, and what orjson refuses
but the standard library reads stays JSON to the gateway, as it was before orjson did the check."""

from __future__ import annotations

import pytest

from adaptors.compute_results import as_json_text


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


def test_other_values_are_encoded() -> None:
    assert as_json_text({"a": [1, 2.5, None]}) == '{"a": [1, 2.5, null]}'
