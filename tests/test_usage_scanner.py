"""The stream scanner reads usage however the backend's writes cut its events: whole events (the
usual read, taken without a search), several at once, or pieces; in any of SSE's line endings."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.usage import UsageScanner

NAMES = {"prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens"}
ENDINGS = ("\n", "\r\n", "\r")


def event(fields: list[tuple[str, str]], newline: str) -> bytes:
    return "".join(f"{name}: {value}{newline}" for name, value in fields).encode() + newline.encode()


def content(text: str) -> list[tuple[str, str]]:
    return [("data", json.dumps({"choices": [{"delta": {"content": text}}], "usage": None}))]


def usage(prompt: int, completion: int, named: bool) -> list[tuple[str, str]]:
    data = json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})
    return [("event", "usage")] * named + [("data", data)]


def split_data(text: str) -> list[tuple[str, str]]:
    """One JSON document over two data lines, which SSE joins with a newline."""
    document = json.dumps({"choices": [{"delta": {"content": text}}]})
    middle = len(document) // 2
    return [("data", document[:middle]), ("data", document[middle:])]


streams = st.lists(
    st.one_of(
        st.builds(content, st.text(max_size=20)),
        st.builds(split_data, st.text(max_size=20)),
        st.builds(usage, st.integers(0, 10_000), st.integers(0, 10_000), st.booleans()),
    ),
    min_size=1,
    max_size=8,
)


async def scan(data: bytes, cuts: list[int], strip: bool) -> tuple[bytes, UsageScanner]:
    scanner = UsageScanner(NAMES, strip_usage_event=strip)
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})

    async def reads() -> AsyncIterator[bytes]:
        for start, end in itertools.pairwise(bounds):
            yield data[start:end]

    passed = b"".join([chunk async for chunk in scanner.scan(reads())])
    return passed, scanner


@settings(max_examples=300, deadline=None)
@given(streams, st.sampled_from(ENDINGS), st.lists(st.integers(0, 10_000), max_size=6), st.booleans())
def test_usage_is_read_and_only_the_usage_event_is_taken_out(
    fields: list[list[tuple[str, str]]], newline: str, cuts: list[int], strip: bool
) -> None:
    events = [event(each, newline) for each in fields]
    passed, scanner = asyncio.run(scan(b"".join(events), cuts, strip))
    reports = [each for each in fields if each[-1][1].startswith('{"choices": [], "usage"')]
    kept = [e for e, f in zip(events, fields, strict=True) if not (strip and f in reports)]
    assert passed == b"".join(kept)
    if reports:
        last = json.loads(reports[-1][-1][1])["usage"]
        assert scanner.usage is not None
        assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (
            last["prompt_tokens"],
            last["completion_tokens"],
        )
    else:
        assert scanner.usage is None
    assert scanner.events == sum(name == "data" for each in fields for name, _ in each)  # data lines


def test_events_in_different_line_endings_in_one_read_keep_every_other_byte() -> None:
    """Events of one read may end in different line endings: the usage-only event is found around
    its mention, and every byte of the other events passes as it came, one mentioning usage too."""
    before = event(content("a"), "\n")
    report = event(usage(7, 3, named=True), "\r\n")
    after = event(content('"usage"'), "\r") + b"data: [DONE]\n\n"
    passed, scanner = asyncio.run(scan(before + report + after, [], strip=True))
    assert passed == before + after
    assert scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.usage.completion_tokens) == (7, 3)
