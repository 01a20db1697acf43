"""Contracts of the pump: retries, all-or-nothing fan-out, request/reply, clear errors."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from support import NS, Ping, Pong, bad_return, boom, ping_xml, pong

from xml_pipeline import (
    BackendUnavailable,
    Duplicate,
    HandlerFailed,
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
    MalformedMessage,
    NoReply,
    Organism,
    PumpClosed,
    PumpError,
    Reply,
    StreamPump,
    XmlPipelineError,
    build_envelope,
    parse_envelope,
)
from xml_pipeline.backends.memory import MemoryBackend

MANAGER_KEY = "test-contracts-key"


def envelope(sender: str, payload: bytes, *, to: str | None = None, thread: str | None = None,
             id: str | None = None) -> bytes:  # noqa: A002  # fmt: skip
    from lxml import etree

    return build_envelope(sender=sender, payload=etree.fromstring(payload), to=to, thread=thread,
                          id=id)  # fmt: skip


async def dead_codes(pump: StreamPump) -> list[str]:
    return [letter.code for letter in await pump.backend.deadletter_list()]


# -- 1. retries are de-duplicated by (sender, <id>), on every backend ---------------


@pytest.fixture(params=["memory", "manager", "redis"])
def store(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """A backend URL and its options: memory, a served manager store, a real Redis."""
    if request.param == "memory":
        return "memory://", {}
    if request.param == "manager":
        return "manager://127.0.0.1:0", {"authkey": MANAGER_KEY, "serve": True}
    server = request.getfixturevalue("redis_server")
    return server.url, {"prefix": f"test-contracts-{uuid.uuid4().hex[:12]}"}


@asynccontextmanager
async def pump_on(
    store: tuple[str, dict[str, Any]], listeners: list[Listener], replies: list[Reply]
) -> AsyncIterator[StreamPump]:
    url, options = store
    organism = Organism("t", tuple(listeners), backend=url, backend_options=options)
    async with StreamPump(organism, egress=replies.append) as pump:
        try:
            yield pump
        finally:
            # A Redis store outlives the pump: leave none of this test's keys behind.
            await pump.wait_idle()
            await pump.backend.buffer_clear()
            await pump.backend.registry_clear()
            await pump.backend.deadletter_purge()


async def test_concurrent_retries_are_accepted_once_on_every_backend(store) -> None:
    calls: list[int] = []

    async def counted(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        calls.append(payload.n)
        return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))

    replies: list[Reply] = []
    async with pump_on(store, [Listener("e", (Ping,), counted)], replies) as pump:
        data = envelope("me", ping_xml(1), to="e", id="dup-1")
        roots = await asyncio.gather(*(pump.inject(data) for _ in range(50)))
        await pump.wait_idle()
        assert calls == [1], "the handler ran once per accepted message"
        assert pump.statistics().duplicates == 49
        assert len(set(roots)) == 1 and roots[0] is not None, roots
        [reply] = replies
        assert reply.thread_id == roots[0] and reply.payload == Pong(n=1, by="e")
        assert reply.re == "dup-1"

        # Once answered, a retry naming the first conversation is still a retry.
        again = envelope("me", ping_xml(1), to="e", id="dup-1", thread=roots[0])
        with pytest.raises(Duplicate):
            await pump.request(again, timeout=5)
        await pump.wait_idle()
        assert calls == [1] and len(replies) == 1
        assert pump.statistics().duplicates == 50


# -- 2. fan-out is all or nothing ---------------------------------------------------


class FlakyBackend(MemoryBackend):
    """A memory backend whose ``registry_setdefault`` fails for a chosen child frame."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_for: str | None = None  # the listener whose child frame cannot be made
        self.chains: list[str] = []
        self.failures = 0

    async def registry_setdefault(self, chain: str, uuid: str) -> str:
        self.chains.append(chain)
        if self.fail_for is not None and chain.endswith(f',"{self.fail_for}"]'):
            self.failures += 1
            raise BackendUnavailable("injected failure: the store is down")
        return await super().registry_setdefault(chain, uuid)


async def test_a_backend_failure_mid_fan_out_delivers_nothing() -> None:
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    async def fan(payload: Ping | Pong, meta: HandlerMetadata) -> Any:
        if isinstance(payload, Ping):
            return [HandlerResponse(Ping(n=payload.n), to=name) for name in ("a", "b", "c")]
        return HandlerResponse.respond(Pong(n=payload.n, by=f"fan<-{payload.by}"))

    def target(name: str) -> Callable[..., Any]:
        async def handle(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
            got[name].append(payload.n)
            return HandlerResponse.respond(Pong(n=payload.n, by=name))

        return handle

    listeners = [Listener("fan", (Ping, Pong), fan)]
    listeners += [Listener(name, (Ping,), target(name)) for name in ("a", "b", "c")]
    backend = FlakyBackend()
    replies: list[Reply] = []
    async with StreamPump(
        Organism("t", tuple(listeners)), backend=backend, egress=replies.append
    ) as pump:
        backend.fail_for = "b"  # the second of the three targets
        reply = await pump.request(ping_xml(0), to="fan", sender="me", timeout=5)
        await pump.wait_idle()
        assert backend.failures == 1
        # The failure came after the first target's frame was made: a real mid-way failure.
        made = [c for c in backend.chains if c.endswith(('"a"]', '"b"]'))]
        assert [c[-4:] for c in made] == ['"a"]', '"b"]'], made
        assert got == {"a": [], "b": [], "c": []}
        stats = pump.statistics().listeners
        assert [stats[n].received for n in ("a", "b", "c")] == [0, 0, 0]
        assert isinstance(reply.payload, Huh), reply
        assert reply.payload.code == "backend-unavailable", reply.payload
        assert reply.payload.listener == "fan" and reply.to == "me"
        assert [r.payload for r in replies] == [reply.payload]
        assert await dead_codes(pump) == ["backend-unavailable"]

        backend.fail_for = None  # healthy again: the pump still serves
        ok = await pump.request(ping_xml(1), to="fan", sender="me", timeout=5)
        assert isinstance(ok.payload, Pong) and ok.payload.by.startswith("fan<-"), ok
        await pump.wait_idle()
        assert got == {"a": [1], "b": [1], "c": [1]}
        assert await dead_codes(pump) == ["backend-unavailable"]


# -- 3. SystemExit and KeyboardInterrupt in a handler fail only its message ---------


def raises_sync(exc_type: type[BaseException]) -> Callable[..., Any]:
    def handler(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        if payload.n == 0:
            raise exc_type("from the handler")
        return HandlerResponse.respond(Pong(n=payload.n))

    return handler


def raises_async(exc_type: type[BaseException]) -> Callable[..., Any]:
    async def handler(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        if payload.n == 0:
            raise exc_type("from the handler")
        return HandlerResponse.respond(Pong(n=payload.n))

    return handler


@pytest.mark.parametrize(
    ("make", "exc_type"),
    [
        pytest.param(raises_sync, SystemExit, id="sync-SystemExit"),
        pytest.param(raises_sync, KeyboardInterrupt, id="sync-KeyboardInterrupt"),
        pytest.param(raises_async, SystemExit, id="async-SystemExit"),
    ],
)
async def test_system_exit_in_a_handler_fails_only_its_message(
    run_pump, make: Callable[..., Any], exc_type: type[BaseException]
) -> None:
    async with run_pump([Listener("x", (Ping,), make(exc_type))]) as h:
        for _ in range(2):
            reply = await h.pump.request(ping_xml(0), to="x", timeout=5)
            assert isinstance(reply.payload, Huh), reply
            assert reply.payload.code == "handler-error"
            assert exc_type.__name__ in reply.payload.message, reply.payload.message
            ok = await h.pump.request(ping_xml(1), to="x", timeout=5)
            assert ok.payload == Pong(n=1)
        assert h.pump.statistics().listeners["x"].failed == 2
        assert await dead_codes(h.pump) == ["handler-error", "handler-error"]


# -- 4. request / reply ---------------------------------------------------------------


def two_hops() -> list[Listener]:
    async def front(payload: Ping | Pong, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Ping):
            return HandlerResponse(Ping(n=payload.n, text=payload.text), to="back")
        return HandlerResponse.respond(Pong(n=payload.n, by=f"front<-{payload.by}"))

    return [Listener("front", (Ping, Pong), front), Listener("back", (Ping,), boom)]


def assert_re(reply: Reply, expected: str) -> None:
    assert reply.re == expected, reply
    data = reply.to_xml()
    assert f"<re>{expected}</re>".encode() in data, data
    assert parse_envelope(data).re == expected


async def test_every_reply_carries_re_the_external_message_id(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong), *two_hops()]) as h:
        pump = h.pump
        reply = await pump.request(envelope("me", ping_xml(1), to="e", id="m-7"), timeout=5)
        assert reply.payload == Pong(n=1, by="e")
        assert_re(reply, "m-7")
        # A message continuing the conversation is answered with its own id.
        more = envelope("me", ping_xml(2), to="e", id="m-8", thread=reply.thread_id)
        again = await pump.request(more, timeout=5)
        assert again.thread_id == reply.thread_id
        assert_re(again, "m-8")

        # Without <id>, re is the id the pump gave the input (recorded on the root frame).
        bare = await pump.request(ping_xml(3), to="e", timeout=5)
        assert bare.re
        [out, _] = await pump.backend.buffer_get_thread(bare.thread_id)
        assert out.direction == "out" and out.message_id == bare.re
        assert_re(bare, bare.re)

        # After several hops: front -> back -> front -> caller.
        hops = await pump.request(envelope("me", ping_xml(4), to="front", id="m-9"), timeout=5)
        assert hops.payload == Pong(n=4, by="front<-back")
        assert_re(hops, "m-9")

        # A Huh for a failure one hop down (front does not accept Huh: the caller gets it).
        failed = envelope("me", ping_xml(5, "boom"), to="front", id="m-10")
        huh = await pump.request(failed, timeout=5)
        assert isinstance(huh.payload, Huh) and huh.payload.code == "handler-error"
        assert_re(huh, "m-10")
        # And a Huh for the failure of the first handler.
        huh = await pump.request(
            envelope("me", ping_xml(6, "boom"), to="back", id="m-11"), timeout=5
        )
        assert isinstance(huh.payload, Huh) and huh.payload.code == "handler-error"
        assert_re(huh, "m-11")
        bare_huh = await pump.request(ping_xml(7, "boom"), to="back", timeout=5)
        assert isinstance(bare_huh.payload, Huh) and bare_huh.re
        assert_re(bare_huh, bare_huh.re)
        await pump.wait_idle()
        assert all(r.re for r in h.replies), h.replies


async def test_an_external_message_may_name_its_own_thread(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        pump = h.pump
        first = await pump.request(
            envelope("me", ping_xml(1), to="e", thread="order-42"), timeout=5
        )
        assert first.payload == Pong(n=1, by="e") and first.thread_id == "order-42"
        second = await pump.request(
            envelope("me", ping_xml(2), to="e", thread="order-42"), timeout=5
        )
        assert second.payload == Pong(n=2, by="e") and second.thread_id == "order-42"
        root = await pump.backend.buffer_get_thread("order-42")
        assert [s.direction for s in root] == ["out", "in", "out", "in"]
        # Through the API too, and up to 128 characters of the allowed alphabet.
        token = "A9._:@-" + "x" * 121
        assert len(token) == 128
        assert await pump.inject(ping_xml(3), to="e", thread=token) == token
        await pump.wait_idle()

        for bad in ("has space", "-leading-dash", "x" * 129, "a/b"):
            data = envelope("me", ping_xml(4), to="e", thread=bad)
            reply = await pump.request(data, timeout=5)
            assert isinstance(reply.payload, Huh) and reply.payload.code == "envelope", bad
            assert reply.thread_id is None
        assert pump.statistics().rejected == 4
        assert pump.statistics().listeners["e"].received == 3


async def test_request_raises_no_reply_when_the_conversation_ends_silently(run_pump) -> None:
    async def silent(payload: Ping, meta: HandlerMetadata) -> None:
        return None

    async def relay(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse(payload, to="silent")

    listeners = [Listener("silent", (Ping,), silent), Listener("relay", (Ping,), relay)]
    async with run_pump(listeners) as h:
        with pytest.raises(NoReply):
            await h.pump.request(ping_xml(1), to="silent", timeout=5)
        with pytest.raises(NoReply):
            await h.pump.request(ping_xml(2), to="relay", timeout=5)
        await h.pump.wait_idle()
        assert await dead_codes(h.pump) == []


async def test_no_reply_waits_for_what_the_request_itself_caused(run_pump) -> None:
    # Other work of the conversation ending does not end the request's wait.
    gates = {"quiet": asyncio.Event(), "answer": asyncio.Event()}

    async def quiet(payload: Ping, meta: HandlerMetadata) -> None:
        await gates["quiet"].wait()

    async def answer(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        await gates["answer"].wait()
        return HandlerResponse.respond(Pong(n=payload.n))

    listeners = [Listener("quiet", (Ping,), quiet), Listener("answer", (Ping,), answer)]
    async with run_pump(listeners) as h:
        conv = await h.pump.inject(ping_xml(1), to="quiet", thread="conv-1")
        request = asyncio.ensure_future(
            h.pump.request(ping_xml(2), to="answer", thread=conv, timeout=10)
        )
        await wait_for(lambda: h.pump.statistics().listeners["answer"].in_flight == 1)
        gates["quiet"].set()
        await wait_for(lambda: h.pump.statistics().listeners["quiet"].handled == 1)
        await asyncio.sleep(0)
        assert not request.done(), "the request's own message is still being handled"
        gates["answer"].set()
        assert (await request).payload == Pong(n=2)


async def test_concurrent_requests_on_one_conversation_get_their_own_replies(run_pump) -> None:
    # Two listeners of one conversation (two frames, so no order between them): the
    # later request is answered first, and still each gets the reply to its message.
    gates = {1: asyncio.Event(), 2: asyncio.Event()}

    async def gated(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        await gates[payload.n].wait()
        return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))

    listeners = [Listener("g1", (Ping,), gated), Listener("g2", (Ping,), gated)]
    async with run_pump(listeners) as h:
        first = asyncio.ensure_future(
            h.pump.request(ping_xml(1), to="g1", thread="c-2", timeout=10)
        )
        await wait_for(lambda: h.pump.statistics().listeners["g1"].in_flight == 1)
        second = asyncio.ensure_future(
            h.pump.request(ping_xml(2), to="g2", thread="c-2", timeout=10)
        )
        await wait_for(lambda: h.pump.statistics().listeners["g2"].in_flight == 1)
        gates[2].set()
        await wait_for(lambda: h.pump.statistics().egress == 1)
        gates[1].set()
        one, two = await asyncio.gather(first, second)
        assert (one.payload, two.payload) == (Pong(n=1, by="g1"), Pong(n=2, by="g2"))
        assert one.thread_id == two.thread_id == "c-2"


class _FailingAppend(MemoryBackend):
    """buffer_append fails (or hangs) until told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.hang: asyncio.Event | None = None

    async def buffer_append(self, thread_id: str, slot: Any) -> int:
        if self.hang is not None:
            await self.hang.wait()
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("a transient outage")
        return await super().buffer_append(thread_id, slot)


async def test_an_ingest_that_failed_or_was_cancelled_does_not_block_its_retry() -> None:
    backend = _FailingAppend()
    organism = Organism("t", (Listener("e", (Ping,), pong),))
    data = envelope("client", ping_xml(1), to="e", id="m-1")
    async with StreamPump(organism, backend=backend) as pump:
        backend.failures = 1
        with pytest.raises(BackendUnavailable):
            await pump.request(data, timeout=5)
        reply = await pump.request(data, timeout=5)  # the retry is not a duplicate
        assert reply.payload == Pong(n=1, by="e")

        backend.hang = asyncio.Event()
        other = envelope("client", ping_xml(2), to="e", id="m-2")
        stuck = asyncio.ensure_future(pump.request(other, timeout=5))
        await wait_for(lambda: pump._ingesting == 1)
        await asyncio.sleep(0)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        backend.hang.set()
        backend.hang = None
        reply = await pump.request(other, timeout=5)
        assert reply.payload == Pong(n=2, by="e")
        assert pump.statistics().duplicates == 0
        # A retry of an answered message is still one.
        with pytest.raises(Duplicate):
            await pump.request(data, timeout=5)


async def test_aclose_from_a_handler_stops_the_pump_at_once() -> None:
    box: list[StreamPump] = []

    async def stop(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        await box[0].aclose()
        return HandlerResponse.respond(Pong(n=payload.n))

    organism = Organism("t", (Listener("stop", (Ping,), stop),))
    async with asyncio.timeout(5), StreamPump(organism) as pump:
        box.append(pump)
        await pump.inject(ping_xml(1), to="stop")
        await pump._closed.wait()
    stats = pump.statistics()
    assert stats.listeners["stop"].handled == 1 and stats.abandoned == 0


async def test_aclose_while_the_pump_is_starting_waits_for_it_then_stops_it() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    class SlowPing(MemoryBackend):
        async def ping(self) -> None:
            started.set()
            await release.wait()

    organism = Organism("t", (Listener("e", (Ping,), pong),))
    pump = StreamPump(organism, backend=SlowPing())

    async def close_soon() -> None:
        await started.wait()
        closing = asyncio.ensure_future(pump.aclose())
        await asyncio.sleep(0)
        release.set()
        await closing

    async with asyncio.timeout(10):
        closer = asyncio.ensure_future(close_soon())
        async with pump:
            await closer
            with pytest.raises(PumpClosed):
                await pump.request(ping_xml(1), to="e", timeout=5)


async def test_a_sync_handler_raising_stop_iteration_fails_only_its_message(run_pump) -> None:
    def stops(payload: Ping, meta: HandlerMetadata) -> None:
        raise StopIteration

    async with run_pump([Listener("s", (Ping,), stops), Listener("e", (Ping,), pong)]) as h:
        reply = await h.pump.request(ping_xml(1), to="s", timeout=5)
        assert isinstance(reply.payload, Huh) and reply.payload.code == "handler-error"
        assert "StopIteration" in reply.payload.message
        assert (await h.pump.request(ping_xml(2), to="e", timeout=5)).payload.n == 2  # type: ignore[attr-defined]


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def test_failures_come_back_as_huh_replies_and_raise_for_huh(run_pump) -> None:
    async with run_pump([Listener("b", (Ping,), boom)]) as h:
        failed = await h.pump.request(ping_xml(1, "boom"), to="b", timeout=5)
        assert isinstance(failed, Reply) and isinstance(failed.payload, Huh) and failed.is_huh
        with pytest.raises(HandlerFailed, match="kaboom") as info:
            failed.raise_for_huh()
        assert info.value.listener == "b" and info.value.code == "handler-error"

        rejected = await h.pump.request(b"<oops", to="b", timeout=5)
        assert isinstance(rejected, Reply) and isinstance(rejected.payload, Huh)
        with pytest.raises(MalformedMessage):
            rejected.raise_for_huh()

        ok = await h.pump.request(ping_xml(2), to="b", timeout=5)
        assert not ok.is_huh and ok.raise_for_huh() is ok

        data = envelope("me", ping_xml(3), to="b", id="once")
        assert (await h.pump.request(data, timeout=5)).payload == Pong(n=3, by="b")
        with pytest.raises(Duplicate):
            await h.pump.request(data, timeout=5)


async def test_request_never_leaks_a_waiter(run_pump) -> None:
    gates = {1: asyncio.Event(), 2: asyncio.Event()}
    started = {1: asyncio.Event(), 2: asyncio.Event()}

    async def waiting(payload: Ping, meta: HandlerMetadata) -> HandlerResponse | None:
        if payload.n == 0:
            return None
        if payload.n in gates:
            started[payload.n].set()
            await gates[payload.n].wait()
        return HandlerResponse.respond(Pong(n=payload.n))

    async with run_pump([Listener("w", (Ping,), waiting)]) as h:
        pump = h.pump
        assert (await pump.request(b"<oops", to="w", timeout=5)).is_huh
        assert pump._waiters == {}
        with pytest.raises(NoReply):
            await pump.request(ping_xml(0), to="w", timeout=5)
        assert pump._waiters == {}
        data = envelope("me", ping_xml(5), to="w", id="w-1")
        assert await pump.inject(data) is not None
        await pump.wait_idle()
        with pytest.raises(Duplicate):
            await pump.request(data, timeout=5)
        assert pump._waiters == {}

        with pytest.raises(TimeoutError):
            await pump.request(ping_xml(1), to="w", timeout=0.05)
        assert pump._waiters == {}
        gates[1].set()
        await pump.wait_idle()

        task = asyncio.create_task(pump.request(ping_xml(2), to="w", timeout=30))
        await asyncio.wait_for(started[2].wait(), 5)
        assert pump._waiters != {}, "the request is waiting (so the check below can fail)"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pump._waiters == {}
        gates[2].set()
        await pump.wait_idle()
        assert pump._waiters == {} and pump._open == {}
        # The released handlers still answered (egress), though nobody waited any more.
        assert [r.payload.n for r in h.replies[1:]] == [5, 1, 2]


async def test_an_answered_request_leaves_no_waiter(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        for n in range(3):
            assert (await h.pump.request(ping_xml(n), to="e", timeout=5)).payload.n == n
        await h.pump.wait_idle()
        assert (len(h.pump._waiters), len(h.pump._open)) == (0, 0)


async def test_a_pump_outside_its_lifetime_raises_pump_closed() -> None:
    pump = StreamPump(Organism("t", (Listener("e", (Ping,), pong),)))
    with pytest.raises(PumpClosed) as info:
        await pump.inject(ping_xml(1), to="e")
    assert isinstance(info.value, XmlPipelineError) and isinstance(info.value, RuntimeError)
    assert isinstance(info.value, PumpError)
    with pytest.raises(PumpClosed):
        await pump.request(ping_xml(1), to="e", timeout=5)
    async with pump:
        with pytest.raises(PumpError):
            async with pump:
                pass
        # Refusing to enter again did not stop the running pump.
        assert (await pump.request(ping_xml(2), to="e", timeout=5)).payload == Pong(n=2, by="e")
    with pytest.raises(PumpClosed) as info:
        await pump.inject(ping_xml(3), to="e")
    assert isinstance(info.value, XmlPipelineError) and isinstance(info.value, RuntimeError)
    with pytest.raises(PumpClosed):
        await pump.request(ping_xml(3), to="e", timeout=5)
    with pytest.raises(PumpError):
        async with pump:
            pass


# -- 5. clear words ---------------------------------------------------------------------


def warnings_naming(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and word in r.getMessage()
    ]


async def test_a_forward_to_an_unknown_listener_reaches_the_caller(run_pump, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xml_pipeline")

    async def lost(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse(Ping(n=1), to="nosuch")

    async with run_pump([Listener("lost", (Ping,), lost)]) as h:
        reply = await h.pump.request(ping_xml(1), to="lost", sender="me", timeout=5)
        assert isinstance(reply.payload, Huh), reply
        assert reply.payload.code == "no-route" and "nosuch" in reply.payload.message
        assert reply.to == "me"
        assert warnings_naming(caplog, "nosuch"), caplog.records
        assert await dead_codes(h.pump) == ["no-route"]


async def test_a_payload_in_the_wrong_namespace_gets_a_hint(run_pump) -> None:
    wrong = b'<Ping xmlns="urn:wrong"><n>1</n></Ping>'
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        for to in ("e", None):
            reply = await h.pump.request(wrong, to=to, timeout=5)
            assert isinstance(reply.payload, Huh) and reply.payload.code == "no-route", reply
            assert NS in reply.payload.message, reply.payload.message


async def test_text_that_is_not_xml_is_called_so(run_pump) -> None:
    async with run_pump([Listener("e", (Ping,), pong)]) as h:
        reply = await h.pump.request(b"hello world", to="e", timeout=5)
        assert isinstance(reply.payload, Huh) and reply.payload.code == "malformed", reply
        assert reply.payload.message.startswith("not XML"), reply.payload.message


async def test_an_invalid_return_is_logged_naming_the_listener(run_pump, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xml_pipeline")
    async with run_pump([Listener("odd-returner", (Ping,), bad_return)]) as h:
        reply = await h.pump.request(ping_xml(1), to="odd-returner", timeout=5)
        assert isinstance(reply.payload, Huh) and reply.payload.code == "invalid-return", reply
        assert warnings_naming(caplog, "odd-returner"), caplog.records
