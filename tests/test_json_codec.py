"""json_codec.loads answers exactly what `json.loads` answers, orjson or not."""

from __future__ import annotations

import json
import random
from typing import Any, NoReturn

import pytest

from proxy.core import json_codec


def _reject(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


STRICT = json.JSONDecoder(parse_constant=_reject)

TEXTS = [
    b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9llo"}]}',
    b'{"a": NaN}',
    b'{"a": -Infinity}',
    b'{"a": 1e400}',
    b'{"a": 123456789012345678}',
    b'{"a": 1234567890123456789}',
    b'{"a": -9223372036854775809}',
    b'{"a": 18446744073709551616}',
    b'{"a": "12345678901234567890"}',
    b'{"a": "\\ud800"}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": "\xff"}',
    b'\xef\xbb\xbf{"a": 1}',
    '{"a": 1}'.encode("utf-16"),
    b'{"a": 1, "a": 2}',
    b'{"a": "\x01"}',
    b'{"a": 01}',
    b'{"a": 1} x',
    b" \n[1.5e3, -0, 0.1, 4.9e-324, 1E-400, true, null] \t",
    b"",
    b"[" * 499 + b"]" * 499,
    b"[" * 990 + b"]" * 990,
    b"[" * 1020 + b"]" * 1020,
    b"[" * 5000 + b"]" * 5000,
]


def _outcome(read: Any, text: bytes | str) -> tuple[str, str]:
    try:
        return "ok", repr(read(text))
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "no-constants"])
def test_reads_as_the_standard_library_does(text: bytes, strict: bool) -> None:
    decoder = STRICT if strict else json_codec.PLAIN
    forms: list[bytes | str] = [text, text.decode("utf-8", "surrogateescape")]
    options = {"parse_constant": _reject} if strict else {}
    for form in forms:
        expected = _outcome(lambda t: json.loads(t, **options), form)
        assert _outcome(lambda t: json_codec.loads(t, decoder)[0], form) == expected


def test_random_floats_read_the_same() -> None:
    generator = random.Random(7)
    for _ in range(2000):
        number = generator.uniform(-1, 1) * 10 ** generator.randint(-320, 308)
        for text in (repr(number), f"{number:.17g}", f"{number:.5e}"):
            assert repr(json_codec.loads(text.encode())[0]) == repr(json.loads(text))


@pytest.mark.parametrize(
    "text, forwardable",
    [
        (b'{"model": "m", "n": 5}', True),
        (b'{"n": 12345678901234567890123}', False),
        (b'{"x": 1e400}', False),
        (b'{"x": "\\ud800"}', False),
        (b'\xef\xbb\xbf{"x": 1}', False),
        (b"[" * 600 + b"]" * 600, False),
    ],
)
def test_only_what_orjson_read_can_be_forwarded(text: bytes, forwardable: bool) -> None:
    assert json_codec.loads(text)[1] is forwardable
