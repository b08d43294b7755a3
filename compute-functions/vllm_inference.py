"""The Globus Compute function that runs an OpenAI-style request against the vLLM server of its node.

A site registers `vllm_inference` with globus-compute-sdk; the gateway submits one task per request
with `{"model_params": {...}}` (see README.md in this folder). Non-streaming requests get vLLM's
answer back as the task result (and POST it to the gateway's callback route first when given its
details, so the gateway needs not poll for it); streaming requests POST their server-sent events to
the gateway's callback routes while they are generated.

Everything the function needs, imports and helpers included, lives inside `vllm_inference`: the SDK
may ship the function's source alone (or pickle it by reference to this module, which the endpoint
does not have), so nothing at module level is visible to it on the endpoint. Only the standard
library is used, since an HPC endpoint may have nothing else.
"""


def vllm_inference(parameters):
    """Call the local vLLM with the gateway's request and return the answer as a JSON string.

    Non-streaming: vLLM's answer plus `response_time` and `throughput_tokens_per_second`; when the
    gateway sent its callback details, the answer is also POSTed to it first (pushed).
    Streaming: the events go to the gateway's callback routes; the result is a small summary, or
    `{"cancelled": true, ...}` when the gateway said the client left (vLLM is then stopped).
    vLLM errors raise an exception whose text holds `API request failed with status code: N` and
    `Response text: <vLLM's body>`, which the gateway turns back into the client's 4xx.
    Only built-in exception types are raised, so the endpoint can always serialize them.
    """
    import contextlib
    import http.client
    import json
    import os
    import queue
    import socket
    import ssl
    import threading
    import time

    gateway_keys = (
        "openai_endpoint",
        "api_port",
        "streaming_server_host",
        "streaming_server_port",
        "streaming_server_protocol",
        "stream_task_id",
        "stream_task_token",
    )
    batch_lines = 20  # the existing protocol's batch size
    batch_seconds = 0.5  # at most two posts a second while tokens trickle in
    data_body_limit = 148_000  # the gateway refuses data bodies over 150 kB (413)
    error_body_limit = 14_000  # ... and done/error bodies over 15 kB
    callback_path = "/resource_server/api/streaming/"
    push_timeout = 2.0  # a pushed answer that cannot go out soon delays the task's own result

    def env_seconds(name, default):
        """A positive number of seconds from the endpoint's environment, or the default."""
        try:
            value = float(os.environ.get(name, ""))
        except ValueError:
            return default
        return value if value > 0 else default

    def encode(document):
        """Compact UTF-8 JSON: non-ASCII text costs 2-4 bytes instead of a 6-byte escape."""
        return json.dumps(document, ensure_ascii=False).encode("utf-8")

    def api_failure(status, body):
        """The error text that the gateway parses; vLLM's body must come last (it is matched to the
        end of the text)."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        return f"API request failed with status code: {status}\nResponse text: {text}"

    # ---- the request -------------------------------------------------------------------------
    if isinstance(parameters, str):
        parameters = json.loads(parameters)
    if not isinstance(parameters, dict) or not isinstance(parameters.get("model_params"), dict):
        raise ValueError("vllm_inference expects {'model_params': {...}}")
    params = dict(parameters["model_params"])
    gateway = {key: params.pop(key, None) for key in gateway_keys}
    endpoint = str(gateway["openai_endpoint"] or "chat/completions").strip("/")
    endpoint = endpoint.removeprefix("v1/")
    vllm_host = os.environ.get("VLLM_HOST") or "127.0.0.1"
    vllm_port = int(gateway["api_port"] or 8000)
    vllm_base = f"http://{vllm_host}:{vllm_port}"
    vllm_timeout = env_seconds("VLLM_TIMEOUT", 600.0)

    # ---- vLLM --------------------------------------------------------------------------------
    def open_vllm(method, path, payload, stream=False):
        """Send one request to vLLM and return (connection, socket, response).

        http.client rather than urllib, because the socket is needed to stop a stream: shutting
        it down wakes the thread blocked on it and tells vLLM the client is gone."""
        connection = http.client.HTTPConnection(vllm_host, vllm_port, timeout=vllm_timeout)
        body = None if payload is None else encode(payload)
        headers = {} if body is None else {"Content-Type": "application/json"}
        if stream:
            headers["Accept"] = "text/event-stream"
        try:
            connection.connect()
            sock = connection.sock
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
        except (TimeoutError, socket.timeout):  # noqa: UP041 (distinct before Python 3.10)
            connection.close()
            raise RuntimeError(f"vLLM at {vllm_base} did not answer within {vllm_timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise RuntimeError(f"vLLM is unreachable at {vllm_base}: {exc!r}") from None
        return connection, sock, response

    def read_all(connection, response):
        """The whole body of a non-streaming answer; a broken answer is vLLM's fault, not the client's."""
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeError(f"vLLM at {vllm_base} broke off its answer: {exc!r}") from None
        finally:
            connection.close()

    def run_health():
        """vLLM's /health answers 200 with an empty body when the model is ready."""
        started = time.monotonic()
        connection, _, response = open_vllm("GET", "/health", None)
        body = read_all(connection, response)
        if not 200 <= response.status < 300:
            raise RuntimeError(api_failure(response.status, body))
        elapsed = time.monotonic() - started
        return json.dumps({"status": "ok", "status_code": response.status, "response_time": elapsed})

    def completion_tokens(document):
        """The completion tokens that vLLM counted, or None when it did not say."""
        usage = document.get("usage") if isinstance(document, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None

    def run_once():
        """POST the request, wait for the whole answer, add the timings the gateway logs."""
        started = time.monotonic()
        connection, _, response = open_vllm("POST", f"/v1/{endpoint}", params)
        body = read_all(connection, response)
        elapsed = time.monotonic() - started
        if not 200 <= response.status < 300:
            raise RuntimeError(api_failure(response.status, body))
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RuntimeError(
                f"vLLM answered {response.status} with something not a JSON object: {body[:500]!r}"
            )
        tokens = completion_tokens(answer) or 0
        answer["response_time"] = elapsed
        answer["throughput_tokens_per_second"] = tokens / elapsed if elapsed > 0 else 0.0
        return json.dumps(answer, ensure_ascii=False)

    # ---- the gateway's callback routes -------------------------------------------------------
    class Callbacks:
        """POSTs to `/resource_server/api/streaming/{data,done,error}/` over one kept-alive
        connection, since a TLS handshake per batch would add a round trip or two to every batch."""

        def __init__(self, secret):
            protocol = str(gateway["streaming_server_protocol"] or "https").lower()
            host = str(gateway["streaming_server_host"])
            port = int(gateway["streaming_server_port"])
            timeout = env_seconds("STREAMING_CALLBACK_TIMEOUT", 10.0)
            if protocol == "https":
                ca_bundle = os.environ.get("STREAMING_CALLBACK_CA_BUNDLE") or None
                context = ssl.create_default_context(cafile=ca_bundle)
                self.connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
            elif protocol == "http":
                self.connection = http.client.HTTPConnection(host, port, timeout=timeout)
            else:
                raise ValueError(f"unknown streaming_server_protocol {protocol!r}")
            self.address = f"{protocol}://{host}:{port}"
            self.timeout = timeout
            self.task_id = gateway["stream_task_id"]
            self.headers = {
                "Content-Type": "application/json",
                "X-Internal-Secret": secret,
                "X-Stream-Task-Token": str(gateway["stream_task_token"]),
            }
            self.posts = 0

        def post(self, route, document):
            """The gateway's status for one POST. A connection error is retried once (a kept-alive
            connection may have been closed by the gateway meanwhile); a timeout is not, since the
            gateway may have taken the batch and a second copy would duplicate tokens."""
            body = encode(document)
            for attempt in (1, 2):
                try:
                    self.connection.request("POST", callback_path + route, body=body, headers=self.headers)
                    response = self.connection.getresponse()
                    response.read()
                    self.posts += 1
                    return response.status
                except (TimeoutError, socket.timeout):  # noqa: UP041 (distinct before Python 3.10)
                    self.connection.close()
                    raise RuntimeError(
                        f"the gateway at {self.address} did not answer a {route} callback "
                        f"within {self.timeout:g} s"
                    ) from None
                except ssl.SSLCertVerificationError as exc:
                    self.connection.close()
                    raise RuntimeError(f"the gateway's certificate was refused: {exc}") from None
                except (OSError, http.client.HTTPException) as exc:
                    self.connection.close()  # the next request opens a new connection
                    if attempt == 2:
                        raise RuntimeError(
                            f"cannot reach the gateway at {self.address} for a {route} callback: {exc!r}"
                        ) from None
            raise AssertionError("unreachable")

        def refusal(self, status, which):
            """Why the gateway refused a callback, in words a site's operator can act on."""
            causes = {
                401: "wrong X-Internal-Secret: INTERNAL_STREAMING_SECRET differs from the gateway's",
                403: "wrong stream token",
                413: "body too large",
            }
            cause = causes.get(status, "unexpected answer")
            return f"the gateway at {self.address} answered {status} to {which} callback ({cause})"

        def report_error(self, message):
            """Best effort: tell the gateway why the stream failed, cut to fit its 15 kB cap."""
            document = {"task_id": self.task_id, "error": message}
            while len(encode(document)) > error_body_limit and document["error"]:
                excess = len(encode(document)) - error_body_limit
                text = document["error"]
                document["error"] = text[: max(0, len(text) - excess - 40)] + " ... [truncated]"
            with contextlib.suppress(Exception):  # the task's own exception still tells the gateway
                self.post("error/", document)

        def close(self):
            self.connection.close()

    def split_batches(task_id, lines):
        """Group lines into data bodies under the gateway's cap. A line is never cut: the gateway
        takes each line of `data` as a whole server-sent event line."""
        empty = len(encode({"task_id": task_id, "data": "", "type": "data"}))
        group, size = [], empty
        for line in lines:
            cost = len(encode(line)) - 2  # the escaped text without its quotes
            if empty + cost > data_body_limit:
                raise RuntimeError(f"vLLM sent one event line of {cost} bytes, over the gateway's 150 kB cap")
            if group and size + 2 + cost > data_body_limit:  # "\n" costs 2 bytes escaped
                yield group
                group, size = [], empty
            size += cost + (2 if group else 0)
            group.append(line)
        if group:
            yield group

    # ---- streaming ---------------------------------------------------------------------------
    # The line each API sends last, which tells a finished stream from a broken one: OpenAI's chat
    # and completions end with [DONE]; the Responses and Messages APIs with a closing event.
    last_lines = {
        "responses": ("event: response.completed", "event: response.incomplete", "event: response.failed"),
        "messages": ("event: message_stop",),
    }.get(endpoint, ("data: [DONE]",))

    def pump(response, inbox):
        """Read vLLM's lines in a thread of their own: the main thread must be free to send a
        pending batch on time while vLLM is silent, and to stop the stream at any moment."""
        try:
            while True:
                line = response.readline()
                if not line:
                    break
                inbox.put(("line", line))
            inbox.put(("end", None))
        except Exception as exc:
            inbox.put(("failed", exc))

    def stop_vllm(connection, sock, response, reader):
        """Close vLLM's connection so that vLLM sees the client leave and stops generating; the
        shutdown also wakes the reader thread if it is still waiting for a line."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=2)
        response.close()
        connection.close()

    def relay(callbacks, connection, sock, response):
        """Forward vLLM's events: (True, state) once all went out, (False, state) when the
        gateway said the client is gone. vLLM's connection is closed either way.

        Lines leave in batches of up to 20, at most every 0.5 s: a line that arrives when the last
        post is older than that leaves at once (so the first token is never held back), the others
        wait for the batch to fill or for the 0.5 s to pass, even while vLLM is silent."""
        inbox = queue.Queue()
        reader = threading.Thread(target=pump, args=(response, inbox), name="vllm-stream", daemon=True)
        reader.start()
        state = {"lines": 0, "tokens": None, "cancelled": None}
        pending = []
        last_post = float("-inf")
        saw_done = False

        def send():
            """Post the pending lines; sets `cancelled` when the gateway answers 404 or 410."""
            nonlocal pending, last_post
            lines, pending = pending, []
            last_post = time.monotonic()
            for group in split_batches(callbacks.task_id, lines):
                data = "\n".join(group)
                status = callbacks.post("data/", {"task_id": callbacks.task_id, "data": data, "type": "data"})
                if status in (404, 410):
                    state["cancelled"] = f"the gateway answered {status} to a data callback: client gone"
                    return
                if not 200 <= status < 300:
                    raise RuntimeError(callbacks.refusal(status, "a data"))
                state["lines"] += len(group)

        try:
            while True:
                wait = None if not pending else max(0.0, last_post + batch_seconds - time.monotonic())
                try:
                    kind, value = inbox.get(timeout=wait)
                except queue.Empty:
                    kind, value = "tick", None
                if kind == "line":
                    line = value.decode("utf-8", "replace").rstrip("\r\n")
                    if line:
                        pending.append(line)
                        saw_done = saw_done or line in last_lines
                        if '"completion_tokens"' in line:  # the usage chunk, when the client asked for it
                            with contextlib.suppress(ValueError):
                                state["tokens"] = completion_tokens(json.loads(line[5:])) or state["tokens"]
                elif kind == "failed":
                    if pending:
                        send()  # the client keeps the tokens it already paid for
                        if state["cancelled"]:
                            return False, state
                    raise RuntimeError(
                        f"vLLM's stream broke off after {state['lines']} lines: {value!r}"
                    ) from None
                finished = kind == "end"
                due = (
                    finished
                    or saw_done
                    or len(pending) >= batch_lines
                    or time.monotonic() >= last_post + batch_seconds
                )
                if pending and due:
                    send()
                    if state["cancelled"]:
                        return False, state
                if finished:
                    break
        finally:
            stop_vllm(connection, sock, response, reader)
        if not saw_done:
            # http.client reads a connection cut between two chunks as a clean end: only the missing
            # last line, which vLLM always sends, tells a finished stream from a broken one.
            lines = state["lines"]
            raise RuntimeError(f"vLLM's stream broke off after {lines} lines, before {last_lines[0]}")
        return True, state

    def run_stream():
        """Stream from vLLM to the gateway, and report any failure to the gateway before raising."""
        secret = os.environ.get("INTERNAL_STREAMING_SECRET")
        if not secret:
            raise RuntimeError("INTERNAL_STREAMING_SECRET is not set on this endpoint: cannot stream")
        started = time.monotonic()
        callbacks = Callbacks(secret)
        try:
            connection, sock, response = open_vllm("POST", f"/v1/{endpoint}", params, stream=True)
            if not 200 <= response.status < 300:
                body = read_all(connection, response)
                raise RuntimeError(api_failure(response.status, body))
            finished, state = relay(callbacks, connection, sock, response)
            elapsed = time.monotonic() - started
            if finished:
                done = {"task_id": callbacks.task_id, "type": "done", "data_posts": callbacks.posts}
                status = callbacks.post("done/", done)
                if status in (404, 410):
                    state["cancelled"] = f"the gateway answered {status} to the done callback: client gone"
                elif not 200 <= status < 300:
                    raise RuntimeError(callbacks.refusal(status, "the done"))
        except Exception as exc:
            callbacks.report_error(str(exc))
            raise
        finally:
            callbacks.close()
        summary = {"chunks": state["lines"], "posts": callbacks.posts, "response_time": elapsed}
        if state["tokens"]:
            summary["throughput_tokens_per_second"] = state["tokens"] / elapsed if elapsed > 0 else 0.0
        if state["cancelled"]:
            return json.dumps({"cancelled": True, "reason": state["cancelled"], **summary})
        return json.dumps({"streamed": True, **summary})

    # ---- pushed answers ----------------------------------------------------------------------
    def push(answer):
        """Best effort: POST the answer to the gateway as one data line, so that it needs not wait
        for its next look at the Compute service; the task's result carries the answer anyway, so a
        push that is refused, too large or lost costs the client only that wait. The gateway's
        answer is not looked at (410 when the poll won, or the client left)."""
        secret = os.environ.get("INTERNAL_STREAMING_SECRET")
        document = {"task_id": gateway["stream_task_id"], "data": "data: " + answer, "type": "result"}
        if not secret or len(encode(document)) > data_body_limit:
            return
        with contextlib.suppress(Exception):
            callbacks = Callbacks(secret)
            callbacks.connection.timeout = min(callbacks.timeout, push_timeout)
            try:
                callbacks.post("data/", document)
            finally:
                callbacks.close()

    # ---- dispatch ----------------------------------------------------------------------------
    if endpoint == "health":
        return run_health()
    needed = ("streaming_server_host", "streaming_server_port", "stream_task_id", "stream_task_token")
    missing = ", ".join(key for key in needed if gateway[key] in (None, ""))
    if params.get("stream") is True:
        if missing:
            raise ValueError(f"stream: true needs the gateway's streaming fields; missing {missing}")
        return run_stream()
    answer = run_once()
    if not missing:
        push(answer)
    return answer


if __name__ == "__main__":  # a site's manual check on the node: python vllm_inference.py '<parameters JSON>'
    import sys

    request = sys.argv[1] if len(sys.argv) > 1 else {"model_params": {"openai_endpoint": "health"}}
    print(vllm_inference(request))
