"""A flood of hostile input cannot grow the dead letters past their byte budget.

10,000 malformed lines of 70 KB each (700 MB) from one outside sender, on the memory
backend and on a real redis-server of the test's own. Before the budget, every one was
kept with 64 KiB of its input: Redis grew from 0.9 MiB to 941 MiB. Now each is still
answered (a ``Huh``) and listed as a dead letter, but past the budget only its sample
is kept, and the rejections are counted per code; the organism keeps serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer, running_redis
from support import Ping, Pong, pong

from xml_pipeline import Listener, Organism, Reply, StreamPump
from xml_pipeline.backends import HistoryLimits
from xml_pipeline.backends.base import OVER_BUDGET_NOTE, SAMPLE_BYTES

FLOOD = 10_000
LINE = b"<Ping>" + b"x" * 70_000  # never closed: malformed once the parser reaches its end
BUDGET = 8 * 1024 * 1024
PER_SAMPLE = 1024
"""What a sample costs at most beyond the budget: its 256 bytes, the reason, the rest
of the letter (and on Redis the JSON around it, base64, the indexes)."""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def _used_memory(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("memory")
    finally:
        await client.aclose()
    return int(info["used_memory"])


@asynccontextmanager
async def _organism(url: str, replies: list[Reply]) -> AsyncIterator[StreamPump]:
    organism = Organism(
        name="flooded",
        listeners=(Listener("echo", (Ping,), pong),),
        backend=url,
        history=HistoryLimits(dead_letter_budget_bytes=BUDGET),
    )
    async with StreamPump(organism, egress=replies.append) as pump:
        yield pump


async def _flood_and_serve(pump: StreamPump, replies: list[Reply]) -> None:
    for _ in range(FLOOD):
        assert await pump.inject(LINE, sender="mallory") is None
    huhs = [r for r in replies if r.is_huh]
    assert len(huhs) == FLOOD, "every line is answered"
    assert {r.payload.code for r in huhs} == {"malformed"}  # type: ignore[attr-defined]
    answer = await pump.request(Ping(n=7), to="echo", timeout=10)
    assert isinstance(answer.payload, Pong) and answer.payload.n == 7, "still serving"

    info = await pump.backend.info()
    assert info["dead_letters"] == FLOOD, "every rejection is visible"
    over = info["dead_letters_over_budget"]
    assert over == info["dead_letters_over_budget:malformed"]
    kept_whole = BUDGET // HistoryLimits().dead_letter_bytes  # each keeps 64 KiB of its line
    assert FLOOD - kept_whole - 1 <= over < FLOOD, info
    assert info["dead_letter_bytes"] <= BUDGET + FLOOD * PER_SAMPLE, info
    letters = await pump.backend.deadletter_list()
    whole = [x for x in letters if not x.reason.endswith(OVER_BUDGET_NOTE)]
    samples = [x for x in letters if x.reason.endswith(OVER_BUDGET_NOTE)]
    assert len(samples) == over and {len(x.data) for x in samples} == {SAMPLE_BYTES}
    assert sum(len(x.data) for x in whole) <= BUDGET
    assert {x.sender for x in letters} == {"mallory"}


async def test_a_flood_stays_within_the_budget_in_memory() -> None:
    replies: list[Reply] = []
    async with _organism("memory://", replies) as pump:
        await _flood_and_serve(pump, replies)


async def test_a_flood_stays_within_the_budget_on_redis(server: RedisServer) -> None:
    replies: list[Reply] = []
    before = await _used_memory(server.url)
    async with _organism(server.url, replies) as pump:
        await _flood_and_serve(pump, replies)
    grown = await _used_memory(server.url) - before
    # Before the budget: 941 MiB. The JSON holds the input in base64 (4/3).
    assert grown < BUDGET * 4 // 3 + FLOOD * PER_SAMPLE + (4 << 20), f"Redis grew {grown} bytes"
