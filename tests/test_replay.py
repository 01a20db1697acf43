"""``StreamPump.replay``: a dead letter goes back where it failed, once, and keeps its
history when it is refused again.

Before: every letter was injected as a new conversation from ``replay`` (a failed
hop's answer went to the replay, not to the conversation's caller), and an egress
letter (a reply that could not be written) came back as a new request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from cli_process import until
from lxml import etree
from support import NS, Ping, Pong

from xml_pipeline import (
    DeadLetter,
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
    Organism,
    Payload,
    Reply,
    StreamPump,
    build_envelope,
)
from xml_pipeline.backends import Backend
from xml_pipeline.backends.memory import MemoryBackend


class Job(Payload):
    xml_ns = NS
    n: int


class Done(Payload):
    xml_ns = NS
    n: int
    by: str


@dataclass
class Organ:
    """front forwards each Ping to worker as a Job; worker answers front; front
    answers the caller. worker fails while ``broken``; egress fails while ``deaf``."""

    broken: bool = True
    deaf: bool = False
    worker_calls: int = 0
    replies: list[Reply] = field(default_factory=list)

    async def front(self, payload: Ping | Done, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Ping):
            return HandlerResponse(Job(n=payload.n), to="worker")
        return HandlerResponse.respond(Pong(n=payload.n, by=payload.by))

    async def worker(self, payload: Job, meta: HandlerMetadata) -> HandlerResponse:
        self.worker_calls += 1
        if self.broken:
            raise RuntimeError("the worker is broken")
        return HandlerResponse.respond(Done(n=payload.n, by=meta.own_name))

    def egress(self, reply: Reply) -> None:
        if self.deaf and not reply.is_huh:
            raise OSError("the caller hung up")
        self.replies.append(reply)


@asynccontextmanager
async def organism(organ: Organ, backend: Backend | None = None) -> AsyncIterator[StreamPump]:
    listeners = (
        Listener("front", (Ping, Done), organ.front),
        Listener("worker", (Job,), organ.worker),
    )
    org = Organism(name="replayed", listeners=listeners)
    async with StreamPump(org, egress=organ.egress, backend=backend) as pump:
        yield pump


async def _letters(pump: StreamPump, count: int) -> list[DeadLetter]:
    await until(
        lambda: pump.backend._store.info()["dead_letters"] >= count,  # type: ignore[attr-defined]
        f"{count} dead letter(s)",
        10,
    )
    return await pump.backend.deadletter_list()


async def test_a_failed_delivery_continues_its_conversation() -> None:
    organ = Organ()
    async with organism(organ) as pump:
        root = await pump.inject(Ping(n=7), to="front", sender="alice")
        [letter] = await _letters(pump, 1)
        assert (letter.stage, letter.listener, letter.sender) == ("delivery", "worker", "front")
        assert letter.code == "handler-error" and letter.attempts == 1
        await until(lambda: len(organ.replies) == 1, "the Huh to alice", 10)
        organ.broken = False
        await pump.backend.deadletter_delete(letter.id)
        assert await pump.replay(letter)
        await until(lambda: len(organ.replies) == 2, "the answer", 10)
        answer = organ.replies[-1]
        # It went where it would have gone: to alice, on her conversation, about her Ping.
        assert isinstance(answer.payload, Pong) and answer.payload.by == "worker"
        assert (answer.thread_id, answer.to, answer.re) == (root, "alice", letter.re)
        assert answer.re == organ.replies[0].re, "the same <re> as the first answer"
        history = await pump.backend.buffer_get_thread(root or "")
        assert [s.direction for s in history] == ["out", "in", "in"], "one conversation"
        assert await pump.backend.deadletter_list() == []


async def test_a_letter_refused_again_keeps_its_history() -> None:
    organ = Organ()
    async with organism(organ) as pump:
        await pump.inject(Ping(n=1), to="front", sender="alice")
        [first] = await _letters(pump, 1)
        await pump.backend.deadletter_delete(first.id)
        assert await pump.replay(first), "accepted: it fails in its handler again"
        [second] = await _letters(pump, 1)
        assert (second.code, second.reason) == (first.code, first.reason)
        assert second.attempts == 2
        assert (
            second.last_error == "handler-error: worker raised RuntimeError: the worker is broken"
        )
        assert (second.thread_id, second.listener) == (first.thread_id, first.listener)
        await pump.backend.deadletter_delete(second.id)
        await pump.replay(second)
        [third] = await _letters(pump, 1)
        assert third.attempts == 3 and third.code == first.code
        assert organ.worker_calls == 3


async def test_an_egress_letter_is_written_again_not_run_again() -> None:
    organ = Organ(broken=False, deaf=True)
    async with organism(organ) as pump:
        root = await pump.inject(Ping(n=3), to="front", sender="alice")
        [letter] = await _letters(pump, 1)
        assert (letter.stage, letter.code) == ("egress", "egress")
        assert organ.replies == [] and organ.worker_calls == 1
        organ.deaf = False
        await pump.backend.deadletter_delete(letter.id)
        assert await pump.replay(letter)
        [reply] = organ.replies
        assert isinstance(reply.payload, Pong) and reply.payload.n == 3
        assert (reply.thread_id, reply.to, reply.sender) == (root, "alice", "front")
        assert reply.message_id == letter.message_id
        assert organ.worker_calls == 1, "no handler ran again"


async def test_refused_input_is_fed_in_as_from_its_first_sender() -> None:
    organ = Organ(broken=False)
    async with organism(organ) as pump:
        bad = f'<Ping xmlns="{NS}"><n>1</n>'.encode()  # never closed
        assert await pump.inject(bad, to="front", sender="bob") is None
        [letter] = await _letters(pump, 1)
        assert (letter.stage, letter.sender, letter.code) == ("ingress", "bob", "malformed")
        assert letter.to == "front"
        await pump.backend.deadletter_delete(letter.id)
        assert not await pump.replay(letter), "still malformed"
        [again] = await _letters(pump, 1)
        assert (again.attempts, again.code, again.sender, again.to) == (
            2,
            "malformed",
            "bob",
            "front",
        )
        assert again.last_error is not None and again.last_error.startswith("malformed: ")
        assert [r.to for r in organ.replies] == ["bob", "bob"], "each refusal answered to bob"


async def test_refused_input_replayed_runs_once_with_a_client_retry() -> None:
    """Its <id> was never reserved (it was refused before): the replay reserves it, so
    a client that sent it again meanwhile does not get it run twice."""
    backend = MemoryBackend()
    organ = Organ(broken=False)
    job = etree.fromstring(f'<Job xmlns="{NS}"><n>42</n></Job>')
    data = build_envelope(sender="alice", to="worker", id="order-42", payload=job)
    lonely = Organism(name="replayed", listeners=(Listener("front", (Ping, Done), organ.front),))
    async with StreamPump(lonely, egress=organ.egress, backend=backend) as pump:
        assert await pump.inject(data) is None, "no worker yet: no-route"
    [letter] = await backend.deadletter_list()
    assert (letter.stage, letter.code) == ("ingress", "no-route")
    async with organism(organ, backend) as pump:
        assert await pump.inject(data) is not None, "the client sends it again"
        await backend.deadletter_delete(letter.id)
        assert await pump.replay(letter), "a retry of what was accepted: nothing to do"
        await pump.wait_idle()
        assert organ.worker_calls == 1
        assert pump.statistics().duplicates == 1


async def test_a_failed_response_is_replayed_from_the_listener_that_answered() -> None:
    """front answers worker's Done by failing: the replay's Huh goes back to worker (who
    sent the response), in worker's frame, as the first time, not out to the caller."""
    seen: list[tuple[str, bool, bool]] = []
    huhs: list[str] = []

    async def front(payload: Ping | Done | Huh, meta: HandlerMetadata) -> HandlerResponse | None:
        if isinstance(payload, Huh):
            return None
        if isinstance(payload, Ping):
            return HandlerResponse(Job(n=payload.n), to="worker")
        seen.append((meta.from_id, meta.from_external, meta.is_self_call))
        raise RuntimeError("front cannot take Done")

    async def worker(payload: Job | Huh, meta: HandlerMetadata) -> HandlerResponse | None:
        if isinstance(payload, Huh):
            huhs.append(payload.code)
            return None
        return HandlerResponse.respond(Done(n=payload.n, by="worker"))

    replies: list[Reply] = []
    listeners = (
        Listener("front", (Ping, Done, Huh), front),
        Listener("worker", (Job, Huh), worker),
    )
    org = Organism(name="responses", listeners=listeners)
    async with StreamPump(org, egress=replies.append) as pump:
        await pump.inject(Ping(n=5), to="front", sender="alice")
        [letter] = await _letters(pump, 1)
        await until(lambda: huhs == ["handler-error"], "the Huh to worker", 10)
        assert (letter.stage, letter.listener, letter.sender) == ("delivery", "front", "worker")
        await pump.backend.deadletter_delete(letter.id)
        assert await pump.replay(letter)
        await until(lambda: huhs == ["handler-error"] * 2, "the second Huh to worker", 10)
        assert seen == [("worker", False, False)] * 2, "the same metadata both times"
        assert replies == [], "nothing went out to alice"


async def test_the_next_hop_failing_after_a_replay_is_a_letter_of_its_own() -> None:
    """front's Job had no route (no worker yet): replayed once worker exists, it gets
    there, and worker's failure is worker's letter (handler-error), not the first
    letter's no-route counted once more."""
    backend = MemoryBackend()
    organ = Organ()
    lonely = Organism(name="replayed", listeners=(Listener("front", (Ping, Done), organ.front),))
    async with StreamPump(lonely, egress=organ.egress, backend=backend) as pump:
        await pump.inject(Ping(n=1), to="front", sender="alice")
        [first] = await _letters(pump, 1)
    assert (first.stage, first.code, first.listener) == ("forward", "no-route", "front")
    async with organism(organ, backend) as pump:
        await backend.deadletter_delete(first.id)
        assert await pump.replay(first), "routed this time"
        [second] = await _letters(pump, 1)
        assert (second.stage, second.code, second.listener) == (
            "delivery",
            "handler-error",
            "worker",
        )
        assert (second.attempts, second.last_error) == (1, None)
