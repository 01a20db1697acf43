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

    await check_backend(my_backend)          # raises ConformanceError naming the check

Each check gets a fresh, empty backend from the factory, built with the limits the
check needs. :data:`CHECKS` lists them, so a test suite can parametrize over them;
:func:`backend_state_machine` compares a backend with the reference
:class:`~xml_pipeline.backends.store.Store` under random operations (hypothesis).

No check relies on ``assert``: each compares explicitly and raises
:class:`ConformanceError` (an ``AssertionError``, so test runners report it as a
failure), so a broken backend fails under ``python -O`` too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from .backends.base import OVER_BUDGET_NOTE, SAMPLE_BYTES, Backend, DeadLetter, HistoryLimits, Slot
from .backends.store import Store

__all__ = [
    "CHECKS",
    "BackendFactory",
    "Check",
    "ConformanceError",
    "backend_state_machine",
    "check_backend",
    "run_check",
]

BackendFactory = Callable[[HistoryLimits], AbstractAsyncContextManager[Backend]]
"""Makes a fresh, empty backend with the given limits, closed when the block ends."""


class ConformanceError(AssertionError):
    """A backend does not keep the contract: the message names the check and what differed."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "…"


def _expect(ok: bool, what: str) -> None:
    """Raise ConformanceError(``what``) unless ``ok``."""
    if not ok:
        raise ConformanceError(what)


def _equal(got: Any, expected: Any, what: str) -> None:
    """Raise ConformanceError naming ``what`` with both values unless they are equal."""
    if got != expected:
        raise ConformanceError(f"{what}: got {_show(got)}, expected {_show(expected)}")


@dataclass(frozen=True)
class Check:
    """One conformance check: a name, the limits it needs and the coroutine."""

    name: str
    run: Callable[[Backend], Awaitable[None]]
    limits: HistoryLimits = field(default_factory=HistoryLimits)


def _slot(mid: str, direction: str = "in", *, sender: str = "a", xml: bytes = b"<P/>") -> Slot:
    return Slot(0, direction, sender, "b", "{urn:x}P", mid, 1_700_000_000.25, xml)  # type: ignore[arg-type]


async def _append_and_read(b: Backend) -> None:
    _equal(await b.buffer_get_thread("t1"), [], "buffer_get_thread of an unknown frame")
    _expect(not await b.buffer_thread_exists("t1"), "an unknown frame exists")
    for i in range(5):
        _equal(await b.buffer_append("t1", _slot(f"m{i}")), i, "indexes count from 0")
    slots = await b.buffer_get_thread("t1")
    _equal([s.message_id for s in slots], [f"m{i}" for i in range(5)], "oldest first")
    _equal([s.index for s in slots], list(range(5)), "buffer_get_thread indexes")
    _equal(await b.buffer_thread_len("t1"), 5, "buffer_thread_len")
    _expect(await b.buffer_thread_exists("t1"), "a frame with slots does not exist")
    got = await b.buffer_get_slot("t1", 3)
    _equal(
        None if got is None else (got.message_id, got.index), ("m3", 3), "buffer_get_slot(t1, 3)"
    )
    _equal(await b.buffer_get_slot("t1", 5), None, "buffer_get_slot past the end")
    _equal(await b.buffer_get_slot("t1", -1), None, "buffer_get_slot(-1)")
    _equal(await b.buffer_get_slot("nope", 0), None, "buffer_get_slot of an unknown frame")
    await b.buffer_append("t2", _slot("x"))
    _equal(sorted(await b.buffer_list_threads()), ["t1", "t2"], "bare thread ids")
    _expect(await b.buffer_delete_thread("t1"), "buffer_delete_thread of a frame: False")
    _expect(not await b.buffer_delete_thread("t1"), "buffer_delete_thread twice: True")
    _equal(await b.buffer_get_thread("t1"), [], "a deleted frame's history")
    await b.buffer_clear()
    _equal(await b.buffer_list_threads(), [], "threads after buffer_clear")


async def _slot_fields_round_trip(b: Backend) -> None:
    slot = Slot(0, "out", "caller é \u2603", None, "{urn:ü}P", "id-\u00e9", 1.5, b"\x00\xff<P/>")
    await b.buffer_append("t", slot)
    got = await b.buffer_get_thread("t")
    _equal(got, [slot], "the slot read back")
    _equal((type(got[0].xml), type(got[0].timestamp)), (bytes, float), "field types")


async def _append_is_idempotent(b: Backend) -> None:
    _equal(await b.buffer_append("t", _slot("m", "in")), 0, "first append")
    _equal(await b.buffer_append("t", _slot("m", "out")), 1, "direction is part of the key")
    _equal(await b.buffer_append("t", _slot("m", "in", sender="other")), 0, "a retried append")
    _equal(await b.buffer_append("t", _slot("m", "out")), 1, "a retried append")
    _equal(await b.buffer_thread_len("t"), 2, "retries stored nothing")
    _expect(await b.buffer_contains("t", "m", "in"), "buffer_contains(t, m, in) is False")
    _expect(await b.buffer_contains("t", "m", "out"), "buffer_contains(t, m, out) is False")
    _expect(not await b.buffer_contains("t", "n", "in"), "buffer_contains(t, n, in) is True")
    _expect(not await b.buffer_contains("u", "m", "in"), "buffer_contains(u, m, in) is True")
    _equal(await b.buffer_append("u", _slot("m", "in")), 0, "keys are per frame")


async def _trimming_keeps_absolute_indexes(b: Backend) -> None:
    for i in range(7):
        _equal(await b.buffer_append("t", _slot(f"m{i}")), i, "indexes go on past trimming")
    slots = await b.buffer_get_thread("t")
    _equal([s.index for s in slots], [4, 5, 6], "the oldest slots are trimmed")
    _equal(await b.buffer_thread_len("t"), 3, "buffer_thread_len after trimming")
    _equal(await b.buffer_get_slot("t", 3), None, "a trimmed slot")
    got = await b.buffer_get_slot("t", 5)
    _equal(None if got is None else got.message_id, "m5", "buffer_get_slot(t, 5)")
    _equal(await b.buffer_append("t", _slot("m6")), 6, "idempotent after trimming too")


async def _concurrent_appends(b: Backend) -> None:
    indexes = await asyncio.gather(*(b.buffer_append("t", _slot(f"m{i}")) for i in range(200)))
    _equal(sorted(indexes), list(range(200)), "every append got its own index")
    slots = await b.buffer_get_thread("t")
    _equal([s.index for s in slots], list(range(200)), "indexes of the history")
    by_index = dict(zip(indexes, (f"m{i}" for i in range(200)), strict=True))
    _equal([s.message_id for s in slots], [by_index[i] for i in range(200)], "slots at their index")
    again = await asyncio.gather(*(b.buffer_append("t", _slot(f"m{i}")) for i in range(200)))
    _equal(again, indexes, "concurrent retries are idempotent")


async def _registry(b: Backend) -> None:
    chain = '["caller.x","root",["not","split"],"calc.add"]'
    _equal(await b.registry_get_uuid(chain), None, "registry_get_uuid of an unknown chain")
    await b.registry_set(chain, "u1")
    _equal(await b.registry_get_uuid(chain), "u1", "registry_get_uuid after registry_set")
    _equal(await b.registry_get_chain("u1"), chain, "registry_get_chain after registry_set")
    _equal(await b.registry_setdefault(chain, "u2"), "u1", "setdefault keeps the first")
    _equal(await b.registry_setdefault('["a","r"]', "u3"), "u3", "setdefault of a new chain")
    _equal(await b.registry_list_all(), {"u1": chain, "u3": '["a","r"]'}, "registry_list_all")
    await b.registry_set(chain, "u4")  # replaces u1
    _equal(await b.registry_get_uuid(chain), "u4", "registry_set replaces a mapping")
    _equal(await b.registry_get_chain("u1"), None, "the replaced uuid's chain")
    _expect(await b.registry_delete("u4"), "registry_delete of a mapping: False")
    _expect(not await b.registry_delete("u4"), "registry_delete twice: True")
    _equal(await b.registry_get_uuid(chain), None, "a deleted mapping's chain")
    await b.registry_clear()
    _equal(await b.registry_list_all(), {}, "registry_list_all after registry_clear")


async def _registry_setdefault_races(b: Backend) -> None:
    winners = await asyncio.gather(
        *(b.registry_setdefault('["o","r","x"]', f"u{i}") for i in range(50))
    )
    _equal(len(set(winners)), 1, "racing setdefaults agree on one uuid")
    _equal(await b.registry_get_chain(winners[0]), '["o","r","x"]', "the winner's chain")


def _letter(reason: str, data: bytes = b"<bad") -> DeadLetter:
    return DeadLetter("", 1_700_000_000.5, "malformed", reason, "x.y", "t", "m", data)


async def _dead_letters(b: Backend) -> None:
    _equal(await b.deadletter_list(), [], "deadletter_list of an empty store")
    ids = [await b.deadletter_add(_letter(f"r{i}", bytes([i]) * 3)) for i in range(4)]
    _expect(len(set(ids)) == 4 and all(ids), f"each dead letter gets its own id: {ids}")
    letters = await b.deadletter_list()
    _equal([x.reason for x in letters], ["r0", "r1", "r2", "r3"], "oldest first")
    _equal([x.id for x in letters], ids, "the ids deadletter_add returned")
    first = letters[0]
    _equal(
        (first.code, first.listener, first.thread_id, first.message_id, first.data),
        ("malformed", "x.y", "t", "m", b"\x00\x00\x00"),
        "the fields read back",
    )
    _equal(first.timestamp, 1_700_000_000.5, "the timestamp read back")
    limited = await b.deadletter_list(limit=2)
    _equal([x.reason for x in limited], ["r0", "r1"], "deadletter_list(limit=2)")
    _expect(await b.deadletter_delete(ids[1]), "deadletter_delete of a letter: False")
    _expect(not await b.deadletter_delete(ids[1]), "deadletter_delete twice: True")
    _equal(await b.deadletter_purge(), 3, "deadletter_purge's count")
    _equal(await b.deadletter_list(), [], "deadletter_list after deadletter_purge")


async def _dead_letters_are_capped(b: Backend) -> None:
    for i in range(5):
        await b.deadletter_add(_letter(f"r{i}", b"0123456789"))
    letters = await b.deadletter_list()
    _equal([x.reason for x in letters], ["r2", "r3", "r4"], "the oldest are dropped")
    _equal([x.data for x in letters], [b"01234"] * 3, "data is capped")


async def _dead_letters_in_one_batch(b: Backend) -> None:
    _equal(await b.deadletter_add_many([]), [], "deadletter_add_many([])")
    first = await b.deadletter_add(_letter("r0"))
    batch = [_letter("r1", b"\x01"), replace(_letter("r2"), id="given-2"), _letter("r3")]
    ids = await b.deadletter_add_many(batch)
    _equal(len(ids), 3, "deadletter_add_many returns one id per letter")
    _equal(ids[1], "given-2", "a letter's own id is kept")
    _expect(len({first, *ids}) == 4 and all(ids), f"each dead letter gets its own id: {ids}")
    letters = await b.deadletter_list()
    _equal([x.reason for x in letters], ["r0", "r1", "r2", "r3"], "oldest first, a batch in order")
    _equal([x.id for x in letters], [first, *ids], "the ids deadletter_add_many returned")
    _equal(letters[1], replace(batch[0], id=ids[0]), "a letter of a batch read back")
    again = await b.deadletter_add_many([replace(x, id=i) for x, i in zip(batch, ids, strict=True)])
    _equal(again, ids, "a retried batch keeps its ids")
    _equal(len(await b.deadletter_list()), 4, "a retried batch stores nothing twice")


async def _dead_letters_in_one_batch_are_capped(b: Backend) -> None:
    await b.deadletter_add(_letter("r0", b"0123456789"))
    ids = await b.deadletter_add_many([_letter(f"r{i}", b"0123456789") for i in range(1, 6)])
    letters = await b.deadletter_list()
    _equal([x.reason for x in letters], ["r3", "r4", "r5"], "the oldest are dropped")
    _equal([x.id for x in letters], ids[2:], "the ids of the letters kept")
    _equal([x.data for x in letters], [b"01234"] * 3, "data is capped")


async def _dead_letters_over_budget(b: Backend) -> None:
    # A budget of one byte: every rejection of outside input is over it.
    outside = DeadLetter("", 1.0, "malformed", "bad", None, None, None, b"x" * 1000)
    work = replace(_letter("handler"), code="handler-error", data=b"y" * 1000)
    kept_outside, kept_work = await b.deadletter_add_many([outside, work])
    letters = {x.id: x for x in await b.deadletter_list()}
    sample = letters[kept_outside]
    _equal(sample.data, b"x" * SAMPLE_BYTES, "an outside rejection past the budget keeps a sample")
    _equal(sample.reason, "bad" + OVER_BUDGET_NOTE, "a sample's reason says it is one")
    _equal(letters[kept_work].data, b"y" * 1000, "a letter of accepted work is kept whole")
    info = await b.info()
    got = {
        k: info.get(k) for k in ("dead_letters_over_budget", "dead_letters_over_budget:malformed")
    }
    _equal(got, dict.fromkeys(got, 1), "over-budget counters in info()")
    _expect(info.get("dead_letter_bytes", 0) > 1000, f"dead_letter_bytes in info(): {info}")
    await b.deadletter_purge()
    _equal((await b.info()).get("dead_letter_bytes"), 0, "dead_letter_bytes after a purge")


async def _dead_letters_expire(b: Backend) -> None:
    await b.deadletter_add(_letter("old"))
    _equal(len(await b.deadletter_list()), 1, "a letter right after it was written")
    deadline = asyncio.get_running_loop().time() + 10.0
    while await b.deadletter_list():
        _expect(asyncio.get_running_loop().time() < deadline, "no letter expired within 10 s")
        await asyncio.sleep(0.05)
    info = await b.info()
    _equal((info.get("dead_letters"), info.get("dead_letters_expired")), (0, 1), "info()")


async def _dead_letter_history_round_trips(b: Backend) -> None:
    letter = replace(
        _letter("r"), sender="caller é", attempts=3, last_error="timeout: slow",
        stage="egress", re="m-1", to="caller é", payload_class="pkg.mod:Pong",
    )  # fmt: skip
    [letter_id] = await b.deadletter_add_many([letter])
    _equal(await b.deadletter_list(), [replace(letter, id=letter_id)], "the letter read back")


async def _info_and_close(b: Backend) -> None:
    await b.buffer_append("t", _slot("m"))
    await b.registry_set('["a","t"]', "t")
    await b.deadletter_add(_letter("r"))
    info = await b.info()
    got = {k: info.get(k) for k in ("buffer_threads", "registry_entries", "dead_letters")}
    _equal(got, {"buffer_threads": 1, "registry_entries": 1, "dead_letters": 1}, "info()")
    _expect(all(isinstance(v, int) for v in info.values()), f"info() values are ints: {info}")


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
    Check("dead letters in one batch", _dead_letters_in_one_batch),
    Check("dead letters in one batch are capped", _dead_letters_in_one_batch_are_capped,
          HistoryLimits(max_dead_letters=3, dead_letter_bytes=5)),
    Check("dead letters over budget", _dead_letters_over_budget,
          HistoryLimits(dead_letter_budget_bytes=1)),
    Check("dead letters expire", _dead_letters_expire, HistoryLimits(dead_letter_ttl_s=0.5)),
    Check("dead letter history round-trips", _dead_letter_history_round_trips),
    Check("info", _info_and_close),
)  # fmt: skip
"""Every conformance check, in order."""


async def run_check(factory: BackendFactory, check: Check) -> None:
    """Run one check on a fresh backend.

    Raises:
        ConformanceError: naming the check and what differed; an exception the
            backend raised during the check is chained to it.
    """
    try:
        async with factory(check.limits) as backend:
            await check.run(backend)
            await backend.aclose()
            await backend.aclose()  # idempotent
    except ConformanceError as exc:
        raise ConformanceError(f"conformance check {check.name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConformanceError(
            f"conformance check {check.name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


async def check_backend(factory: BackendFactory) -> None:
    """Run every conformance check against backends made by ``factory``.

    Raises:
        ConformanceError: naming the first failing check and what differed.
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
            got = self.run(self.backend.buffer_append(thread, slot))
            _equal(got, self.model.buffer_append(thread, slot), f"buffer_append({thread!r})")

        @rule(thread=threads, index=st.integers(-1, 8))
        def get_slot(self, thread: str, index: int) -> None:
            got = self.run(self.backend.buffer_get_slot(thread, index))
            _equal(got, self.model.buffer_get_slot(thread, index), f"buffer_get_slot({index})")

        @rule(thread=threads)
        def delete_thread(self, thread: str) -> None:
            got = self.run(self.backend.buffer_delete_thread(thread))
            _equal(got, self.model.buffer_delete_thread(thread), "buffer_delete_thread")

        @rule(chain=chains, uuid=uuids)
        def registry_set(self, chain: str, uuid: str) -> None:
            self.run(self.backend.registry_set(chain, uuid))
            self.model.registry_set(chain, uuid)

        @rule(chain=chains, uuid=uuids)
        def registry_setdefault(self, chain: str, uuid: str) -> None:
            got = self.run(self.backend.registry_setdefault(chain, uuid))
            _equal(got, self.model.registry_setdefault(chain, uuid), "registry_setdefault")

        @rule(uuid=uuids)
        def registry_delete(self, uuid: str) -> None:
            got = self.run(self.backend.registry_delete(uuid))
            _equal(got, self.model.registry_delete(uuid), "registry_delete")

        @rule(reason=st.sampled_from(["r1", "r2"]), data=st.binary(max_size=12))
        def deadletter_add(self, reason: str, data: bytes) -> None:
            self.run(self.backend.deadletter_add(_letter(reason, data)))
            self.model.deadletter_add(_letter(reason, data))

        @rule(reasons=st.lists(st.sampled_from(["r1", "r2", "r3"]), max_size=5))
        def deadletter_add_many(self, reasons: list[str]) -> None:
            letters = [_letter(reason, reason.encode() * 3) for reason in reasons]
            ids = self.run(self.backend.deadletter_add_many(letters))
            _equal(len(ids), len(letters), "deadletter_add_many returns one id per letter")
            self.model.deadletter_add_many(letters)

        @invariant()
        def same_state(self) -> None:
            for thread in ("t1", "t2", "t.3"):
                got = self.run(self.backend.buffer_get_thread(thread))
                _equal(got, self.model.buffer_get_thread(thread), f"history of {thread!r}")
            _equal(
                sorted(self.run(self.backend.buffer_list_threads())),
                sorted(self.model.buffer_list_threads()),
                "buffer_list_threads",
            )
            _equal(
                self.run(self.backend.registry_list_all()),
                self.model.registry_list_all(),
                "registry_list_all",
            )
            letters = self.run(self.backend.deadletter_list())
            expected = self.model.deadletter_list()
            _equal(
                [(x.reason, x.data) for x in letters],
                [(x.reason, x.data) for x in expected],
                "deadletter_list",
            )

    return BackendComparison
