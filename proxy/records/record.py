"""One record per request: what the gateway writes as a JSON line on stdout for operators
(``proxy.records.line_writer``) and as a row of the ``requests`` table for usage reports
(``proxy.records.record_sink``, ``proxy.records.usage_store``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

import orjson

RECORD_DELAY_SECONDS: Final = 0.05
"""How long a record may wait for others to be built and written with it."""


_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""For the rare line orjson refuses; built once, as json.dumps with options builds one per call."""


@dataclass
class RequestRecord:
    request_id: str  # with started_at, the database key (a client may reuse its X-Request-ID)
    started_at: float  # epoch seconds
    duration_ms: float
    ttfc_ms: float | None  # time to the first chunk, for streams
    method: str
    route: str  # the route template, e.g. "/resource_server/{cluster}/{framework}/v1/{openai_path}"
    path: str
    status: int
    user_id: str | None
    username: str | None
    cluster: str | None
    framework: str | None
    model: str | None
    endpoint_slug: str | None
    stream: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    task_id: str | None
    client_ip: str | None
    error: str | None
    prompt: str | None = None  # only when the operator configures storing prompts and results
    result: str | None = None
    usage_estimated: bool = False  # the stream ended before the backend reported its usage

    def as_json_line(self) -> bytes:
        """Compact JSON ending in one newline. JSON escapes every control character, so the only newline
        is the last byte; text stays readable UTF-8. orjson writes it ten times faster than the standard
        library, which a busy gateway notices; it refuses a lone surrogate (undecodable client input),
        which the standard library then writes as the JSON escape ``\\udcXX``."""
        try:
            return orjson.dumps(vars(self), option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            text = _LINE_ENCODER.encode(vars(self))
            return text.encode("utf-8", "backslashreplace") + b"\n"
