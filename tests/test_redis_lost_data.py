"""A Redis that lost data is detected, and a dead letter is not lost while it is down
(a real redis-server of each test's own: the tests delete its keys and stop it)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from cli_process import until
from redis_server import RedisServer, running_redis
from support import Ping, ping_xml, pong

from xml_pipeline import (
    BackendCorrupted,
    FrameCorrupted,
    HandlerMetadata,
    Huh,
    Listener,
    Organism,
    Reply,
    StreamPump,
    load_organism,
)
from xml_pipeline import pump as pump_module
from xml_pipeline.backends import HistoryLimits, Slot
from xml_pipeline.backends.redis import RedisBackend

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "organisms" / "hello.yaml"
GREETING = '<Greeting xmlns="https://example.org/hello"><name>{}</name></Greeting>'
PREFIX = "lost"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client: what an operator, an eviction or a restore does."""
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def backend_on(url: str, **options: Any) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_url(url, HistoryLimits(ttl_s=600), prefix=PREFIX, **options)
    try:
        yield backend
    finally:
        await backend.aclose()


def slot(mid: str, direction: str = "in") -> Slot:
    return Slot(0, direction, "a", "b", "{urn:x}P", mid, 1_700_000_000.5, b"<P/>")  # type: ignore[arg-type]


# -- a frame's history: P:hist:<t> and P:hidx:<t> ---------------------------------------


async def test_a_history_whose_index_was_lost_is_refused_not_counted_from_0(
    server: RedisServer,
) -> None:
    async with backend_on(server.url) as backend, raw_client(server.url) as raw:
        for i in range(3):
            assert await backend.buffer_append("t", slot(f"m{i}")) == i
        await raw.delete(f"{PREFIX}:hidx:t")
        with pytest.raises(BackendCorrupted) as caught:
            await backend.buffer_append("t", slot("m3"))
        text = str(caught.value)
        assert f"{PREFIX}:hist:t holds 3 slot(s) but {PREFIX}:hidx:t" in text, text
        assert "is missing" in text and "noeviction" in text and "Delete the keys" in text
        # Nothing was written, and a retry is refused the same way.
        assert await raw.llen(f"{PREFIX}:hist:t") == 3
        assert not await raw.exists(f"{PREFIX}:hidx:t")
        with pytest.raises(BackendCorrupted):
            await backend.buffer_append("t", slot("m0"))
        with pytest.raises(BackendCorrupted, match="says 0 were written"):
            await backend.buffer_get_slot("t", 1)
        # What the message says to do works: the frame starts afresh.
        assert await backend.buffer_delete_thread("t")
        assert await backend.buffer_append("t", slot("m3")) == 0


async def test_an_index_behind_its_history_or_a_lost_history_is_refused(
    server: RedisServer,
) -> None:
    async with backend_on(server.url) as backend, raw_client(server.url) as raw:
        for i in range(4):
            await backend.buffer_append("t", slot(f"m{i}"))
        await raw.hset(f"{PREFIX}:hidx:t", "next", 2)  # a stale copy of the index
        with pytest.raises(BackendCorrupted, match=r"holds 4 slot\(s\) but .*says only 2"):
            await backend.buffer_append("t", slot("m4"))
        assert await raw.llen(f"{PREFIX}:hist:t") == 4

        await backend.buffer_append("u", slot("m0"))
        await backend.buffer_append("u", slot("m1"))
        await raw.delete(f"{PREFIX}:hist:u")
        with pytest.raises(BackendCorrupted, match=f"{PREFIX}:hist:u is missing but .* says 2"):
            await backend.buffer_append("u", slot("m2"))
        assert not await raw.exists(f"{PREFIX}:hist:u"), "the refused push was undone"
        # The idempotent answer for a slot appended before is still given.
        assert await backend.buffer_append("u", slot("m1")) == 1


# -- a registry entry: P:chain:<chain> and P:uuid:<uuid> --------------------------------


async def test_half_a_registry_entry_is_refused(server: RedisServer) -> None:
    chain = '["caller","root","greeter"]'
    async with backend_on(server.url) as backend, raw_client(server.url) as raw:
        await backend.registry_set(chain, "u1")
        await raw.delete(f"{PREFIX}:uuid:u1")
        with pytest.raises(BackendCorrupted, match=f"maps to u1 but {PREFIX}:uuid:u1 is missing"):
            await backend.registry_get_uuid(chain)
        # The pump's child(): the chain is known, its frame must be whole.
        with pytest.raises(BackendCorrupted, match=f"{PREFIX}:uuid:u1 is missing"):
            await backend.registry_setdefault(chain, "u2")

        await backend.registry_set('["c","r"]', "u3")
        await raw.delete(f'{PREFIX}:chain:["c","r"]')
        with pytest.raises(BackendCorrupted, match=r'maps to \["c","r"\] but .* is missing'):
            await backend.registry_get_chain("u3")
        await raw.set(f'{PREFIX}:chain:["c","r"]', "u9")
        with pytest.raises(BackendCorrupted, match="maps to u9"):
            await backend.registry_get_chain("u3")

        # Deleting the entry (what the message says) makes the chain usable again.
        await raw.delete(f"{PREFIX}:chain:{chain}")
        assert await backend.registry_setdefault(chain, "u2") == "u2"
        assert await backend.registry_get_chain("u2") == chain
        assert await backend.registry_get_chain("unknown") is None


# -- the pump on a damaged frame ---------------------------------------------------------


def hello_on(url: str, **options: Any) -> Any:
    organism = load_organism(HELLO, backend=url)
    return dataclasses.replace(organism, backend_options={"prefix": PREFIX, **options})


async def greet(pump: StreamPump, name: str, thread: str | None = None) -> Any:
    return await pump.request(GREETING.format(name), to="greeter", sender=f"caller-{name}",
                              thread=thread, timeout=30)  # fmt: skip


async def frame_of(backend: Any, root: str, hops: list[str]) -> str:
    """The uuid of the frame ``hops`` below the conversation ``root``."""
    for uuid, chain in (await backend.registry_list_all()).items():
        parts = json.loads(chain) if chain.startswith("[") else None
        if parts is not None and parts[1] == root and parts[2:] == hops:
            return str(uuid)
    raise LookupError(f"no frame {hops} in conversation {root}")


async def test_a_conversation_on_a_damaged_frame_gets_a_huh_and_the_pump_goes_on(
    server: RedisServer,
) -> None:
    async with StreamPump(hello_on(server.url)) as pump, raw_client(server.url) as raw:
        first = await greet(pump, "ann", thread="conv-a")
        assert first.payload.text == "HELLO, ANN!"
        frame = await frame_of(pump.backend, "conv-a", ["greeter"])
        await raw.delete(f"{PREFIX}:hidx:{frame}")

        damaged, *others = await asyncio.gather(
            greet(pump, "ann", thread="conv-a"), *(greet(pump, f"p{i}") for i in range(20))
        )
        assert isinstance(damaged.payload, Huh), damaged.payload
        assert damaged.payload.code == "backend-corrupted"
        assert f"{PREFIX}:hidx:{frame}" in damaged.payload.message
        with pytest.raises(FrameCorrupted):
            damaged.raise_for_huh()
        assert [r.payload.text for r in others] == [f"HELLO, P{i}!" for i in range(20)]
        await pump.wait_idle()
        letters = await pump.backend.deadletter_list()
        assert [(d.code, d.listener, d.thread_id) for d in letters] == [
            ("backend-corrupted", "greeter", frame)
        ]
        # The history was not counted again from 0.
        assert await raw.llen(f"{PREFIX}:hist:{frame}") == 4
        assert (await greet(pump, "bob")).payload.text == "HELLO, BOB!"


async def test_a_frame_missing_half_its_registry_entry_is_a_typed_error_at_ingress(
    server: RedisServer,
) -> None:
    async with StreamPump(hello_on(server.url)) as pump:
        await greet(pump, "ann", thread="conv-b")
        frame = await frame_of(pump.backend, "conv-b", ["greeter"])
    async with raw_client(server.url) as raw:
        await raw.delete(f"{PREFIX}:uuid:{frame}")
    # A new pump (no cached frames) resolves the conversation's frames from Redis.
    async with StreamPump(hello_on(server.url)) as pump:
        with pytest.raises(BackendCorrupted, match=f"{PREFIX}:uuid:{frame} is missing"):
            await greet(pump, "ann", thread="conv-b")
        assert (await greet(pump, "bob")).payload.text == "HELLO, BOB!"
        assert pump.statistics().in_pump == 0


# -- dead letters while Redis is down: the spill ------------------------------------------


def failing_organism(url: str, handler: Any) -> Organism:
    """One listener, ``boom``; Redis calls fail at once while it is down (no retries)."""
    return Organism(
        name="spill",
        listeners=(Listener("boom", (Ping,), handler, concurrency=32),),
        backend=url,
        backend_options={"prefix": PREFIX, "retries": 0, "outage_s": 0, "connect_timeout_s": 1},
    )


async def rejected(pump: StreamPump, n: int) -> None:
    """``n`` malformed inputs: each is a dead letter, and needs no Redis but for that."""
    for i in range(n):
        assert await pump.inject(f"<not-xml {i}".encode()) is None


async def test_dead_letters_made_while_redis_is_down_are_kept_and_written_when_it_is_back(
    server: RedisServer,
) -> None:
    entered = 0
    release = asyncio.Event()

    async def fail_later(payload: Ping, meta: HandlerMetadata) -> None:
        nonlocal entered
        entered += 1
        await release.wait()
        raise RuntimeError(f"no {payload.n}")

    replies: list[Reply] = []
    async with StreamPump(failing_organism(server.url, fail_later), egress=replies.append) as pump:
        requests = [
            asyncio.create_task(pump.request(ping_xml(i), to="boom", timeout=30)) for i in range(20)
        ]

        def settled() -> bool:
            boom = pump.statistics().listeners["boom"]
            return boom.received == 20 and boom.in_flight == entered and boom.queued == 20 - entered

        await until(settled, "every request in its handler or queued behind one")
        await asyncio.to_thread(server.stop)
        release.set()  # the handlers fail (those queued fail to record their input)
        answers = await asyncio.gather(*requests)
        await rejected(pump, 5)
        stats = pump.statistics()
        assert (stats.spilled, stats.spilled_total, stats.spill_dropped) == (25, 25, 0), stats
        assert all(isinstance(a.payload, Huh) for a in answers)

        await asyncio.to_thread(server.start)
        await until(lambda: pump.statistics().spilled == 0, "the kept dead letters written")
        letters = await pump.backend.deadletter_list()
        stats = pump.statistics()
    assert (stats.spilled_total, stats.spill_dropped, stats.dead_letters) == (25, 0, 25)
    assert len(letters) == 25 and len({d.id for d in letters}) == 25
    failed = [d for d in letters if d.listener == "boom"]
    assert sorted(d.message_id or "" for d in failed) == sorted(a.re or "" for a in answers)
    assert {d.code for d in failed} <= {"handler-error", "backend-unavailable"}
    assert entered == 0 or any(d.code == "handler-error" for d in failed)
    assert [d.code for d in letters if d.listener is None] == ["malformed"] * 5


async def test_the_spill_is_bounded_and_counts_what_it_drops(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pump_module, "SPILL_LETTERS", 5)
    async with StreamPump(failing_organism(server.url, pong)) as pump:
        await asyncio.to_thread(server.stop)
        await rejected(pump, 8)
        stats = pump.statistics()
        assert (stats.spilled, stats.spilled_total, stats.spill_dropped) == (5, 5, 3), stats
        assert "full (5 letters or 16777216 bytes); 1 dropped so far" in caplog.text
        await asyncio.to_thread(server.start)
        await until(lambda: pump.statistics().spilled == 0, "the kept dead letters written")
        letters = await pump.backend.deadletter_list()
    assert [d.data for d in letters] == [f"<not-xml {i}".encode() for i in range(5)]


async def test_the_spill_is_written_at_shutdown(server: RedisServer) -> None:
    async with StreamPump(failing_organism(server.url, pong)) as pump:
        await asyncio.to_thread(server.stop)
        await rejected(pump, 5)
        assert pump.statistics().spilled == 5
        await asyncio.to_thread(server.start)
    assert pump.statistics().spilled == 0
    async with backend_on(server.url) as backend:
        letters = await backend.deadletter_list()
    assert [d.data for d in letters] == [f"<not-xml {i}".encode() for i in range(5)]
