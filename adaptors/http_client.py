"""A lean HTTP/1.1 client for the adaptors that call an OpenAI-compatible backend themselves
(adaptors/forwarding.py, and the status document of adaptors/direct_api.py).

aiohttp's client cost the gateway about 300 µs of CPU per forwarded request on a 2-vCPU machine,
the largest single cost of a direct request; this one does the same exchange for a fraction of
it. It does only what the adaptors need: a request with a body of bytes, an answer read whole
within a limit or as a stream, keep-alive connections pooled per origin, TLS with the context the
adaptor gives. It never follows redirects and keeps no cookies (one client serves every user of
an endpoint). Failures are its own exceptions (adaptors/http_wire.py), mapped to what the client
is told in adaptors/transport.py.

The pool: at most `max_connections` connections in use at once (0: no limit), counting those
being opened; a request beyond waits for one within its own deadline. Idle connections are
reused newest first and closed after `KEEPALIVE_SECONDS` (aiohttp's default too), and one the
server closed while idle is dropped, never reused. A request on a reused connection that fails
before any byte of the answer came (the server closed the connection as the request went out) is
sent once more on a new connection; never once an answer began, never on a new connection.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import socket
import ssl
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from adaptors.http_connection import Connection
from adaptors.http_stream import Stream, bounded_body
from adaptors.http_wire import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    Head,
    TLSFailed,
)

KEEPALIVE_SECONDS = 15.0
USER_AGENT = "hpc-inference-gateway"
ACCEPT_ENCODING = "gzip, deflate"
_TARGETS = 1024
"""URLs whose request line and headers are kept ready (a deployment's replicas come and go)."""
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer read whole: `body` is None when it exceeded the limit (after decompression)."""

    head: Head
    body: bytes | None

    @property
    def status(self) -> int:
        return self.head.status


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    prefix: bytes
    """The request line and the headers every request to this URL sends."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A request as it is sent, and sent again on a new connection if a reused one was closed."""

    target: _Target
    head: bytes
    body: bytes | None
    deadline: float
    silence: float | None

    def send_on(self, connection: Connection) -> None:
        connection.send(self.head, self.body, self.deadline, self.silence)


class HTTPClient:
    """One per adaptor (an endpoint, a cluster's status): `headers` go with every request."""

    def __init__(
        self,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._limit = max_connections
        self._tls = tls
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._has_authorization = any(name.lower() == "authorization" for name in headers or {})
        self._targets: dict[tuple[str, str], _Target] = {}
        self._idle: dict[Hashable, list[Connection]] = {}
        self._all: set[Connection] = set()
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def fetch(
        self,
        method: str,
        url: str,
        body: bytes | None,
        *,
        timeout: float,
        limit: Callable[[int], int],
        headers: bytes = b"",
    ) -> Answer:
        """The whole answer within `timeout` seconds (connecting, sending, head and body), its body
        within `limit(status)` bytes. `headers`: more header lines for this request alone, each
        ending in CRLF (a token that changes over the client's life)."""
        deadline = asyncio.get_running_loop().time() + timeout
        connection, head = await self._exchange(method, url, body, deadline, None, headers)
        return Answer(head, await self._whole(connection, head, limit(head.status)))

    async def stream(self, method: str, url: str, body: bytes | None, *, timeout: float) -> Stream:
        """The answer's head; connected within `timeout` seconds, then waiting at most `timeout`
        seconds of the backend's silence each time (for the head and for each piece)."""
        deadline = asyncio.get_running_loop().time() + timeout
        connection, head = await self._exchange(method, url, body, deadline, timeout)
        return Stream(self, connection, head)

    async def close(self) -> None:
        """Closes every connection, idle or in use (their requests fail as disconnected)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the client was closed"))
        self._waiters.clear()

    async def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        deadline: float,
        silence: float | None,
        headers: bytes = b"",
    ) -> tuple[Connection, Head]:
        target = self._target(method, url)
        outgoing = Outgoing(target, self._head(target, body, headers), body, deadline, silence)
        connection, reused = await self._send(outgoing)
        return await self._answer(outgoing, connection, reused)

    @staticmethod
    def _head(target: _Target, body: bytes | None, headers: bytes) -> bytes:
        if body is None:
            return target.prefix + headers + b"\r\n"
        return target.prefix + headers + b"Content-Length: %d\r\n\r\n" % len(body)

    async def _send(self, outgoing: Outgoing) -> tuple[Connection, bool]:
        """Sent on a connection of the pool, waiting for one if need be; True if it served before."""
        connection, reused = await self._acquire(outgoing.target, outgoing.deadline)
        try:
            outgoing.send_on(connection)
        except BaseException:
            self._discard(connection)
            raise
        return connection, reused

    async def _answer(
        self, outgoing: Outgoing, connection: Connection, reused: bool
    ) -> tuple[Connection, Head]:
        """The answer's head. A reused connection the server closed before answering anything is
        replaced once, by a new one."""
        try:
            while True:
                try:
                    return connection, await connection.read_head()
                except Disconnected:
                    if not reused or connection.received:
                        raise
                connection.finish()
                connection.close()
                self._all.discard(connection)
                connection, reused = await self._connect(outgoing.target, outgoing.deadline), False
                outgoing.send_on(connection)
        except BaseException:
            self._discard(connection)
            raise

    async def _whole(self, connection: Connection, head: Head, limit: int) -> bytes | None:
        try:
            body = await bounded_body(connection, head, limit)
        except BaseException:
            self._discard(connection)
            raise
        if body is None:
            self._discard(connection)
        else:
            self._release(connection)
        return body

    async def _acquire(self, target: _Target, deadline: float) -> tuple[Connection, bool]:
        """A connection to `target`'s origin and its place among those in use: an idle one if
        any (True), else a new one (False)."""
        if self._closed:
            raise ConnectFailed("the client was closed")
        if self._limit and self._in_use >= self._limit:
            await self._place(deadline)
        else:
            self._in_use += 1
        connection = self._idle_connection(target.origin)
        if connection is not None:
            return connection, True
        try:
            return await self._connect(target, deadline), False
        except BaseException:
            self._free_place()
            raise

    def _idle_connection(self, origin: Hashable) -> Connection | None:
        """The newest idle connection to `origin` still fit for use; the others met on the way close."""
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            if connection.open and now - connection.idle_since < KEEPALIVE_SECONDS:
                return connection
            connection.close()
            self._all.discard(connection)
        return None

    async def _place(self, deadline: float) -> None:
        """Waits until a connection in use is given up (its place then passes to this request)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._free_place()
            raise ConnectTimeout("no connection to the backend was free in time") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._free_place()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(waiter)

    def _free_place(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1

    async def _connect(self, target: _Target, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if target.tls:
            tls = self._tls if self._tls is not None else _default_tls()
        try:
            async with asyncio.timeout_at(deadline):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, target.origin),
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout("no connection to the backend in time") from None
        except ssl.SSLCertVerificationError as exc:
            raise TLSFailed(str(exc), shown="ClientConnectorCertificateError") from None
        except ssl.SSLError as exc:
            raise TLSFailed(str(exc)) from None
        except socket.gaierror as exc:
            raise ConnectFailed(str(exc), shown="ClientConnectorDNSError") from None
        except OSError as exc:
            raise ConnectFailed(str(exc)) from None
        if self._closed:
            connection.close()
            raise ConnectFailed("the client was closed")
        self._all.add(connection)
        return connection

    def _release(self, connection: Connection) -> None:
        """The exchange ended with the answer read: kept for the next request if it may be."""
        reusable = connection.reusable and not self._closed
        connection.finish()
        if reusable:
            loop = connection.loop
            connection.idle_since = loop.time()
            self._idle.setdefault(connection.origin, []).append(connection)
            if self._sweeper is None:
                self._sweeper = loop.call_at(connection.idle_since + KEEPALIVE_SECONDS, self._sweep)
        else:
            connection.close()
            self._all.discard(connection)
        self._free_place()

    def _discard(self, connection: Connection) -> None:
        """The exchange was abandoned or failed: the connection closes."""
        connection.finish()
        connection.close()
        self._all.discard(connection)
        self._free_place()

    def _sweep(self) -> None:
        """Closes the connections idle for `KEEPALIVE_SECONDS` (the oldest are first in each list)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest = None
        for origin, idle in list(self._idle.items()):
            expired = 0
            while expired < len(idle) and (
                now - idle[expired].idle_since >= KEEPALIVE_SECONDS - 0.01 or not idle[expired].open
            ):
                idle[expired].close()
                self._all.discard(idle[expired])
                expired += 1
            del idle[:expired]
            if not idle:
                del self._idle[origin]
            elif oldest is None or idle[0].idle_since < oldest:
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweeper = loop.call_at(oldest + KEEPALIVE_SECONDS, self._sweep)

    def _target(self, method: str, url: str) -> _Target:
        target = self._targets.get((method, url))
        if target is None:
            if len(self._targets) >= _TARGETS:
                self._targets.clear()
            target = self._targets[(method, url)] = self._parse(method, url)
        return target

    def _parse(self, method: str, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectFailed(f"not an HTTP URL: {parts.scheme}://{parts.hostname}")
        tls = parts.scheme == "https"
        default = 443 if tls else 80
        try:
            port = parts.port or default
        except ValueError:
            raise ConnectFailed("the URL's port is not a number") from None
        host = parts.hostname
        shown_host = f"[{host}]" if ":" in host else host
        authority = shown_host if port == default else f"{shown_host}:{port}"
        target = quote(parts.path or "/", safe=_SAFE_PATH)
        if parts.query:
            target += "?" + quote(parts.query, safe=_SAFE_PATH + "?")
        lines = f"{method} {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n"
        lines += f"Accept-Encoding: {ACCEPT_ENCODING}\r\n{self._headers}"
        if parts.username is not None and not self._has_authorization:
            user = f"{parts.username}:{parts.password or ''}".encode()
            lines += f"Authorization: Basic {base64.b64encode(user).decode()}\r\n"
        prefix = lines.encode("latin-1")
        return _Target((parts.scheme, host, port), host, port, tls, prefix)


_DEFAULT_TLS: list[ssl.SSLContext] = []


def _default_tls() -> ssl.SSLContext:
    """The system's verification, made once (it reads the trust store)."""
    if not _DEFAULT_TLS:
        _DEFAULT_TLS.append(ssl.create_default_context())
    return _DEFAULT_TLS[0]
