"""A bounded soak: a gateway process, as deployed, under a minute of mixed load from a few hundred
concurrent clients on loopback, with about 1% of the requests failing at the backend.

The load after the warm-up lasts 30 s: at the 1,900 requests a second of an idle machine
(docs/performance.md) that is some 55,000 requests, three times the warm-up's, so state kept per
request served, from about 350 bytes each, grows the resident memory past its bound.

Afterwards every request has had its answer, the gateway's memory and open files are back to their
level after the warm-up (nothing grows with the number of requests served), and every request has
its record in the database. The figures are printed for docs/performance.md (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.processes import backend_process, gateway_process
from tests.support import CHAT_MODEL, EMBED_MODEL, auth, chat, free_port, write_gateway_config

pytestmark = pytest.mark.alone(
    "300 concurrent clients for 40 s, and a bound on RSS growth: a load of its own"
)

CLIENTS = 300
WARM_UP_SECONDS = 10.0
LOAD_SECONDS = 30.0
FAILING = 0.01
"""The share of requests whose prompt makes the backend answer 500 (the gateway answers 502)."""
RSS_GROWTH = 0.10
RSS_SLACK_KB = 10 * 1024
FD_SLACK = 16


def process_status(pid: int) -> tuple[int, int]:
    """The process's resident memory in kB and its open file descriptors."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Load:
    """What the clients sent and what they got."""

    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(kind of request, status) → how many."""
    wrong: list[str] = field(default_factory=list)
    """Requests that got no answer, or not the one expected."""

    @property
    def sent(self) -> int:
        return sum(self.answers.values()) + len(self.wrong)


def next_request(random_: random.Random) -> tuple[str, str, dict[str, Any], int]:
    """(kind, OpenAI path, body, expected status) of a mix like a cluster's: mostly chat, some
    streamed, a few completions and embeddings."""
    failing = random_.random() < FAILING
    prompt = "[[status=500]]" if failing else f"Question {random_.randrange(10**6)}"
    expected = 502 if failing else 200
    roll = random_.random()
    if roll < 0.45:
        return "chat", "chat/completions", chat(prompt), expected
    if roll < 0.75:
        return "stream", "chat/completions", chat(prompt + " [[chunks=20]]", stream=True), expected
    if roll < 0.90:
        return "completion", "completions", {"model": CHAT_MODEL, "prompt": prompt}, expected
    return "embedding", "embeddings", {"model": EMBED_MODEL, "input": prompt}, expected


async def client(http: aiohttp.ClientSession, base: str, until: float, seed: int, load: Load) -> None:
    random_ = random.Random(seed)
    while time.monotonic() < until:
        kind, path, body, expected = next_request(random_)
        try:
            async with http.post(f"{base}/local/vllm/v1/{path}", json=body, headers=auth()) as response:
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            load.wrong.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        complete = payload.endswith(b"data: [DONE]\n\n") if kind == "stream" and expected == 200 else True
        if response.status != expected or not complete:
            load.wrong.append(f"{kind}: {response.status} {payload[-200:]!r}")
            continue
        load.answers[kind, response.status] += 1


async def run_load(base: str, seconds: float, load: Load, seed: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(http, base, until, seed + n, load) for n in range(CLIENTS)))


@pytest.fixture
async def backend() -> AsyncIterator[str]:
    """The fake backend in its own process, so that it does not share the load generator's loop."""
    async with backend_process(CHAT_MODEL, EMBED_MODEL) as (_, url):
        yield url


def stored_requests(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        count: int = connection.execute(
            "SELECT COUNT(*) FROM requests WHERE route LIKE '%openai_path%'"
        ).fetchone()[0]
    return count


async def eventually_stored(database: Path, expected: int, timeout: float = 30) -> int:
    """The record sink writes in batches, every 2 s at the latest."""
    deadline = time.monotonic() + timeout
    while (count := stored_requests(database)) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return count


async def settled_fds(pid: int, limit: int, timeout: float = 40) -> int:
    """Idle connections to the backend stay pooled for a while (aiohttp: 15 s) before they close."""
    deadline = time.monotonic() + timeout
    while (fds := process_status(pid)[1]) > limit and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return fds


@pytest.mark.timeout(300)
async def test_soak(backend: str, tmp_path: Path) -> None:
    port = free_port()
    config = write_gateway_config(tmp_path, backend)
    document = yaml.safe_load(config.read_text())
    document["request_log"] = {"stdout": False, "store": True}
    document["database_url"] = "sqlite:///soak.db"
    config.write_text(yaml.safe_dump(document))
    base = f"http://127.0.0.1:{port}/resource_server"
    async with gateway_process(config, port=port) as gateway:
        rss_start, fds_start = process_status(gateway.pid)
        load = Load()
        await run_load(base, WARM_UP_SECONDS, load, seed=0)
        rss_warm, fds_warm = process_status(gateway.pid)
        started = time.monotonic()
        await run_load(base, LOAD_SECONDS, load, seed=CLIENTS)
        duration = time.monotonic() - started
        fds_after = await settled_fds(gateway.pid, fds_start + FD_SLACK)
        rss_after = process_status(gateway.pid)[0]
        stored = await eventually_stored(tmp_path / "soak.db", load.sent)
    print(
        f"\nsoak: {CLIENTS} clients, {load.sent} requests in {WARM_UP_SECONDS:g} s warm-up + {duration:.1f} s"
        f" ({load.sent / (WARM_UP_SECONDS + duration):.0f}/s), answers {dict(sorted(load.answers.items()))}"
        f"\nsoak: RSS {rss_start} kB at start, {rss_warm} kB after the warm-up, {rss_after} kB after the"
        f" load; open files {fds_start} at start, {fds_warm} after the warm-up, {fds_after} after the load;"
        f" records stored {stored}"
    )
    assert not load.wrong, (len(load.wrong), Counter(w[:80] for w in load.wrong).most_common(10))
    assert load.answers["stream", 200] and load.answers["chat", 502], "the mix did not happen"
    assert rss_after <= rss_warm * (1 + RSS_GROWTH) + RSS_SLACK_KB
    assert fds_after <= fds_start + FD_SLACK
    assert stored == load.sent
