"""The pump: routing, threads and history, errors, backpressure, ordering."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cli_process import until
from support import (
    NS,
    HuhCollector,
    Ping,
    Pong,
    bad_return,
    boom,
    ping_xml,
    pong,
    pong_sync,
    slow,
)

from xml_pipeline import (
    Abandoned,
    Duplicate,
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
    Organism,
    PumpSettings,
    StreamPump,
    build_envelope,
    load_organism,
    payload_from_xml,
)
from xml_pipeline.backends import HistoryLimits

ORGANISMS = Path(__file__).resolve().parent.parent / "organisms"


def envelope(sender: str, payload: bytes, *, to: str | None = None, thread: str | None = None,
             id: str | None = None) -> bytes:  # noqa: A002  # fmt: skip
    from lxml import etree

    return build_envelope(sender=sender, payload=etree.fromstring(payload), to=to, thread=thread,
                          id=id)  # fmt: skip


async def dead_codes(h) -> list[str]:
    return [letter.code for letter in await h.backend.deadletter_list()]


# -- conversations, frames, history ------------------------------------------------


async def test_thousand_concurrent_conversations_through_hello() -> None:
    organism = load_organism(ORGANISMS / "hello.yaml")
    replies = []
    async with StreamPump(organism, egress=replies.append) as pump:
        names = [f"person-{i}" for i in range(1000)]

        async def one(name: str):
            data = f'<Greeting xmlns="https://example.org/hello"><name>{name}</name></Greeting>'
            return await pump.request(data, to="greeter", sender=f"caller-{name}", timeout=30)

        results = await asyncio.gather(*(one(n) for n in names))
        await pump.wait_idle()
        assert [r.payload.text for r in results] == [f"HELLO, {n.upper()}!" for n in names]
        roots = {r.thread_id for r in results}
        assert len(roots) == 1000
        for r, name in zip(results, names, strict=True):
            assert r.to == f"caller-{name}" and r.sender == "greeter"

        backend = pump.backend
        chains = await backend.registry_list_all()
        threads = await backend.buffer_list_threads()
        # Every conversation has exactly its root, greeter's frame and shouter's frame.
        assert len(threads) == 3000
        per_root: Counter[str] = Counter()
        for thread in threads:
            slots = await backend.buffer_get_thread(thread)
            frame = await pump._frames.resolve(thread)
            assert frame is not None and chains[thread] == frame.chain
            per_root[frame.root] += 1
            name = frame.origin.removeprefix("caller-").encode()
            keys = [(s.message_id, s.direction) for s in slots]
            assert len(keys) == len(set(keys)), "a message recorded twice on one frame"
            for s in slots:
                assert name.upper() in s.xml.upper(), "a foreign conversation's message"
            directions = [s.direction for s in slots]
            if not frame.hops:
                assert directions == ["out", "in"]
            elif frame.hops == ("greeter",):
                assert directions == ["in", "out", "in", "out"]
                assert [s.index for s in slots] == [0, 1, 2, 3]
            else:
                assert frame.hops == ("greeter", "shouter")
                assert directions == ["in", "out"]
        assert set(per_root) == roots and set(per_root.values()) == {3}
    assert len(replies) == 1000


async def test_dotted_listener_responds_to_its_caller(run_pump) -> None:
    async def front(payload: Ping | Pong, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Ping):
            return HandlerResponse(Ping(n=payload.n + 1), to="calc.add")
        return HandlerResponse.respond(Pong(n=payload.n, by=f"front<-{payload.by}"))

    async def add(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        assert meta.from_id == "front" and meta.own_name == "calc.add" and meta.depth == 2
        return HandlerResponse.respond(Pong(n=payload.n + 10, by=meta.own_name))

    listeners = [Listener("front", (Ping, Pong), front), Listener("calc.add", (Ping,), add)]
    async with run_pump(listeners) as h:
        reply = await h.pump.request(ping_xml(1), to="front", timeout=5)
        assert reply.payload == Pong(n=12, by="front<-calc.add")
        assert reply.sender == "front"


@pytest.mark.parametrize("forged", ["front", "calc.add", "front.calc.add", "a.b"])
async def test_external_from_is_only_a_label(run_pump, forged: str) -> None:
    front_got = []

    async def front(payload: Pong, meta: HandlerMetadata) -> None:
        front_got.append(payload)

    listeners = [
        Listener("front", (Pong,), front),
        Listener("calc.add", (Ping,), pong),
        Listener("calc", (Pong,), front),
    ]
    async with run_pump(listeners) as h:
        await h.pump.inject(envelope(forged, ping_xml(7), to="calc.add"))
        await h.pump.wait_idle()
        assert front_got == []
        assert [r.to for r in h.replies] == [forged]
        assert h.replies[0].payload == Pong(n=7, by="calc.add")
        stats = h.pump.statistics().listeners
        assert stats["front"].received == 0 and stats["calc"].received == 0


async def test_broadcast_reaches_all_and_to_reaches_one(run_pump) -> None:
    listeners = [Listener(name, (Ping,), pong) for name in ("a", "b", "c")]
    async with run_pump(listeners) as h:
        await h.pump.inject(envelope("x", ping_xml(1)))
        await h.pump.wait_idle()
        assert sorted(r.payload.by for r in h.replies) == ["a", "b", "c"]
        assert len({r.thread_id for r in h.replies}) == 1
        h.replies.clear()
        await h.pump.inject(envelope("x", ping_xml(2), to="b"))
        await h.pump.wait_idle()
        assert [r.payload.by for r in h.replies] == ["b"]
        stats = h.pump.statistics().listeners
        assert (stats["a"].received, stats["b"].received, stats["c"].received) == (1, 2, 1)


async def test_ingress_takes_to_and_thread_from_the_envelope_over_the_arguments(
    run_pump,
) -> None:
    listeners = [Listener(name, (Ping,), pong) for name in ("a", "b", "c")]
    async with run_pump(listeners) as h:
        first = await h.pump.inject(envelope("x", ping_xml(1), to="b"), to="a")
        await h.pump.wait_idle()
        assert [r.payload.by for r in h.replies] == ["b"]  # the envelope's <to> wins
        h.replies.clear()
        # No <to> in the envelope: the argument's; no <thread>: a new conversation,
        # whatever thread= says (it is for bare payloads).
        second = await h.pump.inject(envelope("x", ping_xml(2)), to="c", thread=first)
        await h.pump.wait_idle()
        assert [r.payload.by for r in h.replies] == ["c"] and second != first
        h.replies.clear()
        third = await h.pump.inject(envelope("x", ping_xml(3), thread=first, to="a"))
        await h.pump.wait_idle()
        assert third == first and [r.thread_id for r in h.replies] == [first]


@pytest.mark.parametrize("form", [bytes, bytearray, memoryview, lambda b: b.decode()])
async def test_ingress_reads_every_form_of_bytes_alike(run_pump, form) -> None:
    async with run_pump([Listener("a", (Ping,), pong)]) as h:
        assert await h.pump.inject(form(envelope("x", ping_xml(4)))) is not None
        empty = b'<message xmlns="https://xml-pipeline.org/ns/envelope/v1"/>'
        assert await h.pump.inject(form(empty)) is None  # refused alike
        await h.pump.wait_idle()
        assert sorted(type(r.payload).__name__ for r in h.replies) == ["Huh", "Pong"]
        assert await dead_codes(h) == ["envelope"]


async def test_handler_broadcast_reaches_every_accepting_listener(run_pump) -> None:
    got: list[str] = []

    async def fan(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse(Pong(n=payload.n))

    def sink(name: str):
        async def handle(payload: Pong, meta: HandlerMetadata) -> None:
            got.append(name)

        return handle

    listeners = [Listener("fan", (Ping,), fan)]
    listeners += [Listener(f"sink.{i}", (Pong,), sink(f"sink.{i}")) for i in range(4)]
    async with run_pump(listeners) as h:
        await h.pump.inject(ping_xml(1), to="fan")
        await h.pump.wait_idle()
        assert sorted(got) == [f"sink.{i}" for i in range(4)]


# -- errors ----------------------------------------------------------------------


async def test_peer_violation_gets_huh_and_dead_letter(run_pump) -> None:
    collector = HuhCollector()

    async def rogue(payload: Ping | Huh, meta: HandlerMetadata) -> HandlerResponse | None:
        if isinstance(payload, Huh):
            await collector(payload, meta)
            return None
        return HandlerResponse(Ping(n=1), to="secret")

    listeners = [
        Listener("rogue", (Ping, Huh), rogue, peers=frozenset({"allowed"})),
        Listener("allowed", (Pong,), pong),
        Listener("secret", (Ping,), pong),
    ]
    async with run_pump(listeners) as h:
        await h.pump.inject(ping_xml(0), to="rogue")
        await h.pump.wait_idle()
        assert h.pump.statistics().listeners["secret"].received == 0
        [(huh, meta)] = collector.huhs
        assert huh.code == "peer-denied" and "secret" in huh.message
        assert meta.own_name == "rogue" and meta.from_id == "xml_pipeline"
        assert await dead_codes(h) == ["peer-denied"]
        assert h.replies == []


async def test_handler_exception_gives_huh_and_dead_letter_and_pump_goes_on(run_pump) -> None:
    async with run_pump([Listener("b", (Ping,), boom)]) as h:
        root = await h.pump.inject(ping_xml(1, "boom"), to="b", sender="me")
        await h.pump.wait_idle()
        [reply] = h.replies
        assert (
            reply.payload.code == "handler-error"
            and "RuntimeError: kaboom" in reply.payload.message
        )
        assert reply.payload.listener == "b" and reply.to == "me" and reply.thread_id == root
        [letter] = await h.backend.deadletter_list()
        assert letter.code == "handler-error" and letter.listener == "b"
        assert b"boom" in letter.data
        ok = await h.pump.request(ping_xml(2), to="b", timeout=5)
        assert ok.payload == Pong(n=2, by="b")
        assert h.pump.statistics().listeners["b"].failed == 1


async def test_handler_timeout_gives_huh_and_pump_goes_on(run_pump) -> None:
    async with run_pump([Listener("s", (Ping,), slow, timeout_s=0.2, concurrency=2)]) as h:
        stuck = asyncio.create_task(h.pump.request(ping_xml(1, "slow"), to="s", timeout=10))
        ok = await h.pump.request(ping_xml(2), to="s", timeout=5)
        assert ok.payload == Pong(n=2, by="s")
        huh = (await stuck).payload
        assert isinstance(huh, Huh) and huh.code == "timeout"
        assert await dead_codes(h) == ["timeout"]


async def test_sync_handler_timeout(run_pump) -> None:
    release = threading.Event()

    def stuck(payload: Ping, meta: HandlerMetadata) -> None:
        release.wait(10)

    async with run_pump([Listener("s", (Ping,), stuck, timeout_s=0.1)]) as h:
        try:
            reply = await h.pump.request(ping_xml(1), to="s", timeout=5)
        finally:
            release.set()
        assert reply.payload.code == "timeout"


async def test_invalid_return_and_unknown_payload_class(run_pump) -> None:
    async def returns_plain_object(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse(object(), to="x")  # type: ignore[arg-type]

    listeners = [Listener("bad", (Ping,), bad_return), Listener("x", (Pong,), returns_plain_object)]
    async with run_pump(listeners) as h:
        reply = await h.pump.request(ping_xml(1), to="bad", timeout=5)
        assert reply.payload.code == "invalid-return" and "str" in reply.payload.message
        assert await dead_codes(h) == ["invalid-return"]


async def test_validation_failure(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        bad = f'<Ping xmlns="{NS}"><n>not a number</n></Ping>'.encode()
        reply = await h.pump.request(bad, to="e", timeout=5)
        assert reply.payload.code == "validation" and "n:" in reply.payload.message
        extra = f'<Ping xmlns="{NS}"><n>1</n><evil>x</evil></Ping>'.encode()
        reply = await h.pump.request(extra, to="e", timeout=5)
        assert reply.payload.code == "validation"
        assert await dead_codes(h) == ["validation", "validation"]
        assert h.pump.statistics().listeners["e"].handled == 0


async def test_no_route_at_ingress_and_from_a_handler(run_pump) -> None:
    collector = HuhCollector()

    async def lost(payload: Ping | Huh, meta: HandlerMetadata) -> HandlerResponse | None:
        if isinstance(payload, Huh):
            await collector(payload, meta)
            return None
        return HandlerResponse(Pong(n=1), to="nobody")

    async with run_pump([Listener("l", (Ping, Huh), lost)]) as h:
        assert await h.pump.inject(ping_xml(1), to="ghost") is None
        assert await h.pump.inject(f'<Other xmlns="{NS}"/>'.encode()) is None
        await h.pump.inject(ping_xml(1), to="l")
        await h.pump.wait_idle()
        assert [r.payload.code for r in h.replies] == ["no-route", "no-route"]
        assert [huh.code for huh, _ in collector.huhs] == ["no-route"]
        assert await dead_codes(h) == ["no-route"] * 3
        assert h.pump.statistics().rejected == 2


async def test_depth_limit_stops_forward_loops(run_pump) -> None:
    collector = HuhCollector()

    async def loop(payload: Ping | Huh, meta: HandlerMetadata) -> HandlerResponse | None:
        if isinstance(payload, Huh):
            await collector(payload, meta)
            return None
        return HandlerResponse(Ping(n=payload.n + 1), to="loop")

    async with run_pump([Listener("loop", (Ping, Huh), loop)], max_depth=5) as h:
        await h.pump.inject(ping_xml(0), to="loop")
        await h.pump.wait_idle()
        [(huh, meta)] = collector.huhs
        assert huh.code == "depth-exceeded" and meta.depth == 5
        assert h.pump.statistics().listeners["loop"].received == 6
        assert await dead_codes(h) == ["depth-exceeded"]


async def test_a_failing_huh_handler_is_not_answered_with_huh(run_pump) -> None:
    async def fragile(payload: Ping | Huh, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Huh):
            raise ValueError("cannot cope with " + payload.code)
        return HandlerResponse(Ping(n=1, text="boom"), to="b")

    listeners = [Listener("a", (Ping, Huh), fragile), Listener("b", (Ping,), boom)]
    async with run_pump(listeners) as h:
        await h.pump.inject(ping_xml(1), to="a")
        await h.pump.wait_idle()
        # b fails → Huh to a; a fails on the Huh → dead letter only, no ping-pong.
        assert await dead_codes(h) == ["handler-error", "handler-error"]
        stats = h.pump.statistics().listeners
        assert (stats["a"].received, stats["a"].failed) == (2, 1)
        assert h.replies == []


# -- handlers --------------------------------------------------------------------


async def test_sync_handlers_do_not_block_the_loop(run_pump) -> None:
    started = threading.Event()
    release = threading.Event()

    def blocking(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        started.set()
        assert release.wait(10), "the loop never got to release the handler"
        return HandlerResponse.respond(Pong(n=payload.n))

    async with run_pump([Listener("blk", (Ping,), blocking)]) as h:
        task = asyncio.create_task(h.pump.request(ping_xml(5), to="blk", timeout=10))
        while not started.is_set():
            await asyncio.sleep(0.005)
        assert not task.done()
        release.set()  # only possible because the handler is not on the loop
        assert (await task).payload == Pong(n=5)


async def test_sync_handler_reads_history_blocking(run_pump) -> None:
    def reader(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        slots = meta.history_blocking()
        return HandlerResponse.respond(Pong(n=len(slots), text=slots[-1].direction))

    async with run_pump([Listener("r", (Ping,), reader)]) as h:
        reply = await h.pump.request(ping_xml(1), to="r", timeout=5)
        assert reply.payload.n == 1 and reply.payload.text == "in"


async def test_handler_list_and_none(run_pump) -> None:
    async def multi(payload: Ping, meta: HandlerMetadata) -> list[HandlerResponse] | None:
        if payload.n == 0:
            return None
        return [HandlerResponse.respond(Pong(n=i)) for i in range(payload.n)]

    async with run_pump([Listener("m", (Ping,), multi)]) as h:
        await h.pump.inject(ping_xml(3), to="m")
        await h.pump.inject(ping_xml(0), to="m")
        await h.pump.wait_idle()
        assert [r.payload.n for r in h.replies] == [0, 1, 2]


async def test_history_accessor_and_thread_continuation(run_pump) -> None:
    async def count(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        slots = await meta.history()
        assert payload_from_xml(Ping, slots[-1].xml) == payload
        return HandlerResponse.respond(Pong(n=len(slots), text=meta.thread_id))

    async with run_pump([Listener("c", (Ping,), count)]) as h:
        first = await h.pump.request(ping_xml(1), to="c", sender="me", timeout=5)
        # Continuing the conversation reuses the same child frame: its transcript grows.
        second = await h.pump.request(
            ping_xml(2), to="c", sender="me", thread=first.thread_id, timeout=5
        )
        assert second.thread_id == first.thread_id
        assert first.payload.text == second.payload.text
        assert (first.payload.n, second.payload.n) == (1, 3)
        root_slots = await h.backend.buffer_get_thread(first.thread_id)
        assert [s.direction for s in root_slots] == ["out", "in", "out", "in"]
        # An unknown or non-root thread id opens a new conversation.
        third = await h.pump.request(
            ping_xml(3), to="c", sender="me", thread=first.payload.text, timeout=5
        )
        assert third.thread_id not in (first.thread_id, first.payload.text)


async def test_a_retried_ingress_id_is_accepted_once(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        first = await h.pump.request(envelope("me", ping_xml(1), to="e", id="m-1"), timeout=5)
        again = envelope("me", ping_xml(1), to="e", id="m-1", thread=first.thread_id)
        assert await h.pump.inject(again) == first.thread_id
        await h.pump.wait_idle()
        root = await h.backend.buffer_get_thread(first.thread_id)
        assert [(s.direction, s.message_id == "m-1") for s in root] == [
            ("out", True),
            ("in", False),
        ]
        stats = h.pump.statistics()
        assert stats.duplicates == 1 and stats.listeners["e"].received == 1
        # Without <thread>, the same sender and id is a retry of the first message too.
        with pytest.raises(Duplicate):
            await h.pump.request(envelope("me", ping_xml(1), to="e", id="m-1"), timeout=5)
        # The same id from another sender is another message.
        other = await h.pump.request(envelope("you", ping_xml(2), to="e", id="m-1"), timeout=5)
        assert other.thread_id != first.thread_id
        assert h.pump.statistics().duplicates == 2


async def test_a_huh_handler_cannot_loop(run_pump) -> None:
    got: list[str] = []

    async def relay_up(payload: Ping | Huh, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Huh):
            got.append(payload.code)
            return HandlerResponse.respond(payload)  # the caller does not accept Huh
        return HandlerResponse(Ping(n=1), to="nobody-home")

    async def caller(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse(Ping(n=2), to="mid")

    listeners = [
        Listener("top", (Ping,), caller),
        Listener("mid", (Ping, Huh), relay_up),
    ]
    async with run_pump(listeners) as h:
        await h.pump.inject(ping_xml(0), to="top")
        await asyncio.wait_for(h.pump.wait_idle(), 5)
        assert got == ["no-route"]
        assert await dead_codes(h) == ["no-route", "no-route"]


async def test_metadata_marks_external_and_self_calls(run_pump) -> None:
    seen: list[tuple[str, bool, bool]] = []

    async def me(payload: Ping, meta: HandlerMetadata) -> HandlerResponse | None:
        seen.append((meta.from_id, meta.from_external, meta.is_self_call))
        if payload.n == 0:
            return HandlerResponse(Ping(n=1), to="me")
        return None

    async with run_pump([Listener("me", (Ping,), me)]) as h:
        await h.pump.inject(ping_xml(0), to="me", sender="me")  # an outsider calling itself "me"
        await h.pump.wait_idle()
        assert seen == [("me", True, False), ("me", False, True)]


async def test_messages_of_one_frame_arrive_in_order(run_pump) -> None:
    seen: dict[str, list[int]] = {}

    async def record(payload: Ping, meta: HandlerMetadata) -> None:
        await asyncio.sleep(0.001 * (payload.n % 3))
        seen.setdefault(meta.thread_id, []).append(payload.n)

    async with run_pump([Listener("o", (Ping,), record, concurrency=8)]) as h:
        roots = [await h.pump.inject(ping_xml(0), to="o", sender=f"s{i}") for i in range(5)]
        for n in range(1, 40):
            for i, root in enumerate(roots):
                await h.pump.inject(ping_xml(n), to="o", sender=f"s{i}", thread=root)
        await h.pump.wait_idle()
        assert len(seen) == 5
        for order in seen.values():
            assert order == list(range(40))


async def test_a_blocked_frame_holds_up_only_its_own_messages(run_pump) -> None:
    # Two frames blocked in their handlers, with messages of their own behind them:
    # the other frames go on, each in order, on the free workers, and each blocked
    # frame catches up in order once released (whichever goes first).
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}
    seen: dict[str, list[int]] = {}
    frames: dict[str, str] = {}

    async def record(payload: Ping, meta: HandlerMetadata) -> None:
        if payload.n == 0 and payload.text in gates:
            frames[payload.text] = meta.thread_id
            await gates[payload.text].wait()
        for _ in range(payload.n % 3):
            await asyncio.sleep(0)
        seen.setdefault(meta.thread_id, []).append(payload.n)

    async with run_pump([Listener("o", (Ping,), record, concurrency=4)]) as h:
        blocked = {k: await h.pump.inject(ping_xml(0, k), to="o", sender=k) for k in gates}
        await until(lambda: len(frames) == 2, "both frames blocked")
        for n in range(1, 11):
            for k, root in blocked.items():
                await h.pump.inject(ping_xml(n, k), to="o", sender=k, thread=root)
        others = [await h.pump.inject(ping_xml(0), to="o", sender=f"s{i}") for i in range(20)]
        for n in range(1, 5):
            for i, root in enumerate(others):
                await h.pump.inject(ping_xml(n), to="o", sender=f"s{i}", thread=root)
        # (with one inbox per worker, chosen by frame, about half of them would wait)
        await until(lambda: sum(len(v) == 5 for v in seen.values()) == 20, "20 frames done")
        stats = h.pump.statistics().listeners["o"]
        assert (stats.in_flight, stats.queued) == (2, 20)
        gates["b"].set()
        await until(lambda: len(seen.get(frames["b"], ())) == 11, "frame b caught up")
        assert frames["a"] not in seen
        gates["a"].set()
        await asyncio.wait_for(h.pump.wait_idle(), 10)
        assert len(seen) == 22
        for frame, order in seen.items():
            assert order == list(range(11 if frame in frames.values() else 5))
        assert h.pump.statistics().listeners["o"].queued == 0


def held_on_slow(
    gate: asyncio.Event, started: asyncio.Event
) -> Callable[[Ping, HandlerMetadata], Awaitable[HandlerResponse]]:
    """A handler that answers each Ping with a Pong, but holds a Ping whose text is
    "slow" until ``gate`` is set (``started`` says it is held)."""

    async def handler(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        if payload.text == "slow":
            started.set()
            await gate.wait()
        return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))

    return handler


async def test_a_fast_frame_is_answered_while_a_slow_one_is_blocked(run_pump) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    handler = held_on_slow(gate, started)

    async with run_pump([Listener("l", (Ping,), handler, concurrency=2)]) as h:
        slow_reply = asyncio.create_task(h.pump.request(ping_xml(0, "slow"), to="l", timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        for i in range(1, 17):  # one after the other, each on a conversation of its own
            reply = await h.pump.request(ping_xml(i), to="l", sender=f"fast{i}", timeout=5)
            assert reply.payload == Pong(n=i, by="l")
        assert not slow_reply.done()
        gate.set()
        assert (await asyncio.wait_for(slow_reply, 10)).payload == Pong(n=0, by="l")


async def test_an_unordered_listener_runs_one_frames_fan_out_at_once(run_pump) -> None:
    # Four messages from one call share a frame: they meet at a barrier only if all
    # four run at the same time.
    barrier = asyncio.Barrier(4)
    got: dict[str, list[int]] = {}

    async def fan(payload: Ping | Pong, meta: HandlerMetadata) -> object:
        if isinstance(payload, Ping):
            return [HandlerResponse(Ping(n=i), to="work") for i in range(4)]
        got.setdefault(meta.thread_id, []).append(payload.n)
        if len(got[meta.thread_id]) == 4:
            return HandlerResponse.respond(Pong(n=sum(got[meta.thread_id]), by="fan"))
        return None

    async def work(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        async with asyncio.timeout(10):
            await barrier.wait()
        return HandlerResponse.respond(Pong(n=payload.n, by=meta.thread_id))

    listeners = [
        Listener("fan", (Ping, Pong), fan),
        Listener("work", (Ping,), work, concurrency=4, ordered=False),
    ]
    async with run_pump(listeners) as h:
        reply = await h.pump.request(ping_xml(0), to="fan", timeout=15)
        assert reply.payload == Pong(n=6, by="fan")
        assert h.pump.statistics().listeners["work"].handled == 4


async def test_shutdown_dead_letters_the_messages_parked_behind_a_frame() -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    handler = held_on_slow(gate, started)

    pump = StreamPump(Organism("t", (Listener("h", (Ping,), handler, concurrency=2),)))
    async with pump:
        root = await pump.inject(ping_xml(0, "slow"), to="h", sender="slow")
        await asyncio.wait_for(started.wait(), 10)
        for n in range(1, 4):
            await pump.inject(ping_xml(n, "slow"), to="h", sender="slow", thread=root)
        for i in range(16):  # the free worker parks those three and serves everyone else
            await pump.request(ping_xml(10 + i), to="h", sender=f"s{i}", timeout=5)
        stats = pump.statistics()
        assert (stats.listeners["h"].in_flight, stats.listeners["h"].queued) == (1, 3)
        assert stats.in_pump == 4
        backend = pump.backend
        pump._owns_backend = False  # keep the store readable after exit
    stats = pump.statistics()
    assert (stats.abandoned, stats.in_pump, stats.listeners["h"].queued) == (4, 0, 0)
    letters = await backend.deadletter_list()
    assert {letter.code for letter in letters} == {"shutdown"}
    reasons = Counter(letter.reason for letter in letters)
    assert reasons == {
        "running for h when the pump stopped": 1,
        "queued for h when the pump stopped": 3,
    }
    numbers = sorted(payload_from_xml(Ping, letter.data).n for letter in letters)
    assert numbers == [0, 1, 2, 3]


async def test_backpressure_reaches_ingress(run_pump) -> None:
    gate = asyncio.Event()

    async def held(payload: Ping, meta: HandlerMetadata) -> None:
        await gate.wait()

    async with run_pump([Listener("h", (Ping,), held, concurrency=2)], queue_size=4) as h:
        injected = 0

        async def producer() -> None:
            nonlocal injected
            for i in range(20):
                await h.pump.inject(ping_xml(i), to="h")
                injected += 1

        task = asyncio.create_task(producer())
        for _ in range(50):
            await asyncio.sleep(0.001)
        assert injected <= 4 and not task.done()
        assert h.pump.statistics().in_pump <= 4
        gate.set()
        await asyncio.wait_for(task, 10)
        await h.pump.wait_idle()
        assert h.pump.statistics().listeners["h"].handled == 20


async def test_statistics_are_an_immutable_snapshot(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong_sync)]) as h:
        before = h.pump.statistics()
        await h.pump.request(ping_xml(1), to="e", timeout=5)
        after = h.pump.statistics()
        assert before.listeners["e"].handled == 0 and after.listeners["e"].handled == 1
        assert after.ingress == 1 and after.egress == 1
        assert after.listeners["e"].latency_p50_ms is not None
        with pytest.raises(dataclasses.FrozenInstanceError):
            after.ingress = 5  # type: ignore[misc]
        with pytest.raises(TypeError):
            after.listeners["x"] = after.listeners["e"]  # type: ignore[index]


async def test_queued_messages_are_dead_lettered_on_close() -> None:
    gate = asyncio.Event()

    async def held(payload: Ping, meta: HandlerMetadata) -> None:
        await gate.wait()

    organism = Organism("t", (Listener("h", (Ping,), held, concurrency=1),))
    pump = StreamPump(organism)
    async with pump:
        for i in range(3):
            await pump.inject(ping_xml(i), to="h")
        await asyncio.sleep(0.01)
        assert not await pump.drain(0.05)
        letters = await pump.backend.deadletter_list()
        assert letters == []
        backend = pump.backend
        pump._owns_backend = False  # keep the store readable after exit
    letters = await backend.deadletter_list()
    assert sorted(letter.code for letter in letters) == ["shutdown"] * 3


async def test_history_limits_trim_and_evict(run_pump) -> None:
    async def chatty(payload: Ping, meta: HandlerMetadata) -> None:
        return None

    limits = HistoryLimits(max_slots_per_thread=3, max_threads=10)
    async with run_pump([Listener("c", (Ping,), chatty)], history=limits) as h:
        root = await h.pump.inject(ping_xml(0), to="c")
        for n in range(1, 6):
            await h.pump.inject(ping_xml(n), to="c", thread=root)
        await h.pump.wait_idle()
        slots = await h.backend.buffer_get_thread(root)
        assert [s.index for s in slots] == [3, 4, 5]
        for i in range(20):
            await h.pump.inject(ping_xml(i), to="c", sender=f"other{i}")
        await h.pump.wait_idle()
        info = await h.backend.info()
        assert info["buffer_threads"] <= 10 and info["registry_entries"] <= 10
        assert info["threads_evicted"] > 0 and info["slots_trimmed"] == 6


async def test_the_pump_leaves_the_garbage_collector_alone() -> None:
    """GC tuning is process-wide: only an application (the CLI, bench) may opt in."""
    import gc

    before = gc.get_threshold()
    gc.set_threshold(700, before[1], before[2])
    try:
        organism = Organism("t", (Listener("e", (Ping,), pong),))
        async with StreamPump(organism) as pump:
            assert gc.get_threshold()[0] == 700
            await pump.request(ping_xml(1), to="e", timeout=5)
        assert gc.get_threshold()[0] == 700
    finally:
        gc.set_threshold(*before)


# -- robustness (found in review) ---------------------------------------------------


async def test_a_handler_leaking_cancelled_error_does_not_kill_its_worker(run_pump) -> None:
    async def leaky(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        if payload.n == 0:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # raises CancelledError although nobody cancelled the pump
        return HandlerResponse.respond(Pong(n=payload.n))

    async with run_pump([Listener("l", (Ping,), leaky, concurrency=1)]) as h:
        huh = (await h.pump.request(ping_xml(0), to="l", timeout=5)).payload
        assert huh.code == "handler-error" and "CancelledError" in huh.message
        assert (await h.pump.request(ping_xml(1), to="l", timeout=5)).payload == Pong(n=1)


async def test_text_xml_cannot_carry_never_loses_a_reply(run_pump) -> None:
    async def nasty(payload: Ping, meta: HandlerMetadata) -> list[HandlerResponse]:
        if payload.n == 0:
            raise ValueError("bad \x1b[31m\x00 text")
        return [HandlerResponse.respond(Pong(n=1)), HandlerResponse.respond(Pong(n=2, text="\x00"))]

    async with run_pump([Listener("n", (Ping,), nasty)]) as h:
        huh = (await h.pump.request(ping_xml(0), to="n", timeout=5)).payload
        assert huh.code == "handler-error" and "\ufffd" in huh.message
        huh = (await h.pump.request(ping_xml(1), to="n", timeout=5)).payload
        assert huh.code == "invalid-return"
        await h.pump.wait_idle()
        # All or nothing: the valid first response was not sent either.
        assert [type(r.payload).__name__ for r in h.replies] == ["Huh", "Huh"]
        assert await dead_codes(h) == ["handler-error", "invalid-return"]
        assert await h.pump.inject(ping_xml(1), to="n", sender="bad\x00label") is None
        assert h.replies[-1].payload.code == "envelope" and h.replies[-1].to is None


async def test_concurrent_requests_on_one_conversation_each_get_a_reply(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        first = await h.pump.request(ping_xml(0), to="e", timeout=5)
        replies = await asyncio.gather(
            *(
                h.pump.request(ping_xml(i), to="e", thread=first.thread_id, timeout=5)
                for i in range(1, 6)
            )
        )
        assert sorted(r.payload.n for r in replies) == [1, 2, 3, 4, 5]


async def test_stopping_refuses_waiting_ingress_and_fails_pending_requests() -> None:
    gate = asyncio.Event()

    async def held(payload: Ping, meta: HandlerMetadata) -> None:
        await gate.wait()

    organism = Organism(
        "t", (Listener("h", (Ping,), held, concurrency=1),), settings=PumpSettings(queue_size=1)
    )
    pump = StreamPump(organism)
    async with pump:
        pending = asyncio.create_task(pump.request(ping_xml(0), to="h", timeout=30))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(pump.inject(ping_xml(1), to="h"))  # no room: waits
        await asyncio.sleep(0.01)
        assert not waiting.done()
        backend = pump.backend
        pump._owns_backend = False
    with pytest.raises(RuntimeError, match="stopped"):
        await waiting
    with pytest.raises(Abandoned):
        await pending
    assert [letter.code for letter in await backend.deadletter_list()] == ["shutdown"]


async def test_a_stuck_sync_handler_does_not_starve_other_listeners(run_pump) -> None:
    release = threading.Event()

    def stuck(payload: Ping, meta: HandlerMetadata) -> None:
        release.wait(10)

    listeners = [
        Listener("stuck", (Ping,), stuck, timeout_s=0.05, concurrency=2),
        Listener("fine", (Pong,), lambda p, m: HandlerResponse.respond(p)),
    ]
    async with run_pump(listeners, sync_threads=2) as h:
        try:
            for i in range(2):
                huh = (await h.pump.request(ping_xml(i), to="stuck", timeout=5)).payload
                assert huh.code == "timeout"
            ok = await h.pump.request(Pong(n=9), to="fine", timeout=5)
            assert ok.payload == Pong(n=9)
        finally:
            release.set()


async def test_runaway_fan_out_is_bounded(run_pump) -> None:
    async def breed(payload: Ping, meta: HandlerMetadata) -> list[HandlerResponse]:
        return [HandlerResponse(Ping(n=payload.n + 1), to="breed") for _ in range(3)]

    async with run_pump([Listener("breed", (Ping,), breed)], max_in_pump=200, max_depth=32) as h:
        await h.pump.inject(ping_xml(0), to="breed")
        await asyncio.wait_for(h.pump.wait_idle(), 30)
        codes = Counter(await dead_codes(h))
        assert codes["overloaded"] > 0
        assert h.pump.statistics().in_pump == 0


async def test_a_failing_egress_callback_dead_letters_the_reply() -> None:
    def broken(reply: object) -> None:
        raise OSError("stdout is gone")

    organism = Organism("t", (Listener("e", (Ping,), pong),))
    async with StreamPump(organism, egress=broken) as pump:
        reply = await pump.request(ping_xml(1), to="e", timeout=5)
        assert reply.payload == Pong(n=1, by="e")
        [letter] = await pump.backend.deadletter_list()
        assert letter.code == "egress" and b"<n>1</n>" in letter.data


async def test_answered_conversations_leave_little_for_the_collector(run_pump) -> None:
    # What the pump and the memory backend keep per answered conversation (frames,
    # registry entries, histories) must not be objects every full collection scans:
    # the frames cached for messages in flight are bounded by the queue, and histories
    # are bytes.
    async def down(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        if meta.from_external:
            return HandlerResponse(Ping(n=payload.n), to="b")
        return HandlerResponse.respond(payload)

    async def up(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse.respond(payload)

    listeners = [Listener("a", (Ping,), down), Listener("b", (Ping,), up)]
    async with run_pump(listeners, queue_size=16) as h:

        async def conversations(start: int, n: int) -> int:
            for i in range(start, start + n):
                await h.pump.inject(ping_xml(i), to="a")
            await h.pump.wait_idle()
            h.replies.clear()
            gc.collect()
            return len(gc.get_objects())

        before = await conversations(0, 1_500)  # past the frame caches' bound
        n = 3_000
        after = await conversations(1_500, n)
        threads = await h.backend.buffer_list_threads()
        assert len(threads) == 3 * (1_500 + n)  # every frame's history is kept
        assert await h.backend.buffer_thread_len(threads[-1]) > 0
        assert (after - before) / n < 0.5
