"""The HTTP/1.1 wire format of a backend's answer, as adaptors/http_client.py reads it: the head
(status line and headers, within bounds), the body's framing (a length, chunks, or until the
connection closes), its content coding, and the failures the client raises; and the JSON body of
a request the adaptors send.

Parsed in Python: the head of a model server's answer is a few short lines, and a parser in C
(httptools) saves too little per answer to be worth a compiled dependency. Everything a backend
sends is bounded here, since a backend is outside the gateway's control: a head over 64 KiB or 100
headers, a line over 8190 bytes (aiohttp's limit), a chunk size that is not hexadecimal, or
framing that contradicts itself is refused as a malformed answer, never guessed at.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_LINE_BYTES = 8190
MAX_INTERIM_ANSWERS = 10
_HEX = frozenset(b"0123456789abcdefABCDEF")
_NO_BODY = frozenset((204, 304))


def json_body(value: Any) -> bytes:
    """orjson is about five times faster, which matters on the event loop for a 20 MB body; what it
    cannot encode (nesting beyond 254 levels, integers beyond 64 bits, lone surrogates) the
    standard library does."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


class HTTPFailure(Exception):
    """What the client raises for a failed exchange. `shown` is the name the client is told
    (adaptors/transport.py): the names aiohttp's client gave the same failures, so that clients
    read the same messages as before this client replaced it."""

    shown = "ClientError"

    def __init__(self, message: str, shown: str | None = None) -> None:
        super().__init__(message)
        if shown is not None:
            self.shown = shown


class ConnectFailed(HTTPFailure):
    """No connection could be opened (refused, no route, no such host): nothing was sent."""

    shown = "ClientConnectorError"


class TLSFailed(HTTPFailure):
    """The connection opened, and the peer's TLS did not prove who it should be (or failed)."""

    shown = "ClientConnectorSSLError"


class ConnectTimeout(HTTPFailure, TimeoutError):
    """No connection (or no place in the pool) within the time allowed: nothing was sent."""

    shown = "ConnectionTimeoutError"


class ReadTimeout(HTTPFailure, TimeoutError):
    """The answer (or its next part) did not come in time."""

    shown = "SocketTimeoutError"


class Disconnected(HTTPFailure):
    """The backend closed the connection before the answer was complete."""

    shown = "ServerDisconnectedError"


class MalformedAnswer(HTTPFailure):
    """Bytes that are not an HTTP/1.1 answer within the bounds, or a body that cannot be decoded."""

    shown = "ClientResponseError"


@dataclass(slots=True)
class Head:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its first value (Content-Length excepted, whose
    copies must agree)."""
    length: int | None
    """The body's length; None: chunked, or until the connection closes."""
    chunked: bool
    keep_alive: bool
    """The connection may take another request once this answer's body is read."""

    def header(self, name: str) -> str | None:
        """Case-insensitive: `name` in any case."""
        return self.headers.get(name.lower())


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """The index just past the head's blank line, or -1 while it has not arrived (refused once
    more bytes than any head may have arrived without it). `start`: where to look from, so that a
    head arriving a byte at a time is not searched again from its start each time."""
    end = buffer.find(b"\r\n\r\n", start)
    if end >= 0:
        return end + 4
    if len(buffer) > MAX_HEAD_BYTES:
        raise MalformedAnswer(f"the answer's head exceeds {MAX_HEAD_BYTES} bytes")
    return -1


def parse_head(raw: bytes | bytearray) -> Head:
    """The head in `raw`, its blank line excluded."""
    if len(raw) > MAX_HEAD_BYTES:
        raise MalformedAnswer(f"the answer's head exceeds {MAX_HEAD_BYTES} bytes")
    crlf = raw.count(b"\r\n")
    if crlf > MAX_HEADERS:
        raise MalformedAnswer(f"the answer has more than {MAX_HEADERS} headers")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf or b"\x00" in raw:
        raise MalformedAnswer("the answer's head holds a control character")
    lines = raw.decode("latin-1").split("\r\n")
    version, status = _status_line(lines[0])
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    for line in lines[1:]:
        if len(line) > MAX_LINE_BYTES:
            raise MalformedAnswer(f"a header line of the answer exceeds {MAX_LINE_BYTES} bytes")
        name, colon, value = line.partition(":")
        if not colon or not name or name[0] in " \t" or name[-1] in " \t":
            raise MalformedAnswer("a header line of the answer is not `name: value`")
        key = name.lower()
        if key == "content-length":
            lengths.add(value.strip(" \t"))
        if key not in headers:
            headers[key] = value.strip(" \t")
    return _framed(version, status, headers, lengths)


def _status_line(line: str) -> tuple[str, int]:
    if len(line) > MAX_LINE_BYTES:
        raise MalformedAnswer(f"the answer's status line exceeds {MAX_LINE_BYTES} bytes")
    version, _, rest = line.partition(" ")
    code = rest[:3]
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or not code.isascii()
        or rest[3:4] not in ("", " ")
    ):
        raise MalformedAnswer("the answer does not start with an HTTP/1.x status line")
    status = int(code)
    if status < 100:
        raise MalformedAnswer(f"the answer's status {status} is not an HTTP status")
    return version, status


def _framed(version: str, status: int, headers: dict[str, str], lengths: set[str]) -> Head:
    """The body's framing, as RFC 9112 section 6.3 reads it, refusing what could be read two ways."""
    connection = headers.get("connection")
    keep_alive = version == "HTTP/1.1" and (connection is None or "close" not in connection.lower())
    if status < 200 or status in _NO_BODY:
        return Head(status, headers, 0, False, keep_alive)
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if lengths:
            raise MalformedAnswer("the answer has both a Content-Length and a Transfer-Encoding")
        if coding.strip().lower() != "chunked":
            raise MalformedAnswer("the answer's Transfer-Encoding is not chunked")
        return Head(status, headers, None, True, keep_alive)
    if lengths:
        if len(lengths) > 1:
            raise MalformedAnswer("the answer has Content-Lengths that differ")
        (length,) = lengths
        if not length or len(length) > 18 or not length.isdigit() or not length.isascii():
            raise MalformedAnswer("the answer's Content-Length is not a number")
        return Head(status, headers, int(length), False, keep_alive)
    return Head(status, headers, None, False, False)


class Chunks:
    """Takes a chunked body apart as its bytes arrive, in pieces of any size: the data of its
    chunks out, the sizes, extensions and trailers dropped (each line within the bounds)."""

    __slots__ = ("_left", "_line", "_state", "_trailer_bytes", "done")

    _SIZE, _DATA, _DATA_END, _TRAILERS = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._line = b""
        self._left = 0
        self._trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Appends the chunk data in `data` to `out`; returns how many bytes of `data` were used
        (all of them until the body's end, after which the rest is not this answer's)."""
        at, size = 0, len(data)
        while at < size and not self.done:
            if self._state == self._DATA:
                take = min(self._left, size - at)
                out.append(data if take == size else data[at : at + take])
                at += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            line, at = self._line_from(data, at)
            if line is None:
                break
            if self._state == self._SIZE:
                self._left = _chunk_size(line)
                self._state = self._DATA if self._left else self._TRAILERS
            elif self._state == self._DATA_END:
                if line:
                    raise MalformedAnswer("a chunk of the answer is longer than its size")
                self._state = self._SIZE
            elif not line:
                self.done = True
            else:
                self._trailer_bytes += len(line)
                if self._trailer_bytes > MAX_HEAD_BYTES:
                    raise MalformedAnswer(f"the answer's trailers exceed {MAX_HEAD_BYTES} bytes")
        return at

    def _line_from(self, data: bytes, at: int) -> tuple[bytes | None, int]:
        """The next whole line (without its CRLF) and where the data after it starts; None while
        the line has not all arrived (kept, within the bound)."""
        end = data.find(b"\n", at)
        if end < 0:
            self._line += data[at:]
            if len(self._line) > MAX_LINE_BYTES:
                raise MalformedAnswer(f"a chunk line of the answer exceeds {MAX_LINE_BYTES} bytes")
            return None, len(data)
        line = self._line + data[at:end]
        self._line = b""
        if not line.endswith(b"\r") or len(line) > MAX_LINE_BYTES:
            raise MalformedAnswer("a chunk line of the answer is not a line")
        return line[:-1], end + 1


def _chunk_size(line: bytes) -> int:
    """A chunk's size: hexadecimal digits only (no sign, no `0x`), then any extensions."""
    digits = line.split(b";", 1)[0].rstrip(b" \t")
    if not digits or len(digits) > 15 or not _HEX.issuperset(digits):
        raise MalformedAnswer("a chunk size of the answer is not hexadecimal")
    return int(digits, 16)


class Decompressor:
    """A gzip or deflate body unpacked a bounded piece at a time: a small answer that unpacks to a
    huge one is never unpacked whole. What is not yet unpacked stays in zlib's object, no larger
    than the compressed bytes it came with."""

    __slots__ = ("_encoding", "_zlib")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._zlib: zlib._Decompress | None = (
            zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        )

    @staticmethod
    def of(content_encoding: str | None) -> Decompressor | None:
        """For the codings asked for (Accept-Encoding: gzip, deflate); any other body is passed on
        as it came, as aiohttp did."""
        if content_encoding is None:
            return None
        encoding = content_encoding.strip().lower()
        return Decompressor(encoding) if encoding in ("gzip", "deflate") else None

    def unpack(self, data: bytes, most: int) -> bytes:
        """At most `most` bytes of what `data` (and what is pending) unpacks to."""
        if self._zlib is None:
            # deflate is meant to be zlib-wrapped; some servers send it raw (its first byte tells)
            wrapped = bool(data) and data[0] & 0x0F == 8
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        source = self._zlib.unconsumed_tail + data if self._zlib.unconsumed_tail else data
        try:
            return self._zlib.decompress(source, most)
        except zlib.error:
            raise MalformedAnswer(
                f"the answer is not valid {self._encoding}", shown="ClientPayloadError"
            ) from None

    @property
    def pending(self) -> bool:
        """Bytes wait to be unpacked."""
        return self._zlib is not None and bool(self._zlib.unconsumed_tail)
