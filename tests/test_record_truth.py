"""A request record is never dropped nor falsified for its content (issue 19.7): undecodable
X-Forwarded-For, NUL in a path, a lone surrogate in a request, and usage a backend got wrong, through a
real gateway into SQLite and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.records.record import RequestRecord
from proxy.records.record_sink import RecordSink
from proxy.records.schema import connect
from proxy.records.usage_store import UsageStore
from tests.support import CHAT_MODEL, TOKENS, Server, chat, start, start_gateway, write_gateway_config

MAX_TOKENS = 2**31 - 1


async def reported_usage(request: web.Request) -> web.Response:
    """A backend that reports whatever usage the prompt holds, as JSON: a broken or hostile one."""
    body = await request.json()
    usage = json.loads(body["messages"][-1]["content"])
    answer = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": usage,
    }  # fmt: skip
    return web.json_response(answer)


@pytest.fixture
async def lying_backend() -> AsyncIterator[Server]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", reported_usage)
    runner, url = await start(app)
    yield Server(url=url, app=app)
    await runner.cleanup()


async def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Bytes no HTTP client library would send: what a hostile client or a broken proxy can."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer.split(b" ", 2)[1]


async def test_records_survive_their_content(
    lying_backend: Server, tmp_path: Path, database_url: str
) -> None:
    config = write_gateway_config(tmp_path, lying_backend.url)
    document = yaml.safe_load(config.read_text())
    document |= {"database_url": database_url, "request_log": {"stdout": False, "store_prompts": True}}
    config.write_text(yaml.safe_dump(document))
    runner, gateway = await start_gateway(config)
    path = "/resource_server/local/vllm/v1/chat/completions"
    authorization = f"Authorization: Bearer {TOKENS['alice']}\r\n".encode()

    async def post(
        request_id: str, content: str, forwarded: bytes = b"", at: str = path, model: str = CHAT_MODEL
    ) -> bytes:
        head = (
            f"POST {at} HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: {request_id}\r\n".encode()
            + authorization
            + b"Content-Type: application/json\r\n"
            + (b"X-Forwarded-For: " + forwarded + b"\r\n" if forwarded else b"")
        )
        return await raw_request(gateway.url, head, json.dumps(chat(content, model)).encode())

    def usage(**counts: Any) -> str:
        return json.dumps(counts)

    try:
        statuses = [
            await post("xff", usage(prompt_tokens=1), forwarded=b"\xff\xfe, 127.0.0.1"),
            await post("xff-inside", usage(prompt_tokens=1), forwarded=b"\xff, 10.1.2.3"),
            await post("nul", usage(prompt_tokens=1), at="/resource_server/local/vllm/v1/chat%00"),
            await post("surrogate", "\ud800" + usage(prompt_tokens=1), model="no\udcffsuch"),
            await post(
                "negative", usage(prompt_tokens=-999_999, completion_tokens=11, total_tokens=-999_988)
            ),
            await post("huge", usage(prompt_tokens=2**63, completion_tokens=2**64, total_tokens=2**63 - 1)),
        ]
    finally:
        await runner.cleanup()
    assert statuses[:2] == [b"200", b"200"] and statuses[2] == b"404" and statuses[4:] == [b"200", b"200"]
    database = await connect(database_url)
    try:
        rows = {row["request_id"]: row for row in await database.fetch("SELECT * FROM requests")}
        report = await UsageStore(database).usage(since=0, by="user")
    finally:
        await database.close()
    assert set(rows) == {"xff", "xff-inside", "nul", "surrogate", "negative", "huge"}
    assert rows["xff"]["client_ip"] == "127.0.0.1", "not an address: the nearest hop that is one"
    assert rows["xff-inside"]["client_ip"] == "10.1.2.3"
    assert rows["nul"]["path"] == "/resource_server/local/vllm/v1/chat\\x00"
    assert "\\x00" in rows["nul"]["error"]

    def tokens(row: dict[str, Any]) -> tuple[int | None, ...]:
        return row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]

    assert tokens(rows["negative"]) == (None, 11, None), "a negative count is no count"
    assert tokens(rows["huge"]) == (MAX_TOKENS,) * 3
    assert all(row["total_tokens"] is None or row["total_tokens"] >= 0 for row in rows.values())
    assert all(row["total_tokens"] >= 0 for row in report), report


async def test_a_record_refused_as_it_is_is_stored_escaped_and_clamped(database_url: str) -> None:
    """The last resort, for text or numbers that reach a record by a way the edge does not check (a
    site's adaptor, a user name): the batch is refused, the record goes in made storable."""
    database = await connect(database_url)
    try:
        sink = RecordSink(UsageStore(database), batch_size=10, flush_seconds=60)
        sink.start()
        good, bad = record("good"), record("bad")
        bad.username, bad.task_id, bad.prompt_tokens, bad.total_tokens = "x\udcff\x00y", "t\ud800", 2**40, -5
        sink.submit([good, bad])
        await sink.close()
        rows = {row["request_id"]: row for row in await database.fetch("SELECT * FROM requests")}
    finally:
        await database.close()
    assert (sink.written, sink.rejected) == (2, 0)
    assert rows["bad"]["username"] == "x\\udcff\\x00y" and rows["bad"]["task_id"] == "t\\ud800"
    assert (rows["bad"]["prompt_tokens"], rows["bad"]["total_tokens"]) == (MAX_TOKENS, None)
    assert rows["good"]["username"] == "alice@uni.edu"


def record(request_id: str) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, started_at=1.0, duration_ms=1.0, ttfc_ms=None, method="POST", route="/r",
        path="/p", status=200, user_id="a", username="alice@uni.edu", cluster=None, framework=None,
        model=None, endpoint_slug=None, stream=False, prompt_tokens=1, completion_tokens=1,
        total_tokens=2, task_id=None, client_ip=None, error=None,
    )  # fmt: skip
