"""Frame ids and chains."""

from __future__ import annotations

import gc
import json
import os
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.frame import Frame, FrameRegistry, _Cache, _child_chain, _encode, _Uuids


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


async def test_cached_frames_are_nothing_the_collector_scans() -> None:
    def frames() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, Frame))

    registry = FrameRegistry(MemoryBackend())
    before = frames()
    made = []
    for i in range(300):
        root = await registry.new_root(f"client{i}")
        child = await registry.child(root, "a.b")
        made.append((root.uuid, child.uuid, child.chain))
    del root, child
    assert frames() == before  # 600 cached frames, none of them an object it tracks
    for root_uuid, child_uuid, chain in made[-5:]:
        child = await registry.resolve(child_uuid)
        assert child is not None and child.chain == chain and child.hops == ("a.b",)
        assert (await registry.parent(child)).uuid == root_uuid
        assert await registry.child(await registry.parent(child), "a.b") == child


async def test_frames_with_any_character_in_a_name_resolve_the_same() -> None:
    registry = FrameRegistry(MemoryBackend())
    for origin, listener in (("a\x1fb", "x"), ("c", "y\x1fz"), ("d", "e")):
        root = await registry.new_root(origin)
        child = await registry.child(root, listener)
        assert child.hops == (listener,) and child.origin == origin
        assert await registry.child(root, listener) == child
        assert await registry.parent(child) == root
        assert await registry.resolve(child.uuid) == child
        assert await registry.resolve(root.uuid) == root


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
