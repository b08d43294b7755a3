"""How the fake vLLM streams a reply: the server-sent events of chat and text completions, and the
named events of the Responses and Messages APIs, each chunk paced and cut as the directives ask."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from testing.fake_vllm.bodies import (
    DONE,
    REPLY,
    chunk_choice,
    message_object,
    named_event,
    output_message,
    response_object,
    responses_usage,
    stream_length,
    usage_json,
)
from testing.fake_vllm.directives import Faults

IdMaker = Callable[[str], str]
"""Gives the next id with a prefix (`chatcmpl-`, `resp_`, `msg_`): ids are unique per backend."""


@dataclass(frozen=True, slots=True)
class Generation:
    """What one completion request asks for, read once from its body."""

    chat: bool
    model_json: str
    n: int
    max_tokens: int
    prompt_tokens: int
    faults: Faults
    include_usage: bool


class Died(Exception):
    """The stream cut its connection on purpose (`[[die_after=N]]`)."""


def abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def _paced(request: web.Request, faults: Faults, chunks: int) -> AsyncIterator[int]:
    """The positions of a stream's content chunks, `chunk_delay` apart. With `die_after` the
    connection is cut after that many, or after the last one, and `Died` ends the writer."""
    for position in range(chunks):
        if faults.die_after is not None and position >= faults.die_after:
            break
        if position and faults.chunk_delay:
            await asyncio.sleep(faults.chunk_delay)
        yield position
    if faults.die_after is not None:
        abort(request)
        raise Died


async def write_completion_events(
    request: web.Request, response: web.StreamResponse, generation: Generation, next_id: IdMaker
) -> None:
    """Chat and text completion chunks as vLLM sends them, `data: [DONE]` last."""
    faults = generation.faults
    chat = generation.chat
    prefix, kind = ("chatcmpl-", "chat.completion.chunk") if chat else ("cmpl-", "text_completion")
    head = (
        f'data: {{"id":"{next_id(prefix)}","object":"{kind}",'
        f'"created":{int(time.time())},"model":{generation.model_json},"choices":['
    ).encode()
    chunks, cut_short = stream_length(faults, generation.max_tokens)
    choices = range(generation.n)
    async for position in _paced(request, faults, chunks):
        for index in choices:
            await response.write(head + chunk_choice(chat, index, position, None) + b"]}\n\n")
    finish = "length" if cut_short else "stop"
    for index in choices:
        await response.write(head + chunk_choice(chat, index, chunks, finish) + b"]}\n\n")
    if generation.include_usage:
        usage = usage_json(generation.prompt_tokens, chunks * generation.n)
        await response.write(head + f'],"usage":{usage}}}\n\n'.encode())
    await response.write(DONE)
    await response.write_eof()


async def write_response_events(
    request: web.Request, response: web.StreamResponse, generation: Generation, next_id: IdMaker
) -> None:
    """The events OpenAI's Responses API streams for a text reply, in its order."""
    sequence = itertools.count()

    async def send(kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": next(sequence), **fields}
        await response.write(named_event(kind, payload))

    response_id, item_id = next_id("resp_"), next_id("msg_")
    model = json.loads(generation.model_json)
    started = response_object(response_id, model, "in_progress", [], None)
    await send("response.created", response=started)
    await send("response.in_progress", response=started)
    await send("response.output_item.added", output_index=0, item=output_message(item_id, None))
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    await send("response.content_part.added", **where, part=part)
    chunks, cut_short = stream_length(generation.faults, generation.max_tokens)
    tokens = []
    async for position in _paced(request, generation.faults, chunks):
        tokens.append(REPLY[position % len(REPLY)])
        await send("response.output_text.delta", **where, delta=tokens[-1], logprobs=[])
    item = output_message(item_id, "".join(tokens))
    await send("response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[])
    await send("response.content_part.done", **where, part=item["content"][0])
    await send("response.output_item.done", output_index=0, item=item)
    status = "incomplete" if cut_short else "completed"
    usage = responses_usage(generation.prompt_tokens, chunks)
    await send(f"response.{status}", response=response_object(response_id, model, status, [item], usage))
    await response.write_eof()


async def write_message_events(
    request: web.Request, response: web.StreamResponse, generation: Generation, next_id: IdMaker
) -> None:
    """The events Anthropic's Messages API streams for a text reply: input tokens come with
    `message_start`, the output count with `message_delta`."""

    async def send(kind: str, **fields: Any) -> None:
        await response.write(named_event(kind, {"type": kind, **fields}))

    model = json.loads(generation.model_json)
    usage = {"input_tokens": generation.prompt_tokens, "output_tokens": 1}
    await send("message_start", message=message_object(next_id("msg_"), model, None, None, usage))
    await send("content_block_start", index=0, content_block={"type": "text", "text": ""})
    await send("ping")
    chunks, cut_short = stream_length(generation.faults, generation.max_tokens)
    async for position in _paced(request, generation.faults, chunks):
        delta = {"type": "text_delta", "text": REPLY[position % len(REPLY)]}
        await send("content_block_delta", index=0, delta=delta)
    await send("content_block_stop", index=0)
    stop = {"stop_reason": "max_tokens" if cut_short else "end_turn", "stop_sequence": None}
    await send("message_delta", delta=stop, usage={"output_tokens": chunks})
    await send("message_stop")
    await response.write_eof()
