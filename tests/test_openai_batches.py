"""OpenAI's Files and Batch API driven by the official `openai` client, as a researcher's script
drives it: upload, create, poll, download; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
import yaml

from proxy.records.schema import connect
from tests.conftest import CHAT_MODEL, TOKENS, Server, free_port, start_gateway, write_gateway_config
from tests.processes import backend_process, gateway_process
from tests.test_body_deadline import read_answer

FAST = {"poll_seconds": 0.05, "lease_seconds": 2}


def batch_config(directory: Path, backend_url: str, database_url: str, **section: Any) -> Path:
    config = write_gateway_config(directory, backend_url)
    document = yaml.safe_load(config.read_text())
    document["database_url"] = database_url
    document["openai_batches"] = {**FAST, **section}
    config.write_text(yaml.safe_dump(document))
    return config


@pytest.fixture
async def batch_gateway(backend: Server, tmp_path: Path, database_url: str) -> AsyncIterator[Server]:
    runner, server = await start_gateway(batch_config(tmp_path, backend.url, database_url))
    yield server
    await runner.cleanup()


def client(gateway: Server, user: str = "alice", path: str = "") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}{path}/v1", api_key=TOKENS[user], max_retries=0)


def line(custom_id: str, content: str = "Hello", model: str = CHAT_MODEL) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


async def finished(api: openai.AsyncOpenAI, batch_id: str, timeout: float = 30) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            batch = await api.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return batch
            await asyncio.sleep(0.05)


async def answered_lines(api: openai.AsyncOpenAI, batch_id: str, at_least: int) -> int:
    async with asyncio.timeout(20):
        while True:
            counts = (await api.batches.retrieve(batch_id)).request_counts
            if counts is not None and counts.completed >= at_least:
                return counts.completed
            await asyncio.sleep(0.05)


def parsed(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(text) for text in content.decode().splitlines()]


async def test_batch_runs_to_completed_with_output_and_error_files(batch_gateway: Server) -> None:
    lines = [line("one"), line("two", "Hi"), line("bad", "[[status=400]]")]
    async with client(batch_gateway) as api:
        uploaded = await api.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == (
            "batch",
            len(jsonl(lines)),
            "in.jsonl",
        )
        batch = await api.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "eval-1"},
        )
        assert batch.status == "validating" and batch.metadata == {"run": "eval-1"}
        done = await finished(api, batch.id)
        assert done.status == "completed", done.errors
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            3,
            2,
            1,
        )
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert done.output_file_id and done.error_file_id
        output = parsed((await api.files.content(done.output_file_id)).content)
        errors = parsed((await api.files.content(done.error_file_id)).content)
        assert (await api.files.content(uploaded.id)).content == jsonl(lines)
        with pytest.raises(openai.BadRequestError, match="completed cannot be cancelled"):
            await api.batches.cancel(batch.id)
    assert [item["custom_id"] for item in output] == ["one", "two"]
    assert all(item["response"]["status_code"] == 200 and item["error"] is None for item in output)
    assert output[0]["response"]["body"]["model"] == CHAT_MODEL
    assert [(item["custom_id"], item["response"]["status_code"]) for item in errors] == [("bad", 400)]


async def test_cluster_base_url_serves_files_and_batches(batch_gateway: Server) -> None:
    """`/{cluster}/{framework}/v1` as the client's base URL: the HPC route's POST tells them apart."""
    async with client(batch_gateway, path="/local/vllm") as api:
        uploaded = await api.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
        batch = await api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await finished(api, batch.id)
        assert done.status == "completed" and done.request_counts and done.request_counts.completed == 1
        listed = [item.id async for item in api.batches.list()]
    assert listed == [batch.id]


async def test_upload_is_checked_line_by_line(batch_gateway: Server) -> None:
    bad = jsonl([line("x"), line("x")]) + b"not json\n" + jsonl([{**line("y"), "url": "/v1/nothing"}])
    async with client(batch_gateway) as api:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.files.create(file=("in.jsonl", bad), purpose="batch")
        message = str(refused.value)
        assert "line 2: 'custom_id' 'x' is used by an earlier line" in message
        assert "line 3: not valid JSON" in message and "line 4: 'url' must be one of" in message
        with pytest.raises(openai.BadRequestError, match="'purpose' must be 'batch'"):
            await api.files.create(file=("in.jsonl", jsonl([line("x")])), purpose="assistants")
        assert [item.id async for item in api.files.list()] == []


async def test_a_model_the_user_may_not_use_fails_the_batch_with_its_line(batch_gateway: Server) -> None:
    async with client(batch_gateway) as api:
        uploaded = await api.files.create(
            file=("in.jsonl", jsonl([line("a"), line("b", model="no/such-model")])), purpose="batch"
        )
        batch = await api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await finished(api, batch.id)
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and done.errors.data is not None
    assert [(error.line, error.code) for error in done.errors.data] == [(2, "model_not_found")]


async def test_another_user_sees_nothing(batch_gateway: Server) -> None:
    async with client(batch_gateway) as alice, client(batch_gateway, "bob") as bob:
        uploaded = await alice.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
        batch = await alice.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for call in (
            bob.files.retrieve(uploaded.id),
            bob.files.content(uploaded.id),
            bob.files.delete(uploaded.id),
            bob.batches.retrieve(batch.id),
            bob.batches.cancel(batch.id),
            bob.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                await call
        assert [item.id async for item in bob.batches.list()] == []
        assert [item.id async for item in bob.files.list()] == []
        await finished(alice, batch.id)
        assert (await alice.files.delete(uploaded.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await alice.files.retrieve(uploaded.id)


async def test_list_pages_with_after_and_limit(batch_gateway: Server) -> None:
    async with client(batch_gateway) as api:
        uploaded = await api.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
        created = [
            (await api.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )).id
            for _ in range(5)
        ]  # fmt: skip
        first = await api.batches.list(limit=2)
        assert [item.id for item in first.data] == created[::-1][:2] and first.has_more
        every = [item.id async for item in api.batches.list(limit=2)]
        assert every == created[::-1]
        for batch_id in created:
            await finished(api, batch_id)


async def test_cancel_keeps_finished_results(backend: Server, tmp_path: Path, database_url: str) -> None:
    config = batch_config(tmp_path, backend.url, database_url, concurrent_per_batch=1)
    runner, gateway = await start_gateway(config)
    lines = [line(f"n{i}", "[[delay=0.1]]") for i in range(40)]
    try:
        async with client(gateway) as api:
            uploaded = await api.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = await api.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            await answered_lines(api, batch.id, at_least=2)
            cancelling = await api.batches.cancel(batch.id)
            assert cancelling.status == "cancelling" and cancelling.cancelling_at
            done = await finished(api, batch.id)
            assert done.status == "cancelled" and done.cancelled_at and done.output_file_id
            output = parsed((await api.files.content(done.output_file_id)).content)
            assert (
                await api.batches.cancel(batch.id)
            ).status == "cancelled"  # a second cancel changes nothing
    finally:
        await runner.cleanup()
    assert done.request_counts is not None
    assert 2 <= done.request_counts.completed < 40
    assert len(output) == done.request_counts.completed


async def test_a_killed_gateway_resumes_its_batch_answering_each_line_once(
    tmp_path: Path, database_url: str
) -> None:
    """SIGKILL mid-batch, then a new gateway on the same database: its runner takes the lapsed lease
    and skips every line already answered."""
    lines = [line(f"n{i}", "[[delay=0.05]]") for i in range(100)]
    async with backend_process(CHAT_MODEL) as (_, backend_url):
        config = batch_config(tmp_path, backend_url, database_url, concurrent_per_batch=2)
        port = free_port()
        async with gateway_process(config, port=port) as first:
            gateway = Server(url=f"{first.url}/resource_server", app=None)  # type: ignore[arg-type]
            async with client(gateway) as api:
                uploaded = await api.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
                batch = await api.batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                answered = await answered_lines(api, batch.id, at_least=10)
            first.process.send_signal(signal.SIGKILL)
            first.process.wait()
        async with gateway_process(config, port=port) as second:
            gateway = Server(url=f"{second.url}/resource_server", app=None)  # type: ignore[arg-type]
            async with client(gateway) as api:
                done = await finished(api, batch.id, timeout=60)
                assert done.status == "completed" and done.output_file_id
                output = parsed((await api.files.content(done.output_file_id)).content)
    assert answered < 100, "the batch ended before the gateway was killed"
    assert done.request_counts is not None and done.request_counts.completed == 100
    assert done.error_file_id is None
    assert [item["custom_id"] for item in output] == [f"n{i}" for i in range(100)]


async def test_size_limit_and_quota(backend: Server, tmp_path: Path, database_url: str) -> None:
    one = jsonl([line("a")])
    config = batch_config(
        tmp_path, backend.url, database_url, max_file_bytes=len(one) * 2, max_user_bytes=len(one) * 2
    )
    runner, gateway = await start_gateway(config)
    try:
        async with client(gateway) as api:
            with pytest.raises(openai.APIStatusError, match="larger than the gateway's limit") as large:
                await api.files.create(file=("in.jsonl", one * 3), purpose="batch")
            assert large.value.status_code == 413
            kept = [await api.files.create(file=("in.jsonl", one), purpose="batch") for _ in range(2)]
            with pytest.raises(openai.APIStatusError, match="quota") as quota:
                await api.files.create(file=("in.jsonl", one), purpose="batch")
            assert quota.value.status_code == 413
            await api.files.delete(kept[0].id)
            await api.files.create(file=("in.jsonl", one), purpose="batch")
    finally:
        await runner.cleanup()
    assert sorted(path.name for path in (tmp_path / "batch-files").iterdir())[0].startswith("file-")
    assert not [path for path in (tmp_path / "batch-files").iterdir() if path.name.startswith(".")]


async def test_expiry_stops_the_batch_and_reports_the_lines_not_run(
    backend: Server, tmp_path: Path, database_url: str
) -> None:
    config = batch_config(tmp_path, backend.url, database_url, concurrent_per_batch=1)
    runner, gateway = await start_gateway(config)
    lines = [line(f"n{i}", "[[delay=0.1]]") for i in range(30)]
    try:
        async with client(gateway) as api:
            uploaded = await api.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = await api.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
            )
            await answered_lines(api, batch.id, at_least=1)
            database = await connect(database_url)
            try:  # the completion window runs out now
                await database.execute("UPDATE openai_batches SET expires_at = 0 WHERE id = ?", batch.id)
            finally:
                await database.close()
            done = await finished(api, batch.id)
            assert done.status == "expired" and done.expired_at and done.error_file_id
            output = parsed((await api.files.content(done.output_file_id or "")).content)
            errors = parsed((await api.files.content(done.error_file_id)).content)
    finally:
        await runner.cleanup()
    assert {item["error"]["code"] for item in errors} == {"batch_expired"}
    assert sorted(item["custom_id"] for item in output + errors) == sorted(f"n{i}" for i in range(30))


async def test_a_stalled_upload_is_408_after_the_deployed_grace_and_leaves_no_file(
    backend: Server, tmp_path: Path
) -> None:
    """An upload may be larger than any request body, so it has no total deadline, but a sender that
    stops (or dribbles) cannot hold the connection and a temporary file: the body rate applies, with
    the deployed defaults (10 s of grace, then 8,192 bytes/s). The store does not matter: SQLite only."""
    runner, gateway = await start_gateway(
        batch_config(tmp_path, backend.url, f"sqlite:///{tmp_path / 'g.db'}")
    )
    try:
        await stall_an_upload(gateway)
    finally:
        await runner.cleanup()
    assert not [path for path in (tmp_path / "batch-files").glob("*") if path.is_file()]


async def stall_an_upload(gateway: Server) -> None:
    """Sends the head of a 1 MB upload and a few bytes, then nothing."""
    address = urlsplit(gateway.url)
    head = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
    ) + jsonl([line("a")])
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(
        (
            "POST /resource_server/v1/files HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {TOKENS['alice']}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n"
        ).encode()
        + head
    )
    await writer.drain()
    started = asyncio.get_running_loop().time()
    status, headers, answer = await asyncio.wait_for(read_answer(reader), timeout=20)
    waited = asyncio.get_running_loop().time() - started
    writer.close()
    assert (status, headers.get("connection")) == (408, "close")  # closed after aiohttp's lingering read
    assert 9.5 < waited < 13, waited
    assert json.loads(answer)["error"]["code"] == "request_timeout"
