"""JSON read by orjson when it surely reads a text as the standard library does, else by the standard library.

orjson reads a chat body or answer in a third to a half of the time `json.loads` takes, and each
request has two such reads, its body and its answer. It does not read every text the same way:
- it refuses NaN and infinities (also numbers too large for a float), lone surrogates, a byte order
  mark and UTF-16 or UTF-32, all of which `json.loads` reads;
- it turns an integer beyond 64 bits into a float, where `json.loads` keeps it exact;
- it reads nesting to 1024 levels, where `json.loads` stops at the interpreter's recursion limit
  (about 1000 levels, less the stack in use).
So a text goes to orjson only when it is at most `LONGEST` bytes, has no run of 19 digits (every
integer then fits in 64 bits) and fewer than `SHALLOW` brackets (so it nests less deep than either
parser's limit); whatever orjson refuses is read again by the standard library, whose answer or
error stands. The gateway's answers and error messages are those of `json.loads`, only sooner.
tests/test_json_codec.py compares the two on the texts where they differ.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

SHALLOW: Final = 500
"""Fewer brackets than this cannot nest deep enough to make `json.loads` run out of stack."""
LONGEST: Final = 1 << 20
"""A longer text is read by the standard library: the check below copies it."""
_MARKED: Final = bytes.maketrans(b"0123456789{", b"0000000000[")
_LONG_NUMBER: Final = b"0" * 19
PLAIN: Final = json.JSONDecoder()


def loads(text: bytes | str, decoder: json.JSONDecoder = PLAIN) -> tuple[Any, bool]:
    """`json.loads(text)` with `decoder`'s options, and whether orjson read it (then `text` is
    strict UTF-8 JSON without NaN, infinities or integers beyond 64 bits: it means what the
    document parsed from it means, and can be forwarded as it is). Raises what `json.loads` raises."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if _same_for_orjson(data):
        try:
            return orjson.loads(data), True
        except orjson.JSONDecodeError:
            pass
    if isinstance(text, bytes):
        return decoder.decode(text.decode(json.detect_encoding(text), "surrogatepass")), False
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return decoder.decode(text), False


def _same_for_orjson(data: bytes) -> bool:
    """No run of 19 digits and fewer than `SHALLOW` brackets, found in one pass over a copy where
    every digit is a 0 and every brace a bracket."""
    if len(data) > LONGEST:
        return False
    marked = data.translate(_MARKED)
    return marked.count(b"[") < SHALLOW and _LONG_NUMBER not in marked
