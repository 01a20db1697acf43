"""The Redis Streams transport's primitives against a real redis-server: reading,
claiming, and the commit that ends a delivery once (the fence, history, outputs and
acknowledgement together)."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from redis_server import RedisServer

from xml_pipeline.backends import HistoryLimits, Slot
from xml_pipeline.backends.redis import RedisBackend
from xml_pipeline.transport.redis import Commit, Entry, RedisStreams


def _slot(direction: str, message_id: str) -> Slot:
    return Slot(0, direction, "a", "b", "{urn:x}P", message_id, 1.5, b"<P/>")


@asynccontextmanager
async def streams(
    server: RedisServer, limits: HistoryLimits | None = None
) -> AsyncIterator[RedisStreams]:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    backend = RedisBackend.from_url(server.url, limits or HistoryLimits(), prefix=prefix)
    transport = RedisStreams(server.url, backend)
    try:
        yield transport
    finally:
        await transport.aclose()
        await backend.aclose()


async def _stream(transport: RedisStreams, name: str) -> bytes:
    stream = transport.inbox(name)
    await transport.ensure_group(stream)
    return stream


async def test_a_delivery_commits_its_history_and_outputs_and_leaves_nothing_pending(
    redis_server: RedisServer,
) -> None:
    async with streams(redis_server) as t:
        inbox, out = await _stream(t, "greeter"), await _stream(t, "shouter")
        accepted = await t.add(inbox, {b"xml": b"<message/>", b"frame": b"f1"})
        [entry] = await t.read("node-a", [inbox])
        assert (entry.id, entry.fields) == (accepted, {b"xml": b"<message/>", b"frame": b"f1"})
        assert await t.pending(inbox) == 1
        slots = [("f1", _slot("in", "m1")), ("f1", _slot("out", "m2")), ("f2", _slot("in", "m2"))]
        outcome = await t.commit(entry, "node-a", slots, [(out, {b"xml": b"<out/>"})])
        assert outcome is Commit.COMMITTED
        assert (await t.length(inbox), await t.pending(inbox)) == (0, 0), "acked and deleted"
        [forwarded] = await t.read("node-b", [out])
        assert forwarded.fields == {b"xml": b"<out/>"}
        history = await t.backend.buffer_get_thread("f1")
        assert [(s.index, s.direction, s.message_id) for s in history] == [
            (0, "in", "m1"),
            (1, "out", "m2"),
        ]
        assert [s.message_id for s in await t.backend.buffer_get_thread("f2")] == ["m2"]


async def test_a_claimed_entry_cannot_be_committed_by_its_former_owner(
    redis_server: RedisServer,
) -> None:
    async with streams(redis_server) as t:
        inbox, out = await _stream(t, "worker"), await _stream(t, "next")
        await t.add(inbox, {b"xml": b"<job/>"})
        [entry] = await t.read("stalled", [inbox])
        [claimed] = await t.claim("rescuer", inbox, min_idle_ms=0)
        assert claimed.id == entry.id and claimed.fields == entry.fields
        late = await t.commit(
            entry, "stalled", [("f", _slot("out", "late"))], [(out, {b"x": b"1"})]
        )
        assert late is Commit.CLAIMED
        assert await t.length(out) == 0, "the fenced commit added nothing"
        assert await t.backend.buffer_get_thread("f") == []
        done = await t.commit(claimed, "rescuer", [("f", _slot("out", "m"))], [(out, {b"x": b"2"})])
        assert done is Commit.COMMITTED
        assert await t.commit(claimed, "rescuer") is Commit.GONE, "a second commit changes nothing"
        assert await t.commit(entry, "stalled") is Commit.GONE
        [only] = await t.read("reader", [out])
        assert only.fields == {b"x": b"2"} and await t.length(out) == 1


async def test_claims_take_only_entries_idle_long_enough(redis_server: RedisServer) -> None:
    async with streams(redis_server) as t:
        inbox = await _stream(t, "slow")
        for i in range(3):
            await t.add(inbox, {b"n": str(i).encode()})
        assert len(await t.read("a", [inbox])) == 3
        assert await t.claim("b", inbox, min_idle_ms=60_000) == []
        assert len(await t.claim("b", inbox, min_idle_ms=0)) == 3


async def test_history_appends_in_a_commit_are_idempotent_and_trimmed(
    redis_server: RedisServer,
) -> None:
    async with streams(redis_server, HistoryLimits(max_slots_per_thread=2)) as t:
        inbox = await _stream(t, "l")
        await t.backend.buffer_append("f", _slot("in", "m0"))
        await t.add(inbox, {b"x": b"1"})
        [entry] = await t.read("a", [inbox])
        slots = [("f", _slot("in", "m0")), ("f", _slot("out", "m1")), ("f", _slot("out", "m2"))]
        assert await t.commit(entry, "a", slots) is Commit.COMMITTED
        history = await t.backend.buffer_get_thread("f")
        assert [(s.index, s.message_id) for s in history] == [(1, "m1"), (2, "m2")]


async def test_reads_wait_for_entries_then_return(redis_server: RedisServer) -> None:
    async with streams(redis_server) as t:
        inbox = await _stream(t, "idle")
        assert await t.read("a", [inbox], block_ms=50) == []


def test_the_socket_timeout_must_outlast_a_blocking_read(redis_server: RedisServer) -> None:
    backend = RedisBackend.from_url(redis_server.url)
    with pytest.raises(ValueError, match="longer than a blocking read"):
        RedisStreams(redis_server.url, backend, socket_timeout_s=0.5)


@pytest.mark.parametrize("seed", range(6))
async def test_random_interleavings_commit_every_input_exactly_once(
    redis_server: RedisServer, seed: int
) -> None:
    """Consumers read, stall, crash (forget what they hold), claim each other's entries
    and commit in a random order. The model: every input ends committed exactly once,
    its output is in the next stream exactly once, its slots are in the history once,
    and no commit by a consumer that lost its entry changes anything."""
    rng = random.Random(seed)
    consumers = ["n1", "n2", "n3"]
    async with streams(redis_server) as t:
        inbox, out = await _stream(t, "in"), await _stream(t, "out")
        inputs = 40
        for i in range(inputs):
            await t.add(inbox, {b"n": str(i).encode()})
        held: dict[str, list[Entry]] = {c: [] for c in consumers}
        committed: Counter[bytes] = Counter()
        for _ in range(600):
            if len(committed) == inputs:
                break
            who = rng.choice(consumers)
            action = rng.random()
            if action < 0.3:
                held[who] += await t.read(who, [inbox], count=rng.randint(1, 5))
            elif action < 0.45:
                held[who] += await t.claim(who, inbox, min_idle_ms=0, count=rng.randint(1, 5))
            elif action < 0.5:
                held[who] = []  # a crash: what it held is pending until someone claims it
            elif held[who]:
                entry = held[who].pop(rng.randrange(len(held[who])))
                n = entry.fields[b"n"]
                slots = [(f"frame{n.decode()}", _slot("out", f"out-{n.decode()}"))]
                outcome = await t.commit(entry, who, slots, [(out, {b"n": n})])
                if outcome is Commit.COMMITTED:
                    committed[n] += 1
        while len(committed) < inputs:  # finish: one consumer claims and commits the rest
            for entry in await t.read("n1", [inbox], count=64) + await t.claim(
                "n1", inbox, min_idle_ms=0, count=64
            ):
                n = entry.fields[b"n"]
                slots = [(f"frame{n.decode()}", _slot("out", f"out-{n.decode()}"))]
                if await t.commit(entry, "n1", slots, [(out, {b"n": n})]) is Commit.COMMITTED:
                    committed[n] += 1
        assert set(committed.values()) == {1} and len(committed) == inputs
        assert (await t.length(inbox), await t.pending(inbox)) == (0, 0)
        outputs = Counter(e.fields[b"n"] for e in await t.read("reader", [out], count=1000))
        assert outputs == Counter({str(i).encode(): 1 for i in range(inputs)})
        for i in range(inputs):
            assert [s.message_id for s in await t.backend.buffer_get_thread(f"frame{i}")] == [
                f"out-{i}"
            ]
