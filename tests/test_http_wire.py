"""The wire format of a backend's answer as the gateway's HTTP client reads it (adaptors/http_wire.py):
heads within bounds, framing that cannot be read two ways, chunked bodies taken apart whatever
pieces they arrive in, and bodies unpacked a bounded piece at a time."""

from __future__ import annotations

import itertools
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptors.http_wire import (
    MAX_HEAD_BYTES,
    Chunks,
    Decompressor,
    MalformedAnswer,
    head_end,
    parse_head,
)


def test_a_head_is_read_case_insensitively_with_its_framing() -> None:
    head = parse_head(
        b"HTTP/1.1 429 Too Many Requests\r\nRETRY-after: 7\r\nContent-Type: application/json; charset=latin-1"
        b"\r\ncontent-length: 12\r\nX-Twice: first\r\nx-twice: second"
    )
    assert (head.status, head.length, head.chunked, head.keep_alive) == (429, 12, False, True)
    assert head.header("Retry-After") == "7" and head.header("x-twice") == "first"
    assert head.header("content-type") == "application/json; charset=latin-1"


@pytest.mark.parametrize(
    ("raw", "length", "chunked", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked", None, True, True),
        (b"HTTP/1.1 200 OK", None, False, False),  # until the connection closes
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close", 3, False, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3", 3, False, False),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 99", 0, False, True),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked", 0, False, True),
        (b"HTTP/1.1 200", None, False, False),  # no reason phrase
    ],
)
def test_framing(raw: bytes, length: int | None, chunked: bool, keep_alive: bool) -> None:
    head = parse_head(raw)
    assert (head.length, head.chunked, head.keep_alive) == (length, chunked, keep_alive)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 Low",
        b"ICY 200 OK",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4",
        b"HTTP/1.1 200 OK\r\nContent-Length: -3",
        b"HTTP/1.1 200 OK\r\nContent-Length: +3",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa3",  # an Arabic-Indic digit
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
        b"HTTP/1.1 200 OK\r\nNo colon here",
        b"HTTP/1.1 200 OK\r\nName : value",
        b"HTTP/1.1 200 OK\r\nA: 1\r\n folded: continuation",
        b"HTTP/1.1 200 OK\r\nA: 1\nB: 2",
        b"HTTP/1.1 200 OK\r\nA: 1\rB: 2",
        b"HTTP/1.1 200 OK\r\nA: \x00",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 8191,
        b"HTTP/1.1 200 OK" + b"\r\nX: 1" * 101,
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES,
    ],
)
def test_heads_that_are_malformed_or_beyond_the_bounds_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        parse_head(raw)


def test_a_head_that_never_ends_is_refused_once_over_the_bound() -> None:
    assert head_end(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\nbody") == len(b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n")
    assert head_end(b"HTTP/1.1 200 OK\r\n" + b"a" * 1000) == -1
    with pytest.raises(MalformedAnswer):
        head_end(b"HTTP/1.1 200 OK\r\n" + b"a" * MAX_HEAD_BYTES)


def chunked(pieces: list[bytes], extensions: bool, trailers: bool) -> bytes:
    out = b""
    for piece in pieces:
        extension = b' ; name="value" ;flag' if extensions else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
    return out + b"0\r\n" + (b"Trailer-A: 1\r\nTrailer-B: 2\r\n" if trailers else b"") + b"\r\n"


def unchunked(encoded: bytes, cuts: list[int]) -> tuple[bytes, int]:
    """The data of `encoded` fed in pieces cut at `cuts`, and how many bytes the decoder used."""
    chunks, used = Chunks(), 0
    out: list[bytes] = []
    bounds = [0, *sorted(set(cuts)), len(encoded)]
    for start, end in itertools.pairwise(bounds):
        used += chunks.feed(encoded[start:end], out)
    assert chunks.done
    return b"".join(out), used


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    extensions=st.booleans(),
    trailers=st.booleans(),
    data=st.data(),
)
def test_chunks_are_read_whatever_pieces_they_arrive_in(
    pieces: list[bytes], extensions: bool, trailers: bool, data: st.DataObject
) -> None:
    encoded = chunked(pieces, extensions, trailers)
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=8))
    assert unchunked(encoded + b"NEXT", cuts) == (b"".join(pieces), len(encoded))


def test_chunks_split_at_every_byte_boundary() -> None:
    encoded = chunked([b"data: {}\n\n", b"x" * 17, b"\r\n0\r\n"], extensions=True, trailers=True)
    for cut in range(len(encoded) + 1):
        assert unchunked(encoded, [cut])[0] == b"data: {}\n\n" + b"x" * 17 + b"\r\n0\r\n", cut
    assert unchunked(encoded, list(range(len(encoded))))[0].startswith(b"data: ")


@pytest.mark.parametrize(
    "encoded",
    [
        b"zz\r\nab\r\n0\r\n\r\n",
        b"-1\r\n",
        b"0x2\r\nab\r\n",
        b"+2\r\nab\r\n",
        b" \r\n",
        b"\r\n",
        b"1_0\r\n",
        b"1234567890123456\r\n",
        b"2\r\nabc\r\n",  # longer than its size
        b"2\nab\r\n",  # a bare LF
        b"2" + b" " * 9000 + b"\r\n",
        b"0\r\n" + b"T: 1\r\n" * 20000,
    ],
)
def test_invalid_chunk_sizes_and_lines_are_refused(encoded: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        Chunks().feed(encoded, [])


@pytest.mark.parametrize("wbits", [31, 15, -15], ids=["gzip", "deflate", "raw-deflate"])
def test_a_packed_body_unpacks_a_bounded_piece_at_a_time(wbits: int) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    packed = compressor.compress(bytes(8 * 1024 * 1024)) + compressor.flush()
    decompressor = Decompressor.of(" GZIP " if wbits == 31 else "deflate")
    assert decompressor is not None
    pieces = [decompressor.unpack(packed, 65536)]
    while decompressor.pending:
        pieces.append(decompressor.unpack(b"", 65536))
    assert all(len(piece) <= 65536 for piece in pieces)
    assert sum(map(len, pieces)) == 8 * 1024 * 1024


def test_only_the_codings_asked_for_are_unpacked() -> None:
    assert Decompressor.of(None) is None and Decompressor.of("br") is None
    assert Decompressor.of("identity") is None
    with pytest.raises(MalformedAnswer) as broken:
        Decompressor("gzip").unpack(b"not gzip at all", 100)
    assert broken.value.shown == "ClientPayloadError"
