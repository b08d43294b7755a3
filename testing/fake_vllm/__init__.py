"""A fake OpenAI-compatible inference backend (like vLLM) for tests, `make run` and benchmarks.

It answers at once with realistic response shapes, so that a benchmark measures the gateway and
not the backend. Like vLLM, it also serves OpenAI's Responses API and Anthropic's Messages API,
streams included, with their named events. Faults are injected through directives in the prompt
text (the last chat, Anthropic or Responses input message, a string `prompt`, or a string
embeddings or Responses `input`):

    [[status=N]]        answer status N with a vLLM-style error body
    [[delay=S]]         wait S seconds before sending the headers
    [[chunks=N]]        number of content chunks in a stream (default 5, or fewer if max_tokens)
    [[chunk_delay=S]]   seconds between two stream chunks (default 0)
    [[die_after=N]]     abort the connection after N content chunks (at once when not streaming)
    [[garbage]]         answer 200 with a body that is neither JSON nor server-sent events

Tests that run the app in-process can read, through these application keys:

    app[REQUESTS]        the last 1,000 POST requests, as {"path", "headers", "body", "raw"}
    app[DISCONNECTS]     how many streams lost their client before they ended
    app[ACTIVE_STREAMS]  how many streams are in progress

Run it with `python -m testing.fake_vllm --host 127.0.0.1 --port 8001 [--cluster local]
[--model NAME ...]`.

    directives.py  the fault directives of a prompt
    bodies.py      vLLM's answers, usage and errors, for each API
    streams.py     the streamed answers, paced and cut as the directives ask
    app.py         the routes, and the state tests read through the keys above
"""

from testing.fake_vllm.app import ACTIVE_STREAMS, DISCONNECTS, REQUESTS, create_backend_app
from testing.fake_vllm.bodies import error_response
from testing.fake_vllm.directives import NO_FAULTS, Faults, parse_faults

__all__ = [
    "ACTIVE_STREAMS",
    "DISCONNECTS",
    "NO_FAULTS",
    "REQUESTS",
    "Faults",
    "create_backend_app",
    "error_response",
    "parse_faults",
]
