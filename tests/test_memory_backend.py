"""The in-memory backend, the reference for every other backend."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xml_pipeline import BackendUnavailable, open_backend
from xml_pipeline.backends import (
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_bytes,
    dead_letter_to_bytes,
    slot_from_bytes,
    slot_to_bytes,
)
from xml_pipeline.backends.memory import MemoryBackend


def slot(mid: str, direction: str = "in") -> Slot:
    return Slot(0, direction, "a", "b", "{urn:x}P", mid, 1.5, b"<P/>")  # type: ignore[arg-type]


async def test_append_is_idempotent_and_indexed() -> None:
    b = MemoryBackend()
    assert await b.buffer_append("t", slot("m1")) == 0
    assert await b.buffer_append("t", slot("m1", "out")) == 1
    assert await b.buffer_append("t", slot("m1")) == 0
    assert await b.buffer_thread_len("t") == 2
    got = await b.buffer_get_slot("t", 1)
    assert got is not None and got.index == 1 and got.direction == "out"
    assert await b.buffer_get_slot("t", 5) is None
    assert await b.buffer_get_slot("nope", 0) is None
    assert await b.buffer_thread_exists("t") and not await b.buffer_thread_exists("u")
    assert await b.buffer_list_threads() == ["t"]
    assert await b.buffer_delete_thread("t") and not await b.buffer_delete_thread("t")
    assert await b.buffer_get_thread("t") == []


async def test_trimming_keeps_absolute_indexes() -> None:
    b = MemoryBackend(HistoryLimits(max_slots_per_thread=2))
    for i in range(5):
        await b.buffer_append("t", slot(f"m{i}"))
    assert [s.index for s in await b.buffer_get_thread("t")] == [3, 4]
    assert await b.buffer_get_slot("t", 2) is None
    assert (await b.info())["slots_trimmed"] == 3


async def test_registry_both_ways_and_setdefault() -> None:
    b = MemoryBackend()
    await b.registry_set('["a","r"]', "u1")
    assert await b.registry_get_uuid('["a","r"]') == "u1"
    assert await b.registry_get_chain("u1") == '["a","r"]'
    assert await b.registry_setdefault('["a","r"]', "u2") == "u1"
    assert await b.registry_setdefault('["a","r","x.y"]', "u3") == "u3"
    assert await b.registry_list_all() == {"u1": '["a","r"]', "u3": '["a","r","x.y"]'}
    assert await b.registry_delete("u1") and not await b.registry_delete("u1")
    assert await b.registry_get_uuid('["a","r"]') is None
    await b.registry_clear()
    assert await b.registry_list_all() == {}


async def test_eviction_drops_least_recently_used_frames() -> None:
    b = MemoryBackend(HistoryLimits(max_threads=3))
    for t in "abcd":
        await b.registry_set(f'["o","{t}"]', t)
        await b.buffer_append(t, slot("m"))
    assert sorted(await b.buffer_list_threads()) == ["b", "c", "d"]
    await b.buffer_append("b", slot("m2"))  # b is now the most recent
    await b.buffer_append("e", slot("m"))
    assert sorted(await b.buffer_list_threads()) == ["b", "d", "e"]
    assert await b.registry_get_chain("a") is None


async def test_dead_letters_cap_and_purge() -> None:
    b = MemoryBackend(HistoryLimits(max_dead_letters=2, dead_letter_bytes=4))
    for i in range(3):
        letter = DeadLetter("", float(i), "malformed", f"r{i}", None, None, None, b"123456")
        await b.deadletter_add(letter)
    letters = await b.deadletter_list()
    assert [letter.reason for letter in letters] == ["r1", "r2"]
    assert all(letter.data == b"1234" for letter in letters)
    assert (await b.info())["dead_letters_dropped"] == 1
    assert await b.deadletter_delete(letters[0].id)
    assert await b.deadletter_purge() == 1


def test_byte_formats_round_trip_without_pickle() -> None:
    s = slot("m").__class__(3, "out", "a\u00e9", None, "{u}P", "m", 2.5, b"\x00<P/>")
    assert slot_from_bytes(slot_to_bytes(s)) == s
    assert slot_to_bytes(s).startswith(b"{")
    letter = DeadLetter("d1", 1.0, "timeout", "why", "x.y", "t", "m", b"\xff")
    assert dead_letter_from_bytes(dead_letter_to_bytes(letter)) == letter
    with pytest.raises(ValueError):
        slot_from_bytes(b'{"i":0,"d":"sideways","f":"a","t":null,"p":"p","m":"m","ts":1,"x":""}')


def test_backend_urls() -> None:
    assert isinstance(open_backend("memory://"), MemoryBackend)
    with pytest.raises(BackendUnavailable, match="memory://"):
        open_backend("carrier-pigeon://x")


@given(
    index=st.integers(min_value=0),
    direction=st.sampled_from(["in", "out"]),
    sender=st.text(),
    to=st.none() | st.text(),
    message_id=st.text(),
    timestamp=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53),
    xml=st.binary(max_size=64),
)
@settings(max_examples=300, deadline=None)
def test_slot_bytes_fast_path_is_the_documented_json(
    index: int, direction: str, sender: str, to: str | None, message_id: str,
    timestamp: float, xml: bytes,
) -> None:  # fmt: skip
    slot = Slot(index, direction, sender, to, "{urn:x}P", message_id, timestamp, xml)  # type: ignore[arg-type]
    data = slot_to_bytes(slot)
    assert json.loads(data) == {
        "i": index, "d": direction, "f": sender, "t": to, "p": "{urn:x}P",
        "m": message_id, "ts": timestamp, "x": base64.b64encode(xml).decode(),
    }  # fmt: skip
    assert slot_from_bytes(data) == slot
