"""The backend conformance suite, public so any backend can be checked with one call.

::

    from contextlib import asynccontextmanager
    from xml_pipeline.testing import check_backend

    @asynccontextmanager
    async def my_backend(limits):
        backend = MyBackend(limits)
        await backend.buffer_clear(); await backend.registry_clear()
        await backend.deadletter_purge()
        try:
            yield backend
        finally:
            await backend.aclose()

    await check_backend(my_backend)          # raises AssertionError naming the check

Each check gets a fresh, empty backend from the factory, built with the limits the
check needs. :data:`CHECKS` lists them, so a test suite can parametrize over them;
:func:`backend_state_machine` compares a backend with the reference
:class:`~xml_pipeline.backends.store.Store` under random operations (hypothesis).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from .backends.base import Backend, DeadLetter, HistoryLimits, Slot
from .backends.store import Store

__all__ = ["CHECKS", "BackendFactory", "Check", "backend_state_machine", "check_backend"]

BackendFactory = Callable[[HistoryLimits], AbstractAsyncContextManager[Backend]]
"""Makes a fresh, empty backend with the given limits, closed when the block ends."""


@dataclass(frozen=True)
class Check:
    """One conformance check: a name, the limits it needs and the coroutine."""

    name: str
    run: Callable[[Backend], Awaitable[None]]
    limits: HistoryLimits = field(default_factory=HistoryLimits)


def _slot(mid: str, direction: str = "in", *, sender: str = "a", xml: bytes = b"<P/>") -> Slot:
    return Slot(0, direction, sender, "b", "{urn:x}P", mid, 1_700_000_000.25, xml)  # type: ignore[arg-type]


async def _append_and_read(b: Backend) -> None:
    assert await b.buffer_get_thread("t1") == []
    assert not await b.buffer_thread_exists("t1")
    for i in range(5):
        assert await b.buffer_append("t1", _slot(f"m{i}")) == i, "indexes count from 0"
    slots = await b.buffer_get_thread("t1")
    assert [s.message_id for s in slots] == [f"m{i}" for i in range(5)], "oldest first"
    assert [s.index for s in slots] == list(range(5))
    assert await b.buffer_thread_len("t1") == 5
    assert await b.buffer_thread_exists("t1")
    got = await b.buffer_get_slot("t1", 3)
    assert got is not None and got.message_id == "m3" and got.index == 3
    assert await b.buffer_get_slot("t1", 5) is None
    assert await b.buffer_get_slot("t1", -1) is None
    assert await b.buffer_get_slot("nope", 0) is None
    await b.buffer_append("t2", _slot("x"))
    assert sorted(await b.buffer_list_threads()) == ["t1", "t2"], "bare thread ids"
    assert await b.buffer_delete_thread("t1")
    assert not await b.buffer_delete_thread("t1")
    assert await b.buffer_get_thread("t1") == []
    await b.buffer_clear()
    assert await b.buffer_list_threads() == []


async def _slot_fields_round_trip(b: Backend) -> None:
    slot = Slot(0, "out", "caller é \u2603", None, "{urn:ü}P", "id-\u00e9", 1.5, b"\x00\xff<P/>")
    await b.buffer_append("t", slot)
    [got] = await b.buffer_get_thread("t")
    assert got == slot, f"{got!r} != {slot!r}"
    assert type(got.xml) is bytes and type(got.timestamp) is float


async def _append_is_idempotent(b: Backend) -> None:
    assert await b.buffer_append("t", _slot("m", "in")) == 0
    assert await b.buffer_append("t", _slot("m", "out")) == 1, "direction is part of the key"
    assert await b.buffer_append("t", _slot("m", "in", sender="other")) == 0
    assert await b.buffer_append("t", _slot("m", "out")) == 1
    assert await b.buffer_thread_len("t") == 2
    assert await b.buffer_contains("t", "m", "in")
    assert await b.buffer_contains("t", "m", "out")
    assert not await b.buffer_contains("t", "n", "in")
    assert not await b.buffer_contains("u", "m", "in")
    assert await b.buffer_append("u", _slot("m", "in")) == 0, "keys are per frame"


async def _trimming_keeps_absolute_indexes(b: Backend) -> None:
    for i in range(7):
        assert await b.buffer_append("t", _slot(f"m{i}")) == i
    slots = await b.buffer_get_thread("t")
    assert [s.index for s in slots] == [4, 5, 6], "the oldest slots are trimmed"
    assert await b.buffer_thread_len("t") == 3
    assert await b.buffer_get_slot("t", 3) is None
    got = await b.buffer_get_slot("t", 5)
    assert got is not None and got.message_id == "m5"
    assert await b.buffer_append("t", _slot("m6")) == 6, "idempotent after trimming too"


async def _concurrent_appends(b: Backend) -> None:
    indexes = await asyncio.gather(*(b.buffer_append("t", _slot(f"m{i}")) for i in range(200)))
    assert sorted(indexes) == list(range(200)), "every append got its own index"
    slots = await b.buffer_get_thread("t")
    assert [s.index for s in slots] == list(range(200))
    by_index = dict(zip(indexes, (f"m{i}" for i in range(200)), strict=True))
    assert [s.message_id for s in slots] == [by_index[i] for i in range(200)]
    again = await asyncio.gather(*(b.buffer_append("t", _slot(f"m{i}")) for i in range(200)))
    assert again == indexes, "concurrent retries are idempotent"


async def _registry(b: Backend) -> None:
    chain = '["caller.x","root",["not","split"],"calc.add"]'
    assert await b.registry_get_uuid(chain) is None
    await b.registry_set(chain, "u1")
    assert await b.registry_get_uuid(chain) == "u1"
    assert await b.registry_get_chain("u1") == chain
    assert await b.registry_setdefault(chain, "u2") == "u1", "setdefault keeps the first"
    assert await b.registry_setdefault('["a","r"]', "u3") == "u3"
    assert await b.registry_list_all() == {"u1": chain, "u3": '["a","r"]'}
    await b.registry_set(chain, "u4")  # replaces u1
    assert await b.registry_get_uuid(chain) == "u4"
    assert await b.registry_get_chain("u1") is None
    assert await b.registry_delete("u4")
    assert not await b.registry_delete("u4")
    assert await b.registry_get_uuid(chain) is None
    await b.registry_clear()
    assert await b.registry_list_all() == {}


async def _registry_setdefault_races(b: Backend) -> None:
    winners = await asyncio.gather(
        *(b.registry_setdefault('["o","r","x"]', f"u{i}") for i in range(50))
    )
    assert len(set(winners)) == 1, "racing setdefaults agree on one uuid"
    assert await b.registry_get_chain(winners[0]) == '["o","r","x"]'


def _letter(reason: str, data: bytes = b"<bad") -> DeadLetter:
    return DeadLetter("", 1_700_000_000.5, "malformed", reason, "x.y", "t", "m", data)


async def _dead_letters(b: Backend) -> None:
    assert await b.deadletter_list() == []
    ids = [await b.deadletter_add(_letter(f"r{i}", bytes([i]) * 3)) for i in range(4)]
    assert len(set(ids)) == 4 and all(ids), "each dead letter gets its own id"
    letters = await b.deadletter_list()
    assert [letter.reason for letter in letters] == ["r0", "r1", "r2", "r3"], "oldest first"
    assert [letter.id for letter in letters] == ids
    first = letters[0]
    assert (first.code, first.listener, first.thread_id, first.message_id, first.data) == (
        "malformed", "x.y", "t", "m", b"\x00\x00\x00",
    )  # fmt: skip
    assert first.timestamp == 1_700_000_000.5
    assert [letter.reason for letter in await b.deadletter_list(limit=2)] == ["r0", "r1"]
    assert await b.deadletter_delete(ids[1])
    assert not await b.deadletter_delete(ids[1])
    assert await b.deadletter_purge() == 3
    assert await b.deadletter_list() == []


async def _dead_letters_are_capped(b: Backend) -> None:
    for i in range(5):
        await b.deadletter_add(_letter(f"r{i}", b"0123456789"))
    letters = await b.deadletter_list()
    assert [letter.reason for letter in letters] == ["r2", "r3", "r4"], "the oldest are dropped"
    assert all(letter.data == b"01234" for letter in letters), "data is capped"


async def _info_and_close(b: Backend) -> None:
    await b.buffer_append("t", _slot("m"))
    await b.registry_set('["a","t"]', "t")
    await b.deadletter_add(_letter("r"))
    info = await b.info()
    assert info["buffer_threads"] == 1
    assert info["registry_entries"] == 1
    assert info["dead_letters"] == 1
    assert all(isinstance(v, int) for v in info.values())


CHECKS: tuple[Check, ...] = (
    Check("append and read", _append_and_read),
    Check("slot fields round-trip", _slot_fields_round_trip),
    Check("append is idempotent", _append_is_idempotent),
    Check("trimming keeps absolute indexes", _trimming_keeps_absolute_indexes,
          HistoryLimits(max_slots_per_thread=3)),
    Check("concurrent appends", _concurrent_appends),
    Check("registry", _registry),
    Check("racing registry_setdefault", _registry_setdefault_races),
    Check("dead letters", _dead_letters),
    Check("dead letters are capped", _dead_letters_are_capped,
          HistoryLimits(max_dead_letters=3, dead_letter_bytes=5)),
    Check("info", _info_and_close),
)  # fmt: skip
"""Every conformance check, in order."""


async def run_check(factory: BackendFactory, check: Check) -> None:
    """Run one check on a fresh backend; AssertionError names the check."""
    async with factory(check.limits) as backend:
        try:
            await check.run(backend)
        except AssertionError as exc:
            raise AssertionError(f"conformance check {check.name!r} failed: {exc}") from exc
        await backend.aclose()
        await backend.aclose()  # idempotent


async def check_backend(factory: BackendFactory) -> None:
    """Run every conformance check against backends made by ``factory``.

    Raises:
        AssertionError: naming the first failing check.
    """
    for check in CHECKS:
        await run_check(factory, check)


def backend_state_machine(factory: BackendFactory, *, loop_factory: Any = None) -> Any:
    """A hypothesis state machine comparing a backend with the reference Store.

    Usage in a test module: ``TestMyBackend = backend_state_machine(factory).TestCase``.
    Each run gets a fresh backend (from ``factory``) on its own event loop
    (``loop_factory``, default ``asyncio.new_event_loop``).
    """
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    threads = st.sampled_from(["t1", "t2", "t.3"])
    ids = st.sampled_from(["m1", "m2", "m3", "m4"])
    directions = st.sampled_from(["in", "out"])
    chains = st.sampled_from(['["a","r"]', '["a","r","x.y"]', '["b","r2"]'])
    uuids = st.sampled_from(["u1", "u2", "u3"])
    limits = HistoryLimits(max_slots_per_thread=4, max_dead_letters=3, dead_letter_bytes=8)

    class BackendComparison(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = (loop_factory or asyncio.new_event_loop)()
            self.context = factory(limits)
            self.backend: Backend = self.loop.run_until_complete(self.context.__aenter__())
            self.model = Store(limits)

        def run(self, coro: Awaitable[Any]) -> Any:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            try:
                self.run(self.context.__aexit__(None, None, None))
            finally:
                self.loop.close()

        @rule(thread=threads, mid=ids, direction=directions)
        def append(self, thread: str, mid: str, direction: str) -> None:
            slot = _slot(mid, direction)
            assert self.run(self.backend.buffer_append(thread, slot)) == self.model.buffer_append(
                thread, slot
            )

        @rule(thread=threads, index=st.integers(-1, 8))
        def get_slot(self, thread: str, index: int) -> None:
            got = self.run(self.backend.buffer_get_slot(thread, index))
            assert got == self.model.buffer_get_slot(thread, index)

        @rule(thread=threads)
        def delete_thread(self, thread: str) -> None:
            got = self.run(self.backend.buffer_delete_thread(thread))
            assert got == self.model.buffer_delete_thread(thread)

        @rule(chain=chains, uuid=uuids)
        def registry_set(self, chain: str, uuid: str) -> None:
            self.run(self.backend.registry_set(chain, uuid))
            self.model.registry_set(chain, uuid)

        @rule(chain=chains, uuid=uuids)
        def registry_setdefault(self, chain: str, uuid: str) -> None:
            got = self.run(self.backend.registry_setdefault(chain, uuid))
            assert got == self.model.registry_setdefault(chain, uuid)

        @rule(uuid=uuids)
        def registry_delete(self, uuid: str) -> None:
            got = self.run(self.backend.registry_delete(uuid))
            assert got == self.model.registry_delete(uuid)

        @rule(reason=st.sampled_from(["r1", "r2"]), data=st.binary(max_size=12))
        def deadletter_add(self, reason: str, data: bytes) -> None:
            self.run(self.backend.deadletter_add(_letter(reason, data)))
            self.model.deadletter_add(_letter(reason, data))

        @invariant()
        def same_state(self) -> None:
            for thread in ("t1", "t2", "t.3"):
                got = self.run(self.backend.buffer_get_thread(thread))
                assert got == self.model.buffer_get_thread(thread), thread
            assert sorted(self.run(self.backend.buffer_list_threads())) == sorted(
                self.model.buffer_list_threads()
            )
            assert self.run(self.backend.registry_list_all()) == self.model.registry_list_all()
            letters = self.run(self.backend.deadletter_list())
            expected = self.model.deadletter_list()
            assert [(x.reason, x.data) for x in letters] == [(x.reason, x.data) for x in expected]

    return BackendComparison
