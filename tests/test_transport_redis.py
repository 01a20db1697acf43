"""The Redis Streams transport's primitives against a real redis-server: reading,
claiming, and the commit that ends a delivery once (the fence, history, outputs and
acknowledgement together)."""

from __future__ import annotations

import asyncio
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
    stream = transport.inbox(name, 0)
    await transport.ensure_group(stream)
    return stream


async def read(
    transport: RedisStreams, consumer: str, streams: list[bytes], count: int = 64
) -> list[Entry]:
    """New entries of ``streams`` for ``consumer`` (no leases)."""
    return (await transport.read(consumer, dict.fromkeys(streams, b">"), count=count)).entries


async def test_a_delivery_commits_its_history_and_outputs_and_leaves_nothing_pending(
    redis_server: RedisServer,
) -> None:
    async with streams(redis_server) as t:
        inbox, out = await _stream(t, "greeter"), await _stream(t, "shouter")
        accepted = await t.add(inbox, {b"xml": b"<message/>", b"frame": b"f1"})
        [entry] = await read(t, "node-a", [inbox])
        assert (entry.id, entry.fields) == (accepted, {b"xml": b"<message/>", b"frame": b"f1"})
        assert await t.pending(inbox) == 1
        slots = [("f1", _slot("in", "m1")), ("f1", _slot("out", "m2")), ("f2", _slot("in", "m2"))]
        outcome = await t.commit(entry, "node-a", slots, [(out, {b"xml": b"<out/>"})])
        assert outcome is Commit.COMMITTED
        assert (await t.length(inbox), await t.pending(inbox)) == (0, 0), "acked and deleted"
        [forwarded] = await read(t, "node-b", [out])
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
        [entry] = await read(t, "stalled", [inbox])
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
        [only] = await read(t, "reader", [out])
        assert only.fields == {b"x": b"2"} and await t.length(out) == 1


async def test_claims_take_only_entries_idle_long_enough(redis_server: RedisServer) -> None:
    async with streams(redis_server) as t:
        inbox = await _stream(t, "slow")
        for i in range(3):
            await t.add(inbox, {b"n": str(i).encode()})
        assert len(await read(t, "a", [inbox])) == 3
        assert await t.claim("b", inbox, min_idle_ms=60_000) == []
        assert len(await t.claim("b", inbox, min_idle_ms=0)) == 3


async def test_history_appends_in_a_commit_are_idempotent_and_trimmed(
    redis_server: RedisServer,
) -> None:
    async with streams(redis_server, HistoryLimits(max_slots_per_thread=2)) as t:
        inbox = await _stream(t, "l")
        await t.backend.buffer_append("f", _slot("in", "m0"))
        await t.add(inbox, {b"x": b"1"})
        [entry] = await read(t, "a", [inbox])
        slots = [("f", _slot("in", "m0")), ("f", _slot("out", "m1")), ("f", _slot("out", "m2"))]
        assert await t.commit(entry, "a", slots) is Commit.COMMITTED
        history = await t.backend.buffer_get_thread("f")
        assert [(s.index, s.message_id) for s in history] == [(1, "m1"), (2, "m2")]


async def test_an_empty_read_says_where_to_wait_from_and_the_wait_wakes_on_an_entry(
    redis_server: RedisServer,
) -> None:
    async with streams(redis_server) as t:
        inbox = await _stream(t, "idle")
        await t.add(inbox, {b"n": b"0"})
        assert len(await read(t, "a", [inbox])) == 1
        empty = await t.read("a", {inbox: b">"})
        assert empty.entries == [] and list(empty.marks) == [inbox]
        waiting = asyncio.ensure_future(t.wait(empty.marks, 1000))
        added = await t.add(inbox, {b"n": b"1"})
        await asyncio.wait_for(waiting, 5)
        [entry] = await read(t, "a", [inbox])
        assert entry.id == added


async def test_a_shard_is_read_only_under_its_lease_and_a_new_owner_takes_over_its_entries(
    redis_server: RedisServer,
) -> None:
    """Leases: a consumer reads a shard only while it holds the lease; a consumer that
    takes a free shard takes over, at once, what the former owner still held there,
    whose late commit is then refused."""
    async with streams(redis_server) as t:
        shards = 2
        inboxes = [t.inbox("l", k) for k in range(shards)]
        for inbox in inboxes:
            await t.ensure_group(inbox)
        first = await t.leases("a", "l", shards, want=2, lease_ms=60_000)
        assert (first.owned, first.taken, first.claimed) == ([0, 1], [0, 1], 0)
        assert (await t.leases("b", "l", shards, want=1, lease_ms=60_000)).owned == []
        await t.add(inboxes[0], {b"n": b"0"})
        await t.add(inboxes[0], {b"n": b"1"})
        leases = {inboxes[0]: t.lease("l", 0)}
        held = (await t.read("a", {inboxes[0]: b">"}, leases=leases, count=1)).entries
        assert [e.fields[b"n"] for e in held] == [b"0"]
        fenced = await t.read("b", {inboxes[0]: b">"}, leases=leases)
        assert fenced.entries == [] and fenced.lost == [inboxes[0]], "b holds no lease"
        assert await t.unlease("a", "l", [0]) == 1  # a gives shard 0 up (or its lease expired)
        assert await t.owners("l", shards) == [None, "a"]
        second = await t.leases("b", "l", shards, want=1, lease_ms=60_000)
        assert (second.owned, second.taken, second.claimed) == ([0], [0], 1)
        late = await t.read("a", {inboxes[0]: b">"}, leases=leases)
        assert late.entries == [] and late.lost == [inboxes[0]], "a reads nothing more"
        assert await t.commit(held[0], "a") is Commit.CLAIMED
        mine = (await t.read("b", {inboxes[0]: b"0"}, leases=leases)).entries
        rest = (await t.read("b", {inboxes[0]: b">"}, leases=leases)).entries
        assert [e.fields[b"n"] for e in mine + rest] == [b"0", b"1"], "in order"
        assert await t.commit(mine[0], "b") is Commit.COMMITTED


async def test_the_shard_layout_is_recorded_once(redis_server: RedisServer) -> None:
    async with streams(redis_server) as t:
        assert await t.layout({"a": 4, "b": 1}) == {"a": 4, "b": 1}
        assert await t.layout({"a": 8}) == {"a": 4}, "the first word holds"
        assert await t.recorded_layout() == {"a": 4, "b": 1}


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
                held[who] += await read(t, who, [inbox], count=rng.randint(1, 5))
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
            for entry in await read(t, "n1", [inbox], count=64) + await t.claim(
                "n1", inbox, min_idle_ms=0, count=64
            ):
                n = entry.fields[b"n"]
                slots = [(f"frame{n.decode()}", _slot("out", f"out-{n.decode()}"))]
                if await t.commit(entry, "n1", slots, [(out, {b"n": n})]) is Commit.COMMITTED:
                    committed[n] += 1
        assert set(committed.values()) == {1} and len(committed) == inputs
        assert (await t.length(inbox), await t.pending(inbox)) == (0, 0)
        outputs = Counter(e.fields[b"n"] for e in await read(t, "reader", [out], count=1000))
        assert outputs == Counter({str(i).encode(): 1 for i in range(inputs)})
        for i in range(inputs):
            assert [s.message_id for s in await t.backend.buffer_get_thread(f"frame{i}")] == [
                f"out-{i}"
            ]


async def test_input_is_published_to_every_target_at_once_and_once(
    redis_server: RedisServer,
) -> None:
    """One publish adds an entry to each target inbox; the same call sent again (its
    answer lost, say) adds nothing."""
    async with streams(redis_server) as t:
        a, b = await _stream(t, "a"), await _stream(t, "b")
        entries = [(a, {b"x": b"1"}), (b, {b"x": b"2"})]
        assert await t.publish("cause-1", entries) is True
        assert await t.publish("cause-1", entries) is False
        assert (await t.length(a), await t.length(b)) == (1, 1)
        assert await t.publish("cause-2", entries[:1]) is True
        assert await t.length(a) == 2


async def test_a_read_of_thousands_of_streams_works(redis_server: RedisServer) -> None:
    """A node holding many shards reads them in one call (the script reads them in
    chunks: one Redis command cannot take them all from Lua)."""
    async with streams(redis_server) as t:
        inboxes = [t.inbox("many", k) for k in range(4100)]
        for inbox in inboxes:
            await t.ensure_group(inbox)
        await t.add(inboxes[-1], {b"n": b"1"})
        got = await t.read("a", dict.fromkeys(inboxes, b">"))
        assert [e.stream for e in got.entries] == [inboxes[-1]]
        empty = await t.read("a", dict.fromkeys(inboxes, b">"))
        assert empty.entries == [] and len(empty.marks) == 4100


async def test_a_followed_conversation_that_ends_without_a_reply_is_noticed_once(
    redis_server: RedisServer,
) -> None:
    """The commit counts what a followed input caused: the notice (k=n) reaches the
    waiting node's reply stream when the last of it ends without a reply, and never a
    reply stream that is gone (it would be made again for ever)."""
    async with streams(redis_server) as t:
        a, b = await _stream(t, "a"), await _stream(t, "b")
        waiter = await _stream(t, "waiter")
        await t.publish("c1", [(a, {b"k": b"d"}), (b, {b"k": b"d"})], follow=True)
        first, second = await read(t, "n1", [a]) + await read(t, "n1", [b])
        forward = (b, {b"k": b"d", b"c": b"c1"})
        assert await t.commit(first, "n1", [], [forward], cause="c1", waiter=waiter) == 1
        assert await t.commit(first, "n1", [], [forward], cause="c1", waiter=waiter) == -1
        assert await t.commit(second, "n1", cause="c1", waiter=waiter) == 1
        assert await t.length(waiter) == 0, "one message is still in the organism"
        [last] = await read(t, "n1", [b])
        assert await t.commit(last, "n1", cause="c1", waiter=waiter) == 1
        [notice] = await read(t, "n1", [waiter])
        assert notice.fields == {b"k": b"n", b"c": b"c1"}
        # A client gone (its reply stream deleted): no notice, no stream made again.
        gone = t.replies("gone-client")
        await t.publish("c2", [(a, {b"k": b"d"})], follow=True)
        [entry] = await read(t, "n1", [a])
        assert await t.commit(entry, "n1", cause="c2", waiter=gone) == 1
        assert await t._commands.call(b"EXISTS", gone) == 0
