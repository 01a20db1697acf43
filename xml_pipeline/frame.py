"""Frames (threads): one call frame of a conversation, named by an opaque UUID.

A frame's *chain* is ``[origin, conversation, hop1, hop2, ...]``: the external
sender's label, the conversation id (the uuid of its root frame) and the listener
names from the root to the frame's own listener. It is stored as a JSON list, so
listener names may hold dots or any other character.

* ingress opens a root frame per conversation: chain ``[origin, root_uuid]``;
* a delivery from frame F to listener L happens on ``child(F, L)``, created on
  first use and reused afterwards;
* a response from F goes to ``parent(F)``, owned by its last hop (or, for the
  root, by the external sender).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .backends.base import Backend

__all__ = ["Frame", "FrameRegistry", "decode_frame"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One call frame.

    Attributes:
        uuid: the frame's id, the only thing handlers see.
        origin: the external sender's label (never a routing target).
        root: the conversation id (the root frame's uuid).
        hops: listener names from the root to this frame's listener.
    """

    uuid: str
    origin: str
    root: str
    hops: tuple[str, ...]
    _chain: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def depth(self) -> int:
        """Number of hops below the root (the root is 0)."""
        return len(self.hops)

    @property
    def listener(self) -> str | None:
        """The listener that owns this frame; None for a root (owned by the external sender)."""
        return self.hops[-1] if self.hops else None

    @property
    def chain(self) -> str:
        """The registry key of this frame."""
        chain = self._chain
        if chain is None:
            chain = _encode(self.origin, self.root, self.hops)
            object.__setattr__(self, "_chain", chain)  # a cache: frames are immutable
        return chain


_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_str = json.encoder.encode_basestring  # what the encoder above does to one string


def _encode(origin: str, root: str, hops: tuple[str, ...]) -> str:
    # What ``_json([origin, root, *hops])`` writes (tests/test_frame.py), without the
    # encoder's generic machinery: a fifth of its cost, once per new conversation.
    if hops:
        return f"[{_json_str(origin)},{_json_str(root)},{','.join(map(_json_str, hops))}]"
    return f"[{_json_str(origin)},{_json_str(root)}]"


def _child_chain(parent: str, listener: str) -> str:
    """``_encode`` of a parent's chain plus one hop, from the parent's encoded chain."""
    return f"{parent[:-1]},{_json_str(listener)}]"


_forks = [0]  # bumped in a forked child, so that no pool of random bytes is used twice
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


class _Uuids:
    """Random (version 4) UUID strings, made 256 at a time from one ``os.urandom`` call.

    One per registry (one event loop); a forked child draws fresh bytes.
    """

    __slots__ = ("_fork", "_pool")

    def __init__(self) -> None:
        self._pool: list[str] = []
        self._fork = _forks[0]

    def __call__(self) -> str:
        pool = self._pool
        if not pool or self._fork != _forks[0]:
            # One list comprehension per 256: cheaper per id than slicing bytes per call.
            h = os.urandom(16 * 256).hex()
            pool = self._pool = [
                f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
                f"{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
                for i in range(0, 32 * 256, 32)
            ]
            self._fork = _forks[0]
        return pool.pop()


def decode_frame(uuid: str, chain: str) -> Frame | None:
    """The frame of a registry entry (``uuid`` and its ``chain``); None if the chain
    is not a frame's."""
    try:
        parts = json.loads(chain)
    except ValueError:
        return None
    if not (isinstance(parts, list) and len(parts) >= 2 and all(isinstance(p, str) for p in parts)):
        return None
    return Frame(uuid, parts[0], parts[1], tuple(parts[2:]))


# A cached frame is kept as one string, its uuid, origin, root, chain and hops joined by
# _SEP: a string is never an object the garbage collector tracks, so however long it
# stays cached it costs no collection anything (a cached Frame, or even a tuple until its
# first collection, sat in the young generation and made each collection longer). A hit
# builds the Frame anew. The chain is JSON, which escapes _SEP; a frame with _SEP in a
# name is not cached (XML cannot carry that character, so only the Python API can make
# one).
_SEP = "\x1f"
_new_frame = object.__new__
_set_uuid = Frame.__dict__["uuid"].__set__
_set_origin = Frame.__dict__["origin"].__set__
_set_root = Frame.__dict__["root"].__set__
_set_hops = Frame.__dict__["hops"].__set__
_set_chain = Frame.__dict__["_chain"].__set__


def _frame(entry: str) -> Frame:
    """The frame of a cache entry (what ``Frame(...)`` builds, without its checks)."""
    uuid, origin, root, chain, *hops = entry.split(_SEP)
    frame: Frame = _new_frame(Frame)
    _set_uuid(frame, uuid)
    _set_origin(frame, origin)
    _set_root(frame, root)
    _set_hops(frame, tuple(hops))
    _set_chain(frame, chain)
    return frame


def _entry(uuid: str, origin: str, root: str, hops: tuple[str, ...], chain: str) -> str | None:
    """The cache entry of a frame, or None if a name holds _SEP."""
    entry = _SEP.join((uuid, origin, root, chain, *hops))
    return entry if entry.count(_SEP) == 3 + len(hops) else None


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Cache(Generic[_K, _V]):
    """A bounded map of at most ``size`` entries, kept as two generations of dicts.

    New entries go to the young dict; when it holds ``size // 2`` it becomes the old
    one and the previous old one is dropped. Inserting costs one plain dict store,
    where an ``OrderedDict`` bounded by ``popitem`` costs about three times as much
    (measured: benchmarks/stages.py, ingress, which adds four entries per message).
    """

    __slots__ = ("_half", "_old", "_young")

    def __init__(self, size: int) -> None:
        self._half = max(1, size // 2)
        self._young: dict[_K, _V] = {}
        self._old: dict[_K, _V] = {}

    def get(self, key: _K) -> _V | None:
        found = self._young.get(key)
        return self._old.get(key) if found is None else found

    def put(self, key: _K, value: _V) -> None:
        young = self._young
        young[key] = value
        if len(young) >= self._half:
            self._old = young
            self._young = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


class FrameRegistry:
    """Creates and resolves frames through a backend's registry.

    Frames never change once created, so resolved frames are cached (bounded).
    """

    def __init__(self, backend: Backend, *, cache_size: int = 65_536) -> None:
        self._backend = backend
        self._cache_size = cache_size
        self._new_uuid = _Uuids()
        self._by_uuid: _Cache[str, str] = _Cache(cache_size)  # uuid -> entry
        self._children: _Cache[str, str] = _Cache(cache_size)  # parent uuid _SEP listener -> entry
        self._parents: _Cache[str, str] = _Cache(cache_size)  # uuid -> the parent's entry

    def _remember(self, frame: Frame) -> Frame:
        entry = _entry(frame.uuid, frame.origin, frame.root, frame.hops, frame.chain)
        if entry is not None:
            self._by_uuid.put(frame.uuid, entry)
        return frame

    def new_uuid(self) -> str:
        """A fresh random frame id."""
        return self._new_uuid()

    async def new_root(self, origin: str, uuid: str | None = None, *, named: bool = False) -> Frame:
        """Open a root frame for a new conversation from ``origin``.

        Args:
            origin: the external sender's label.
            uuid: the conversation's id (default: a fresh random one, see
                :meth:`new_uuid`).
            named: ``uuid`` is a name a client gave: it is registered with
                ``registry_setdefault``, so that concurrent openers of one name
                share one conversation.
        """
        if uuid is None:
            uuid = self._new_uuid()
        frame = Frame(uuid, origin, uuid, ())
        if named:
            await self._backend.registry_setdefault(frame.chain, uuid)
        else:
            await self._backend.registry_set(frame.chain, uuid)
        return self._remember(frame)

    async def resolve(self, uuid: str) -> Frame | None:
        """The frame a uuid names, or None if unknown."""
        entry = self._by_uuid.get(uuid)
        if entry is not None:
            return _frame(entry)
        chain = await self._backend.registry_get_chain(uuid)
        if chain is None:
            return None
        frame = decode_frame(uuid, chain)
        return self._remember(frame) if frame is not None else None

    def known(self, uuid: str, chain: str) -> Frame | None:
        """The frame ``uuid`` names, given its chain (as a stream entry carries it):
        no registry lookup. None if the chain cannot be read."""
        entry = self._by_uuid.get(uuid)
        if entry is not None:
            return _frame(entry)
        frame = decode_frame(uuid, chain)
        return self._remember(frame) if frame is not None else None

    async def child(self, frame: Frame, listener: str) -> Frame:
        """The frame on which ``frame`` calls ``listener`` (created on first use)."""
        key = f"{frame.uuid}{_SEP}{listener}"
        found = self._children.get(key)
        if found is not None:
            return _frame(found)
        hops = (*frame.hops, listener)
        chain = _child_chain(frame.chain, listener)
        uuid = await self._backend.registry_setdefault(chain, self._new_uuid())
        child = Frame(uuid, frame.origin, frame.root, hops)
        _set_chain(child, chain)  # known already: no need to encode it
        entry = _entry(uuid, frame.origin, frame.root, hops, chain)
        if entry is None:
            return child
        by_uuid = self._by_uuid
        if key.count(_SEP) == 1:
            parent = by_uuid.get(frame.uuid) or _entry(
                frame.uuid, frame.origin, frame.root, frame.hops, frame.chain
            )
            if parent is not None:
                self._children.put(key, entry)
                self._parents.put(uuid, parent)
        by_uuid.put(uuid, entry)
        return child

    async def parent(self, frame: Frame) -> Frame:
        """The caller's frame. The root's parent is the root itself."""
        if not frame.hops:
            return frame
        known = self._parents.get(frame.uuid)
        if known is not None:
            return _frame(known)
        hops = frame.hops[:-1]
        if not hops:
            root = self._by_uuid.get(frame.root)
            if root is None:
                return self._remember(Frame(frame.root, frame.origin, frame.root, ()))
            return _frame(root)
        chain = _encode(frame.origin, frame.root, hops)
        uuid = await self._backend.registry_setdefault(chain, self._new_uuid())
        cached = self._by_uuid.get(uuid)
        if cached is not None:
            return _frame(cached)
        return self._remember(Frame(uuid, frame.origin, frame.root, hops))
