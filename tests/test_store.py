"""The reference store's compact histories: same answers as plain lists, nothing for the
garbage collector to scan."""

from __future__ import annotations

import gc
import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from xml_pipeline.backends import HistoryLimits, Slot
from xml_pipeline.backends import store as store_module
from xml_pipeline.backends.store import Store


def slot(mid: str, direction: str = "in", **fields: object) -> Slot:
    values: dict[str, object] = {
        "sender": "a",
        "to": "b",
        "payload": "{urn:x}P",
        "timestamp": 1.5,
        "xml": b"<P/>",
        **fields,
    }
    return Slot(0, direction, message_id=mid, **values)  # type: ignore[arg-type]


class _Model:
    """What a frame's history must answer, kept the obvious way."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.slots: dict[str, list[Slot]] = {}
        self.trimmed: dict[str, int] = {}

    def append(self, thread: str, s: Slot) -> int:
        kept = self.slots.setdefault(thread, [])
        first = self.trimmed.setdefault(thread, 0)
        for i, old in enumerate(kept):
            if (old.message_id, old.direction) == (s.message_id, s.direction):
                return first + i
        index = first + len(kept)
        kept.append(s._replace(index=index))
        if len(kept) > self.max_slots:
            del kept[0]
            self.trimmed[thread] = first + 1
        return index


names = st.sampled_from(["a", "relay.1", "x" * 65, "é\ud800", ""])


class HistoryComparison(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store(HistoryLimits(max_slots_per_thread=3))
        self.model = _Model(3)

    @rule(
        thread=st.sampled_from(["t1", "t2"]),
        mid=st.sampled_from(["m1", "m2", "m3", "m4", "m5", "m\u20ac", "x" * 300]),
        direction=st.sampled_from(["in", "out"]),
        sender=names,
        to=st.none() | names,
        payload=names,
        timestamp=st.floats(allow_nan=False),
        xml=st.binary(max_size=40) | st.just(struct.pack("<IH", 2, 0) + b"m2"),
    )
    def append(
        self,
        thread: str,
        mid: str,
        direction: str,
        sender: str,
        to: str | None,
        payload: str,
        timestamp: float,
        xml: bytes,
    ) -> None:
        s = slot(
            mid, direction, sender=sender, to=to, payload=payload, timestamp=timestamp, xml=xml
        )
        assert self.store.buffer_append(thread, s) == self.model.append(thread, s)

    @rule(thread=st.sampled_from(["t1", "t2"]), index=st.integers(-1, 12))
    def get_slot(self, thread: str, index: int) -> None:
        kept = self.model.slots.get(thread, [])
        first = self.model.trimmed.get(thread, 0)
        want = kept[index - first] if 0 <= index - first < len(kept) else None
        assert self.store.buffer_get_slot(thread, index) == want

    @rule(
        thread=st.sampled_from(["t1", "t2"]),
        mid=st.sampled_from(["m1", "m2", "x" * 300]),
        direction=st.sampled_from(["in", "out", "sideways"]),
    )
    def contains(self, thread: str, mid: str, direction: str) -> None:
        want = any(
            (s.message_id, s.direction) == (mid, direction)
            for s in self.model.slots.get(thread, [])
        )
        assert self.store.buffer_contains(thread, mid, direction) is want

    @invariant()
    def same_histories(self) -> None:
        for thread, kept in self.model.slots.items():
            assert self.store.buffer_get_thread(thread) == kept
            assert self.store.buffer_thread_len(thread) == len(kept)
        assert self.store.info()["slots_trimmed"] == sum(self.model.trimmed.values())


HistoryComparison.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
TestHistory = HistoryComparison.TestCase


def test_an_id_inside_another_slot_is_not_taken_for_a_slot() -> None:
    store = Store()
    # The xml holds exactly the bytes that open the record of ("m2", "in").
    assert store.buffer_append("t", slot("m1", xml=struct.pack("<IH", 2, 0) + b"m2")) == 0
    assert not store.buffer_contains("t", "m2", "in")
    assert store.buffer_append("t", slot("m2")) == 1
    assert store.buffer_append("t", slot("m2")) == 1


def test_names_past_the_table_are_written_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_MAX_NAMES", 4)  # "in", "out" and two more
    store = Store()
    slots = [
        slot(f"m{i}", sender=f"s{i}", to=None if i % 2 else f"to{i}", payload=f"{{urn:x}}P{i}")
        for i in range(6)
    ]
    for s in slots:
        store.buffer_append("t", s)
    assert store.buffer_get_thread("t") == [s._replace(index=i) for i, s in enumerate(slots)]


def test_trimming_keeps_counting_when_nothing_is_kept() -> None:
    store = Store(HistoryLimits(max_slots_per_thread=0))
    assert store.buffer_append("t", slot("m1")) == 0
    assert store.buffer_append("t", slot("m2")) == 1
    assert store.buffer_get_thread("t") == []
    assert store.info()["slots_trimmed"] == 2


def test_histories_hold_no_object_the_collector_tracks() -> None:
    store = Store()
    store.buffer_append("warm", slot("m0"))
    gc.collect()
    before = len(gc.get_objects())
    for t in range(2_000):
        for i in range(5):
            direction = "in" if i % 2 else "out"
            store.buffer_append(f"t{t}", slot(f"m{i}", direction, sender=f"relay.{i}"))
    gc.collect()
    # Per frame: nothing (a frame is one bytearray); the store's own dicts and tables
    # are a handful of objects.
    assert len(gc.get_objects()) - before < 50
    for thread in store.buffer_list_threads():
        assert not gc.is_tracked(store._frames[thread])
    assert store.buffer_thread_len("t1999") == 5


def test_appends_leave_nothing_in_the_young_generation() -> None:
    # Not even for one collection: a young object that survives makes the next
    # collection longer, and stays until then.
    store = Store()
    slots = [slot(f"m{i}", "in" if i % 2 else "out", sender=f"relay.{i}") for i in range(5)]
    store.buffer_append("warm", slots[0])
    gc.collect()
    gc.disable()
    try:
        young = len(gc.get_objects(0))
        for t in range(2_000):
            for s in slots:
                store.buffer_append(f"t{t}", s)
        assert len(gc.get_objects(0)) - young < 50
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "key_hash",
    [
        lambda key: 0,  # every key's hash the same: each match is read back
        # m2's hash only ever found astride two others' (7 zero bytes, then 1): unaligned
        lambda key: 1 if key.endswith(b"m2") else 1 << 56,
    ],
    ids=["all-alike", "unaligned"],
)
def test_colliding_key_hashes_give_the_same_answers(
    monkeypatch: pytest.MonkeyPatch, key_hash: object
) -> None:
    monkeypatch.setattr(store_module, "_key_hash", key_hash)
    run_state_machine_as_test(
        HistoryComparison,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None),
    )


def test_a_slot_that_cannot_be_written_leaves_the_history_as_it_was() -> None:
    store = Store()
    assert store.buffer_append("t", slot("m1")) == 0
    with pytest.raises(TypeError):
        store.buffer_append("t", slot("m2", xml="<P/>"))  # str, not bytes
    with pytest.raises(struct.error):
        store.buffer_append("t", slot("m2", timestamp="noon"))
    assert [s.message_id for s in store.buffer_get_thread("t")] == ["m1"]
    assert store.buffer_append("t", slot("m2")) == 1
    assert store.buffer_append("t", slot("m1")) == 0  # still found
    assert [s.index for s in store.buffer_get_thread("t")] == [0, 1]


class _Frames:
    """Histories, registry and least-recently-used eviction, kept the obvious way."""

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.histories = _Model(2)
        self.chains: dict[str, str] = {}  # uuid -> chain
        self.order: list[str] = []  # frames, least recently used first
        self.evicted = 0

    def _alive(self, uuid: str) -> bool:
        return uuid in self.chains or uuid in self.histories.slots

    def _forget_if_empty(self, uuid: str) -> None:
        if not self._alive(uuid) and uuid in self.order:
            self.order.remove(uuid)

    def _evict(self) -> None:
        while len(self.order) > self.max_threads:
            uuid = self.order.pop(0)
            self.chains.pop(uuid, None)
            self.histories.slots.pop(uuid, None)
            self.histories.trimmed.pop(uuid, None)
            self.evicted += 1

    def append(self, uuid: str, s: Slot) -> int:
        if uuid in self.order:
            self.order.remove(uuid)
        self.order.append(uuid)
        index = self.histories.append(uuid, s)
        self._evict()
        return index

    def delete_history(self, uuid: str) -> bool:
        if uuid not in self.histories.slots:
            return False
        del self.histories.slots[uuid]
        del self.histories.trimmed[uuid]
        self._forget_if_empty(uuid)
        return True

    def uuid_of(self, chain: str) -> str | None:
        return next((u for u, c in self.chains.items() if c == chain), None)

    def delete_registry(self, uuid: str) -> bool:
        if self.chains.pop(uuid, None) is None:
            return False
        self._forget_if_empty(uuid)
        return True

    def set(self, chain: str, uuid: str) -> None:
        old = self.uuid_of(chain)
        if old == uuid:
            return
        if old is not None:
            self.delete_registry(old)
        if uuid not in self.chains:  # registered now: the most recently written
            if uuid in self.order:
                self.order.remove(uuid)
            self.order.append(uuid)
        self.chains[uuid] = chain
        self._evict()


uuids = st.sampled_from(["u1", "u2", "u3", "u4"])
chains = st.sampled_from(['["o","r"]', '["o","r","a"]', '["o","r","b"]', '["ö","\u20ac"]', ""])


class FramesComparison(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store(HistoryLimits(max_slots_per_thread=2, max_threads=3))
        self.model = _Frames(3)

    @rule(
        uuid=uuids,
        mid=st.sampled_from(["m1", "m2", "m3"]),
        direction=st.sampled_from(["in", "out"]),
    )
    def append(self, uuid: str, mid: str, direction: str) -> None:
        s = slot(mid, direction, xml=f"<P>{uuid}</P>".encode())
        assert self.store.buffer_append(uuid, s) == self.model.append(uuid, s)

    @rule(chain=chains, uuid=uuids)
    def set(self, chain: str, uuid: str) -> None:
        self.store.registry_set(chain, uuid)
        self.model.set(chain, uuid)

    @rule(chain=chains, uuid=uuids)
    def setdefault(self, chain: str, uuid: str) -> None:
        want = self.model.uuid_of(chain)
        if want is None:
            self.model.set(chain, uuid)
        assert self.store.registry_setdefault(chain, uuid) == (want or uuid)

    @rule(uuid=uuids)
    def delete_registry(self, uuid: str) -> None:
        assert self.store.registry_delete(uuid) is self.model.delete_registry(uuid)

    @rule(uuid=uuids)
    def delete_history(self, uuid: str) -> None:
        assert self.store.buffer_delete_thread(uuid) is self.model.delete_history(uuid)

    @invariant()
    def same_frames(self) -> None:
        store, model = self.store, self.model
        assert store.registry_list_all() == model.chains
        assert sorted(store.buffer_list_threads()) == sorted(model.histories.slots)
        for uuid in ["u1", "u2", "u3", "u4"]:
            assert store.registry_get_chain(uuid) == model.chains.get(uuid)
            assert store.buffer_get_thread(uuid) == model.histories.slots.get(uuid, [])
            assert store.buffer_thread_exists(uuid) is (uuid in model.histories.slots)
        for chain in ['["o","r"]', '["o","r","a"]', '["o","r","b"]', '["ö","\u20ac"]', ""]:
            assert store.registry_get_uuid(chain) == model.uuid_of(chain)
        info = store.info()
        assert info["registry_entries"] == len(model.chains)
        assert info["buffer_threads"] == len(model.histories.slots)
        assert info["threads_evicted"] == model.evicted


@pytest.mark.parametrize(
    "chain_hash",
    [hash, lambda chain: 7, lambda chain: len(chain) % 2],
    ids=["hash", "all-alike", "two-kinds"],
)
def test_frames_give_the_answers_of_plain_dicts(
    monkeypatch: pytest.MonkeyPatch, chain_hash: object
) -> None:
    # Registry entries and histories share one bytearray per frame and one eviction
    # order; chains whose hashes collide are still told apart.
    monkeypatch.setattr(store_module, "_chain_hash", chain_hash)
    run_state_machine_as_test(
        FramesComparison,
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
    )


def test_a_frame_is_one_bytearray_the_collector_does_not_track() -> None:
    store = Store()
    store.registry_set('["o","r"]', "r")
    store.buffer_append("r", slot("m1", "out"))
    store.registry_setdefault('["o","r","a"]', "c")
    assert [type(f) for f in store._frames.values()] == [bytearray, bytearray]
    assert not any(gc.is_tracked(f) for f in store._frames.values())
    assert store._chains == {} and len(store._by_chain) == 2


def test_past_max_threads_the_least_recently_written_go_a_few_at_a_time() -> None:
    # Up to 1 % of max_threads at once (one walk of the dict for all of them): never
    # more frames than max_threads, and always the least recently written.
    store = Store(HistoryLimits(max_threads=1_000))
    for t in range(1_000):
        store.buffer_append(f"t{t}", slot("m"))
    store.buffer_append("t0", slot("m2"))  # t0 is now the most recently written
    store.registry_set('["o","new"]', "new")
    threads = store.buffer_list_threads()
    assert len(threads) == 990 and store.info()["threads_evicted"] == 10
    assert threads[0] == "t11" and threads[-1] == "t0"
    assert store.registry_get_chain("new") == '["o","new"]'
    for t in range(1_000, 1_009):  # room for 9 more before the next eviction
        store.buffer_append(f"t{t}", slot("m"))
    assert store.info()["threads_evicted"] == 10
    store.buffer_append("t1009", slot("m"))
    threads = store.buffer_list_threads()
    assert len(threads) == 990 and store.info()["threads_evicted"] == 20
    assert threads[0] == "t21" and store.registry_get_chain("new") == '["o","new"]'


def test_a_chain_that_cannot_be_written_changes_nothing() -> None:
    store = Store()
    store.registry_set('["o","a"]', "u")
    with pytest.raises(AttributeError):
        store.registry_set(b'["o","b"]', "u")  # type: ignore[arg-type]
    assert store.registry_get_uuid('["o","a"]') == "u"
    assert store.registry_get_chain("u") == '["o","a"]'
    assert store.registry_list_all() == {"u": '["o","a"]'}
