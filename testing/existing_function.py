"""An imitation of the existing gateway's streaming-capable vLLM function
(`compute-functions/vllm_register_function_with_streaming.py` in auroraGPT-ANL/inference-gateway),
written from what that function does, for the fake Compute service to run.

What carries over, as the real one behaves:

- `model_params` must hold `openai_endpoint` and `api_port`; both are removed before vLLM sees the
  request. A request that is not streamed gets vLLM's JSON plus `response_time` and
  `throughput_tokens_per_second` (from usage.total_tokens), as indented JSON.
- A vLLM error on a request that is not streamed raises; the text names the status, then vLLM's body
  (`Response text: ...`), then vLLM's response headers as a Python dict and, added by the outer
  handler, the response time. Every failure is re-raised as `Unexpected error of type ...` (or
  `Network error occurred: ...` for `requests` errors).
- Streaming: the five gateway fields are checked (a missing one raises) and removed. vLLM's lines are
  buffered and POSTed to `/resource_server/api/streaming/data/` joined by newlines, when 20 lines are
  waiting or 0.5 s passed since the last post (checked only when a line arrives). `data: [DONE]` is
  never forwarded: on it the buffer is flushed and `/done/` is posted. A stream that ends without
  `[DONE]` (Responses, Messages) loses its last buffer and posts no `/done/`.
- A refused or failed callback never stops the stream: it is counted, printed, and reported in the
  result as a `warning`. Only a 200 counts as accepted; 410 is not looked at.
- A vLLM error status posts `/error/` twice (once before raising, once from the handler) and, like any
  failure while streaming, returns (does not raise) `{"status": "error", "error": ...}`.
- The result of a stream is always a JSON string: `status` "completed" with `total_chunks` and
  `chunks_sent_to_server`, or "error".
- Callbacks carry `X-Internal-Secret` (INTERNAL_STREAMING_SECRET, or the real function's default
  `default-secret-change-me`) and `X-Stream-Task-Token`; data posts time out after 2 s and reuse one
  session, `/error/` and `/done/` after 10 s on a fresh session each.

The one deviation: vLLM is reached over plain HTTP, since the tests' fake vLLM (testing/fake_vllm/)
does not serve TLS; the real function calls `https://127.0.0.1:{api_port}` without verifying it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import requests

VLLM_SCHEME = "http"
DATA_TIMEOUT = 2
CONTROL_TIMEOUT = 10
HEALTH_TIMEOUT = 120
BATCH_LINES = 20
BATCH_SECONDS = 0.5
DEFAULT_SECRET = "default-secret-change-me"
GATEWAY_FIELDS = (
    "streaming_server_host",
    "streaming_server_port",
    "streaming_server_protocol",
    "stream_task_id",
    "stream_task_token",
)


class _Callbacks:
    """The gateway's callback routes, as the existing function reaches them."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.host = params.get("streaming_server_host")
        self.port = params.get("streaming_server_port")
        self.protocol = params.get("streaming_server_protocol", "https")
        self.task_id = params.get("stream_task_id")
        self.token = params.get("stream_task_token")
        self.data_session = requests.Session()

    def missing(self) -> list[str]:
        fields = {
            "streaming_server_host": self.host,
            "streaming_server_port": self.port,
            "stream_task_id": self.task_id,
            "stream_task_token": self.token,
        }
        return [name for name, value in fields.items() if not value]

    def post(self, route: str, body: dict[str, Any], timeout: float, fresh: bool) -> tuple[bool, str | None]:
        url = f"{self.protocol}://{self.host}:{self.port}/resource_server/api/streaming/{route}/"
        headers: dict[str, Any] = {
            "Content-Type": "application/json",
            "X-Internal-Secret": os.environ.get("INTERNAL_STREAMING_SECRET", DEFAULT_SECRET),
            "X-Stream-Task-Token": self.token,
        }
        session = requests.Session() if fresh else self.data_session
        try:
            answer = session.post(url, json=body, headers=headers, timeout=timeout, verify=False)
            if fresh:
                session.close()
        except requests.exceptions.Timeout as exc:
            return False, f"Timeout contacting {route} server: {exc}"
        except requests.exceptions.ConnectionError as exc:
            return False, f"Connection error to {route} server: {exc}"
        except Exception as exc:
            return False, f"Unexpected error in {route}: {exc}"
        if answer.status_code == 200:
            return True, None
        return False, f"{route.upper()} server returned {answer.status_code}: {answer.text}"

    def data(self, lines: list[str]) -> bool:
        body = {"task_id": self.task_id, "data": "\n".join(lines), "type": "data"}
        sent, problem = self.post("data", body, DATA_TIMEOUT, fresh=False)
        if not sent:
            print(f"[STREAMING] Failed to send /data/: {problem}")
        return sent

    def error(self, message: str) -> None:
        sent, problem = self.post("error", {"task_id": self.task_id, "error": message, "type": "error"},
                                  CONTROL_TIMEOUT, fresh=True)  # fmt: skip
        if not sent:
            print(f"[STREAMING] X Failed to send /error/: {problem}")

    def done(self) -> None:
        self.post("done", {"task_id": self.task_id, "type": "done"}, CONTROL_TIMEOUT, fresh=True)


def _whole(url: str, headers: dict[str, str], payload: dict[str, Any], started: float, health: bool) -> str:
    if health:
        answer = requests.get(url, headers=headers, verify=False, timeout=HEALTH_TIMEOUT)
    else:
        answer = requests.post(url, headers=headers, json=payload, verify=False)
    elapsed = time.time() - started
    metrics: dict[str, Any] = {"response_time": elapsed, "throughput_tokens_per_second": 0}
    if answer.status_code != 200:
        raise Exception(
            f"API request failed with status code: {answer.status_code}\n"
            f"Response text: {answer.text}\n"
            f"Response headers: {dict(answer.headers)}"
        )
    try:
        document = answer.json()
    except json.JSONDecodeError:
        return json.dumps({"completion": answer.text, **metrics}, indent=4)
    total = document.get("usage", {}).get("total_tokens", 0)
    metrics["throughput_tokens_per_second"] = total / elapsed if elapsed > 0 else 0
    return json.dumps({**document, **metrics}, indent=4)


def _streamed(url: str, headers: dict[str, str], payload: dict[str, Any], started: float) -> str:
    callbacks = _Callbacks(payload)
    missing = callbacks.missing()
    if missing:
        raise Exception(f"Streaming requires the following parameters: {', '.join(missing)}")
    vllm_payload = {key: value for key, value in payload.items() if key not in GATEWAY_FIELDS}
    try:
        answer = requests.post(url, headers=headers, json=vllm_payload, stream=True, verify=False)
        if answer.status_code != 200:
            message = f"API request failed with status code: {answer.status_code}\n"
            message += f"Response text: {answer.text}"
            callbacks.error(message)
            raise Exception(message)
        seen, sent, failed, tokens = 0, 0, 0, 0
        pending: list[str] = []
        last_post = time.time()

        def flush() -> None:
            nonlocal sent, failed
            if callbacks.data(pending):
                sent += len(pending)
            else:
                failed += len(pending)

        for raw in answer.iter_lines():
            if not raw:
                continue
            line = raw.decode("utf-8")
            if line.strip() == "data: [DONE]":
                if pending:
                    flush()
                callbacks.done()
                break
            if not line.strip():
                continue
            seen += 1
            pending.append(line)
            now = time.time()
            if len(pending) >= BATCH_LINES or now - last_post >= BATCH_SECONDS:
                flush()
                pending, last_post = [], now
            try:  # like the real one, only a JSON error is ignored here ("usage": null would fail)
                chunk = json.loads(line[6:] if line.startswith("data: ") else line)
                if "usage" in chunk and "total_tokens" in chunk["usage"]:
                    tokens = chunk["usage"]["total_tokens"]
            except json.JSONDecodeError:
                pass
        elapsed = time.time() - started
        result: dict[str, Any] = {
            "streaming": True,
            "task_id": callbacks.task_id,
            "response_time": elapsed,
            "throughput_tokens_per_second": tokens / elapsed if elapsed > 0 else 0,
            "total_tokens": tokens,
            "status": "completed",
            "total_chunks": seen,
            "chunks_sent_to_server": sent,
        }
        if failed > 0:
            result["warning"] = f"{failed} chunks failed to send to streaming server"
        return json.dumps(result)
    except Exception as exc:
        with contextlib.suppress(Exception):  # the real one ignores a failure to report the failure
            callbacks.error(str(exc))
        return json.dumps(
            {
                "streaming": True,
                "task_id": callbacks.task_id,
                "response_time": time.time() - started,
                "throughput_tokens_per_second": 0,
                "total_tokens": 0,
                "status": "error",
                "error": str(exc),
            }
        )


def existing_vllm_function(parameters: dict[str, Any]) -> str:
    """The existing function's entry point: `{"model_params": {...}}` in, a JSON string out."""
    started: float | None = None
    try:
        if "model_params" not in parameters:
            raise Exception("Missing required parameter: 'model_params'")
        params = parameters["model_params"]
        if "openai_endpoint" not in params:
            raise Exception("Missing required parameter: 'model_params.openai_endpoint'")
        if "api_port" not in params:
            raise Exception("Missing required parameter: 'model_params.api_port'")
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {os.getenv('OPENAI_API_KEY', 'random_api_key')}",
        }
        path, port = params.pop("openai_endpoint"), params.pop("api_port")
        health = "health" in path.lower()
        if health:
            url = f"{VLLM_SCHEME}://127.0.0.1:{port}/" + path.replace("../", "").replace("v1/", "")
        else:
            url = f"{VLLM_SCHEME}://127.0.0.1:{port}/v1/{path}"
        payload = dict(params)
        started = time.time()
        if params.get("stream", False):
            return _streamed(url, headers, payload, started)
        return _whole(url, headers, payload, started, health)
    except requests.RequestException as exc:
        message = f"Network error occurred: {exc}"
        if started is not None:
            message += f"\nResponse time: {time.time() - started}"
        raise Exception(message)  # noqa: B904 (chained implicitly, as the real one is)
    except KeyError as exc:
        raise Exception(f"Missing required parameter: {exc}")  # noqa: B904
    except Exception as exc:
        message = f"Unexpected error of type {type(exc).__name__}: {exc}"
        if started is not None:
            message += f"\nResponse time: {time.time() - started}"
        raise Exception(message)  # noqa: B904 (chained implicitly, as the real one is)
