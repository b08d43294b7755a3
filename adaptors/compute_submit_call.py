"""V3 submissions to Globus Compute made on the event loop, over the gateway's own HTTP client
(adaptors/http_client.py), retried and failed as globus-sdk's `ComputeClientV3.submit` would be.

Why: through globus-sdk a submission is a `requests` call in a worker thread. On the AMD VM that
costs about 1 ms of CPU, a handoff to the thread and back, and a GIL the thread contends for with
the event loop. Two gateways measured at once on one CPU, 100 requests in flight each, took about
49 µs (11%) less CPU per request this way (`python -m bench.paired_compute`). Status calls and
everything else still go through the SDK.

What stays the SDK's:
- the token: the client's authorizer. When renewal is near, it is asked in a worker thread, since
  it then fetches a new token;
- the retry decisions: the client's `RetryConfig` and its checks, fed each answer as the
  `requests.Response` they read, or each failure as the `requests` error that `requests` would
  have raised. A 401 invalidates the token and is retried once, as in the SDK;
- the pause between attempts: the config's backoff, at most its `max_sleep`;
- the errors: an error status raises the client's `error_class` (`ComputeAPIError`), built from
  that response. A failure on the wire raises what `globus_sdk.exc.convert_request_exception`
  makes of its `requests` error (`GlobusTimeoutError`, `GlobusConnectionError`).

Where the SDK would go that this client cannot follow, submissions go through the SDK in a worker
thread: a proxy from the environment (`HTTPS_PROXY`, which `requests` honours), or TLS verification
turned off (`GLOBUS_SDK_VERIFY_SSL`). TLS verifies against certifi's bundle, as
`requests` does, or against the file or directory that `verify_ssl` names.
"""

from __future__ import annotations

import asyncio
import http
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import quote

import certifi
import globus_sdk
import orjson
import requests
import requests.structures
import requests.utils
from globus_sdk.authorizers import RenewingAuthorizer
from globus_sdk.exc import convert_request_exception
from globus_sdk.transport import RequestCallerInfo, RetryCheckRunner, RetryContext

from adaptors.http_client import Answer, HTTPClient
from adaptors.http_wire import ConnectTimeout, HTTPFailure, ReadTimeout, TLSFailed, json_body

MAX_ANSWER_BYTES: Final = 1 << 20
"""An answer names one id per task: 100 tasks take about 5 kB."""
RENEW_MARGIN_SECONDS: Final = 300
"""A token this close to its expiry is asked of the authorizer in a worker thread, which renews it
60 s before; one further from it is read as it is."""
CONNECTIONS: Final = 16
Result = TypeVar("Result")
Blocking = Callable[[Callable[[], Result]], Awaitable[Result]]


class UnreadableAnswer(globus_sdk.NetworkError):
    """The service accepted a submission but its answer is not a JSON object within
    `MAX_ANSWER_BYTES`; the tasks' fate is unknown, as after a lost connection."""


@dataclass
class SubmitCall:
    """Submits a prepared `Batch` for an endpoint through `client`'s token, retries and errors."""

    client: globus_sdk.ComputeClientV3
    blocking: Blocking[Any]
    timeout: float
    """For the whole exchange (the SDK's is per read)."""
    http: HTTPClient | None
    """None: through the SDK."""

    async def submit(self, endpoint_uuid: str, data: dict[str, Any]) -> dict[str, Any]:
        """What `client.submit(endpoint_uuid, data).data` answers, or what it raises."""
        if self.http is None:
            answer = await self.blocking(lambda: self.client.submit(endpoint_uuid, data).data)
            return dict(answer)
        url = f"{self.client.base_url.rstrip('/')}/v3/endpoints/{quote(endpoint_uuid, safe='')}/submit"
        body = json_body(data)
        config = self.client.retry_config
        caller = RequestCallerInfo(retry_config=config, authorizer=self.client.authorizer)
        checker = RetryCheckRunner(config.checks)
        response: requests.Response | None = None
        for attempt in range(config.max_retries + 1):
            context = RetryContext(attempt, caller_info=caller)
            try:
                response = context.response = await self._send(self.http, url, body)
            except requests.RequestException as exc:
                context.exception = exc
                if attempt >= config.max_retries or not checker.should_retry(context):
                    raise convert_request_exception(exc) from None
            else:
                if not checker.should_retry(context):
                    break
            if attempt < config.max_retries:
                await asyncio.sleep(min(config.backoff(context), config.max_sleep))
        if response is None:  # as in the SDK: each attempt either answers or raises
            raise UnreadableAnswer("the retries ended without an answer", ValueError("no answer"))
        return self._read(response)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def _send(self, http: HTTPClient, url: str, body: bytes) -> requests.Response:
        header = await self._authorization()
        try:
            answer = await http.fetch("POST", url, body, timeout=self.timeout, limit=_limit, headers=header)
        except (ConnectTimeout, ReadTimeout, TimeoutError) as exc:
            kind = requests.ConnectTimeout if isinstance(exc, ConnectTimeout) else requests.ReadTimeout
            raise kind(f"Globus Compute did not answer within {self.timeout:g} s") from None
        except TLSFailed as exc:
            raise requests.exceptions.SSLError(str(exc)) from None
        except HTTPFailure as exc:
            raise requests.ConnectionError(str(exc)) from None
        return _as_response(answer, url)

    async def _authorization(self) -> bytes:
        authorizer = self.client.authorizer
        if authorizer is None:
            return b""
        token = _fresh_token(authorizer)
        if token is not None:
            value = f"Bearer {token}"
        else:
            value = await self.blocking(authorizer.get_authorization_header)
        if not value:
            return b""
        if not value.isascii() or not value.isprintable():
            refused = ValueError("not printable ASCII")
            raise UnreadableAnswer("the access token is not a header value", refused)
        return b"Authorization: " + value.encode() + b"\r\n"

    def _read(self, response: requests.Response) -> dict[str, Any]:
        if not 200 <= response.status_code < 400:
            raise self.client.error_class(response)
        if response.content is None:
            raise UnreadableAnswer("the answer to a submission is too large", ValueError("too large"))
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise UnreadableAnswer("the answer to a submission is not JSON", exc) from None
        if not isinstance(answer, dict):
            raise UnreadableAnswer("the answer to a submission is not an object", TypeError(type(answer)))
        return answer


def submit_call(client: globus_sdk.ComputeClientV3, blocking: Blocking[Any], timeout: float) -> SubmitCall:
    """Over the gateway's client, or through the SDK where only its `requests` would reach the
    service as configured."""
    verify = getattr(client.transport, "verify_ssl", True)
    if verify is False or requests.utils.get_environ_proxies(client.base_url):
        return SubmitCall(client, blocking, timeout, None)
    http = HTTPClient(
        CONNECTIONS,
        _tls(verify),
        {"Content-Type": "application/json", "Accept": "application/json"},
    )
    return SubmitCall(client, blocking, timeout, http)


def _fresh_token(authorizer: Any) -> str | None:
    """A renewing authorizer's token while far from its expiry, read without asking the authorizer
    for its header: another thread may invalidate the token (a 401 to a status call) between a
    check and the call, which would then fetch a new one on the event loop. Any other authorizer
    may do anything, so its header is asked for in a thread."""
    if not isinstance(authorizer, RenewingAuthorizer):
        return None
    token, expires = authorizer.access_token, authorizer.expires_at
    if token is None or expires is None or time.time() >= expires - RENEW_MARGIN_SECONDS:
        return None
    return token


def _limit(_status: int) -> int:
    return MAX_ANSWER_BYTES


def _as_response(answer: Answer, url: str) -> requests.Response:
    """The answer as the `requests.Response` that the SDK's retry checks and error classes read.
    `_content` is how `requests` itself holds a body read in full. The request it answers is there
    for an error's message only: preparing one costs about 80 µs."""
    response = requests.Response()
    response.status_code = answer.status
    response.headers = requests.structures.CaseInsensitiveDict(answer.head.headers)
    response._content = answer.body
    response.url = url
    response.encoding = "utf-8"
    try:
        response.reason = http.HTTPStatus(answer.status).phrase
    except ValueError:
        response.reason = ""
    if answer.status >= 400:
        response.request = requests.Request("POST", url).prepare()
    return response


def _tls(verify: bool | str | os.PathLike[str]) -> ssl.SSLContext:
    """As `requests` verifies: certifi's bundle, or the file or directory `verify` names."""
    if isinstance(verify, bool):
        return ssl.create_default_context(cafile=certifi.where())
    where = os.fspath(verify)
    if os.path.isdir(where):
        return ssl.create_default_context(capath=where)
    return ssl.create_default_context(cafile=where)
