"""Frame ids and chains."""

from __future__ import annotations

import json
import os
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from xml_pipeline.frame import _Cache, _child_chain, _encode, _Uuids


def test_frame_ids_are_random_version_4_uuids() -> None:
    new = _Uuids()
    ids = [new() for _ in range(2000)]  # several refills of the random pool
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and str(parsed) == text


def test_a_forked_child_never_repeats_the_parents_ids() -> None:
    new = _Uuids()
    new()  # fill the pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, new().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != new()


def test_child_chain_is_the_encoded_chain_plus_one_hop() -> None:
    for hops in [(), ("a",), ("relay.1", 'quo"te', "ünï", "back\\slash")]:
        parent = _encode("origin", "root", hops)
        assert _child_chain(parent, "x.y") == _encode("origin", "root", (*hops, "x.y"))


def test_a_replaced_frame_does_not_keep_the_old_chain() -> None:
    import dataclasses

    from xml_pipeline.frame import Frame

    frame = Frame("u", "o", "r", ("a",))
    assert frame.chain == _encode("o", "r", ("a",))
    moved = dataclasses.replace(frame, hops=("a", "b"))
    assert moved.chain == _encode("o", "r", ("a", "b"))


@settings(max_examples=300, deadline=None)
@given(origin=st.text(), root=st.text(), hops=st.lists(st.text(), max_size=4))
def test_encode_writes_what_the_json_encoder_writes(
    origin: str, root: str, hops: list[str]
) -> None:
    # Chains written before are looked up by these bytes: they must not change.
    expected = json.dumps([origin, root, *hops], ensure_ascii=False, separators=(",", ":"))
    assert _encode(origin, root, tuple(hops)) == expected
    assert json.loads(_encode(origin, root, tuple(hops))) == [origin, root, *hops]


def test_the_frame_cache_keeps_at_most_its_size_and_the_newest_entries() -> None:
    cache: _Cache[int, str] = _Cache(10)
    for i in range(100):
        cache.put(i, str(i))
        assert len(cache) <= 10
        assert cache.get(i) == str(i)
    assert [cache.get(i) for i in range(95, 100)] == ["95", "96", "97", "98", "99"]
    assert cache.get(0) is None
