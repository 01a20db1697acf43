"""The reference store: histories, registry and dead letters.

A frame's history and its registry entry are one bytearray (see "frames" below), in
one dict, so that a store holding hundreds of thousands of frames costs the cyclic
garbage collector nothing to scan, about 400 bytes of overhead per frame, and two
big dicts (the fewer big dicts, the fewer of the stalls a dict's resize makes).
Dead letters are plain dicts of strings and records.

Synchronous, not thread-safe: :class:`~xml_pipeline.backends.memory.MemoryBackend`
wraps it for one event loop, and the manager server wraps it behind a lock for
other processes. Every semantic question about backends (idempotency, trimming,
eviction) is answered here first.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence

from .base import SAMPLE_BYTES, DeadLetter, HistoryLimits, Slot, letter_size, over_budget

__all__ = ["Store"]

logger = logging.getLogger(__name__)

_new_tuple = tuple.__new__

# -- frames ----------------------------------------------------------------------------
#
# A frame is one bytearray, in one dict keyed by its uuid (in least-recently-used
# order): its history and its registry entry. A bytearray is not an object the cyclic
# garbage collector tracks, so however many frames are kept, no collection ever scans
# them (a deque, a dict and a record per frame made every collection walk them, and
# cost ~1 KB each). Its layout:
#
#     records | entries | chain | trailer
#
# * records: one per kept slot, oldest first:
#
#       d timestamp | H sender | H to | H payload | I xml length | I id length |
#       H direction | id (UTF-8) | the inline names (I length + UTF-8 each) | xml
#
#   Direction, sender, to and payload are codes in the store's table of names (the
#   listener names, payload classes and labels a store sees are few, and shared by
#   every slot); past _MAX_NAMES names, or for a name longer than _MAX_NAME_CHARS, the
#   name is written inline (_INLINE).
# * entries: 16 bytes per kept record, newest first: ``q start`` (counted from the
#   frame's first record ever) and ``q`` a hash of the record's *key* (its id length,
#   direction and id, which open the record after the header). A record's position is
#   its start minus the oldest kept one's (``first``). The idempotency check of an
#   append searches the hashes and reads back only the record a matching one points
#   to, whatever the size of the payloads.
# * chain: the frame's registry entry (UTF-8), if it has one.
# * trailer: ``q trimmed`` (slots trimmed so far), ``q first``, ``I kept``, ``I chain
#   length``, ``B flags`` (_HISTORY: it has a history, even an empty one;
#   _REGISTERED: it has a registry entry).
#
# Records come first so that trimming the oldest one deletes the front of the
# bytearray, which a bytearray does without moving the rest; the newest entry comes
# first so that an append inserts its record and its entry together, in one step
# (two would leave the bytearray over-allocated: ~150 bytes a frame).
#
# The registry's other direction, chain -> uuid, is a dict keyed by the chain's
# ``hash()`` (an int, not the ~100-byte string); a lookup reads the chain back from the
# frame to confirm it, and the rare chain whose hash another live chain holds goes to
# a second dict keyed by the chain itself.

_HEAD = struct.Struct("<dHHHIIH")  # timestamp, sender, to, payload, xml length, then the key
_KEY = struct.Struct("<IH")  # id length, direction
_KEY_AT = _HEAD.size - _KEY.size
_Q = struct.Struct("<q")
_ENTRY = struct.Struct("<qq")  # a record's start and its key's hash
_KEPT = struct.Struct("<I")  # where the trailer holds it: _T - 16 from the end
_TRAILER = struct.Struct("<qqIIB")  # trimmed, first, kept, chain length, flags
_T = _TRAILER.size
_HISTORY = 1
_REGISTERED = 2
_LEN = struct.Struct("<I")
_INLINE = 0xFFFF  # the name follows inline
_NONE = 0xFFFE  # no addressee (a broadcast)
# At most this many names: the listeners, payload classes and labels a store sees
# first get codes; past it (outside senders using a new label each, say) names are
# written inline, so a hostile sender cannot grow the table beyond ~0.5 MB.
_MAX_NAMES = 4096
_MAX_NAME_CHARS = 64  # longer names (labels from outside) are not worth a table entry
_NEW_HISTORY = _TRAILER.pack(0, 0, 1, 0, _HISTORY)  # a new frame's trailer after one append
_EVICT_BATCH = 64  # frames evicted at most at once
_chain_hash = hash  # (a name of its own, for the tests to make chains collide)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class _Names:
    """The store's table of short names: direction, sender, to and payload codes."""

    __slots__ = ("codes", "names")

    def __init__(self) -> None:
        self.names: list[str] = ["in", "out"]
        self.codes: dict[str, int] = {"in": 0, "out": 1}

    def code(self, name: str) -> int:
        code = self.codes.get(name)
        if code is not None:
            return code
        if len(self.names) >= _MAX_NAMES or len(name) > _MAX_NAME_CHARS:
            return _INLINE
        code = self.codes[name] = len(self.names)
        self.names.append(name)
        return code


_key_hash = hash  # of a record's key, as its entry holds it (a name for the tests)


def _find(frame: bytearray, lo: int, kept: int, first: int, key: bytes) -> int:
    """Which kept record (0 is the oldest) has ``key`` as its id and direction, or -1.

    ``lo`` is where the entries begin (the newest first). Searches their hashes, then
    reads the record a match points to: the cost grows with the number of kept slots,
    not with their bytes (a search of the records read every payload kept: ~20 ms an
    append at 10,000 slots of 4 KB)."""
    wanted = _Q.pack(_key_hash(key))
    hi = lo + 16 * kept
    at = frame.find(wanted, lo + 8, hi)
    n = len(key)
    while at != -1:
        if (at - lo) % 16 != 8:  # astride two entries, or a start's bytes: not a hash
            at = frame.find(wanted, at + 1, hi)
            continue
        pos = _Q.unpack_from(frame, at - 8)[0] - first + _KEY_AT
        if frame[pos : pos + n] == key:
            return kept - 1 - ((at - lo) >> 4)
        at = frame.find(wanted, at + 16, hi)
    return -1


def _chain(frame: bytearray) -> str | None:
    """A frame's registry entry, or None."""
    end = len(frame) - _T
    if not frame[-1] & _REGISTERED:
        return None
    n = _LEN.unpack_from(frame, len(frame) - 5)[0]
    return frame[end - n : end].decode("utf-8", "surrogatepass")


class Store:
    """The reference semantics of :class:`~xml_pipeline.backends.Backend`, synchronous.

    Args:
        limits: trimming and eviction bounds.
    """

    def __init__(self, limits: HistoryLimits | None = None) -> None:
        self.limits = limits or HistoryLimits()
        # Every frame (history and registry entry), least recently used first: a plain
        # dict, in which a write moves a frame to the end by taking it out and putting
        # it back. An OrderedDict rebuilds its own index of every key when its table
        # grows or is compacted (21 ms at 100,000 frames: a stall of the loop), a dict
        # only its table (2 ms).
        self._frames: dict[str, bytearray] = {}
        self._by_chain: dict[int, str] = {}  # hash(chain) -> uuid
        self._chains: dict[str, str] = {}  # chain -> uuid, for a chain whose hash is taken
        self._n_histories = 0
        self._n_registered = 0
        self._names = _Names()
        self._dead: OrderedDict[str, DeadLetter] = OrderedDict()
        self._dead_added: dict[str, float] = {}  # id -> when it was written (monotonic)
        self._dead_bytes = 0  # letter_size() of every kept letter
        self._dead_ids = itertools.count(1)
        self._counters = {
            "slots_trimmed": 0,
            "threads_evicted": 0,
            "dead_letters_dropped": 0,
            "dead_letters_expired": 0,
            "dead_letters_over_budget": 0,
        }
        self._over_budget: dict[str, int] = {}  # per code

    # -- history ---------------------------------------------------------------

    def buffer_append(self, thread_id: str, slot: Slot) -> int:
        frames = self._frames
        frame = frames.get(thread_id)
        if frame is None:
            trimmed = first = kept = chain_len = flags = 0
            lo = 0
        else:
            del frames[thread_id]  # to the end: the most recently used
            frames[thread_id] = frame
            trimmed, first, kept, chain_len, flags = _TRAILER.unpack_from(frame, len(frame) - _T)
            lo = len(frame) - _T - chain_len - 16 * kept  # where the entries begin
        _, direction_name, sender, to, payload, mid, timestamp, xml = slot
        codes = self._names.codes
        direction = codes.get(direction_name)
        if direction is None:
            direction = self._names.code(direction_name)
            if direction == _INLINE:
                raise ValueError(f"a slot's direction is 'in' or 'out', not {direction_name!r}")
        message_id = mid.encode("utf-8", "surrogatepass")
        id_len = len(message_id)
        key = _KEY.pack(id_len, direction) + message_id
        if kept:
            at = _find(frame, lo, kept, first, key)  # type: ignore[arg-type]
            if at != -1:
                return trimmed + at
        index: int = trimmed + kept
        sender_code = codes.get(sender)
        to_code = _NONE if to is None else codes.get(to)
        payload_code = codes.get(payload)
        if sender_code is None or to_code is None or payload_code is None:
            code = self._names.code
            sender_code = code(sender)
            to_code = _NONE if to is None else code(to)
            payload_code = code(payload)
        head = _HEAD.pack(
            timestamp, sender_code, to_code, payload_code, len(xml), id_len, direction
        )
        # The record and its entry (which go in together) are made whole before anything
        # is written: a slot they cannot be made of (xml not bytes, say) leaves the
        # history as it was.
        entry = _ENTRY.pack(first + lo, _key_hash(key))
        if _INLINE in (sender_code, to_code, payload_code):
            inline = []
            for name, c in ((sender, sender_code), (to, to_code), (payload, payload_code)):
                if c == _INLINE:
                    data = _utf8(name)  # type: ignore[arg-type]  # never None: that is _NONE
                    inline.append(_LEN.pack(len(data)) + data)
            record = b"".join((head, message_id, *inline, xml, entry))
        else:
            record = b"".join((head, message_id, xml, entry))
        if frame is None:
            # (made in one piece: a bytearray grown once more would be over-allocated)
            frame = frames[thread_id] = bytearray(record + _NEW_HISTORY)
            self._n_histories += 1
            if len(frames) > self.limits.max_threads:
                self._evict()
            if self.limits.max_slots_per_thread > 0:
                return index
            lo, kept, flags = len(record) - 16, 1, _HISTORY
        else:
            frame[lo:lo] = record
            lo += len(record) - 16
            kept += 1
            if not flags & _HISTORY:
                flags |= _HISTORY
                self._n_histories += 1
            elif kept <= self.limits.max_slots_per_thread:
                _KEPT.pack_into(frame, len(frame) - _T + 16, kept)
                return index
        if kept > self.limits.max_slots_per_thread:
            # The oldest record goes: it ends where the next one starts (or where the
            # entries begin), and its entry (the last) with it.
            oldest = lo + 16 * (kept - 1)
            end = _Q.unpack_from(frame, oldest - 16)[0] - first if kept > 1 else lo
            del frame[oldest : oldest + 16]
            del frame[:end]
            first += end
            trimmed += 1
            kept -= 1
            self._counters["slots_trimmed"] += 1
        _TRAILER.pack_into(frame, len(frame) - _T, trimmed, first, kept, chain_len, flags)
        return index

    def _evict(self) -> None:
        # The least recently written frames go first, history and registry entry
        # together: past ``max_threads``, a few at a time (64, or 0.05 % of
        # ``max_threads`` if that is more; never more than 1 %). In a dict, each lookup
        # of the oldest key walks past the slots of the keys taken out since its table
        # was last compacted (up to ~2.5 x max_threads): one walk for many evictions
        # keeps that cost off each one (at 1,000,000 frames, 64 at a time spent a third
        # of the store's time walking; 500 at a time, a tenth).
        frames = self._frames
        limit = self.limits.max_threads
        excess = len(frames) - limit
        if excess <= 0:
            return
        batch = max(excess, min(limit // 100, max(_EVICT_BATCH, limit // 2_000)))
        for uuid in list(itertools.islice(frames, batch)):
            frame = frames.pop(uuid)
            flags = frame[-1]
            if flags & _HISTORY:
                self._n_histories -= 1
            if flags & _REGISTERED:
                self._unindex(_chain(frame), uuid)  # type: ignore[arg-type]
                self._n_registered -= 1
            self._counters["threads_evicted"] += 1

    def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        frame = self._frames.get(thread_id)
        code = self._names.codes.get(direction)
        if frame is None or code is None:
            return False
        _, first, kept, chain_len, _ = _TRAILER.unpack_from(frame, len(frame) - _T)
        if not kept:
            return False
        data = _utf8(message_id)
        key = _KEY.pack(len(data), code) + data
        lo = len(frame) - _T - chain_len - 16 * kept
        return _find(frame, lo, kept, first, key) != -1

    def _slots(self, frame: bytearray, at: int, stop: int) -> list[Slot]:
        """The slots of the frame's records ``at`` to ``stop - 1`` (0 is the oldest kept)."""
        if stop <= at:
            return []
        names = self._names.names
        trimmed, first, kept, chain_len, _ = _TRAILER.unpack_from(frame, len(frame) - _T)
        lo = len(frame) - _T - chain_len - 16 * kept
        out = []
        # Entries are newest first: records at..stop-1 are entries kept-stop..kept-at-1.
        entries = struct.unpack_from(f"<{2 * (stop - at)}q", frame, lo + 16 * (kept - stop))
        for i, start in enumerate(entries[-2::-2]):
            pos = start - first
            timestamp, *codes, xml_len, id_len, direction = _HEAD.unpack_from(frame, pos)
            pos += _HEAD.size
            message_id = frame[pos : pos + id_len].decode("utf-8", "surrogatepass")
            pos += id_len
            fields: list[str | None] = []
            for c in codes:
                if c < _NONE:
                    fields.append(names[c])
                elif c == _NONE:
                    fields.append(None)
                else:
                    n = _LEN.unpack_from(frame, pos)[0]
                    pos += _LEN.size
                    fields.append(frame[pos : pos + n].decode("utf-8", "surrogatepass"))
                    pos += n
            sender, to, payload = fields
            xml = bytes(frame[pos : pos + xml_len])
            index = trimmed + at + i
            out.append(
                _new_tuple(
                    Slot, (index, names[direction], sender, to, payload, message_id, timestamp, xml)
                )
            )
        return out

    def _kept(self, thread_id: str) -> tuple[bytearray | None, int, int]:
        """A frame, its slots trimmed so far and its kept slots."""
        frame = self._frames.get(thread_id)
        if frame is None:
            return None, 0, 0
        trimmed, _, kept, _, _ = _TRAILER.unpack_from(frame, len(frame) - _T)
        return frame, trimmed, kept

    def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        frame, _, kept = self._kept(thread_id)
        return [] if frame is None else self._slots(frame, 0, kept)

    def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        frame, trimmed, kept = self._kept(thread_id)
        pos = index - trimmed
        if frame is not None and 0 <= pos < kept:
            return self._slots(frame, pos, pos + 1)[0]
        return None

    def buffer_thread_len(self, thread_id: str) -> int:
        return self._kept(thread_id)[2]

    def buffer_thread_exists(self, thread_id: str) -> bool:
        frame = self._frames.get(thread_id)
        return frame is not None and bool(frame[-1] & _HISTORY)

    def _drop_history(self, thread_id: str) -> bool:
        frame = self._frames.get(thread_id)
        if frame is None or not frame[-1] & _HISTORY:
            return False
        self._n_histories -= 1
        if frame[-1] & _REGISTERED:
            # The registry entry stays: the frame keeps its chain and trailer only.
            chain_len = _LEN.unpack_from(frame, len(frame) - 5)[0]
            del frame[: len(frame) - _T - chain_len]
            _TRAILER.pack_into(frame, len(frame) - _T, 0, 0, 0, chain_len, _REGISTERED)
        else:
            del self._frames[thread_id]
        return True

    def buffer_delete_thread(self, thread_id: str) -> bool:
        return self._drop_history(thread_id)

    def buffer_list_threads(self) -> list[str]:
        return [uuid for uuid, frame in self._frames.items() if frame[-1] & _HISTORY]

    def buffer_clear(self) -> None:
        for uuid in self.buffer_list_threads():
            self._drop_history(uuid)

    # -- registry --------------------------------------------------------------

    def _lookup(self, chain: str) -> str | None:
        """The uuid ``chain`` is registered to, or None."""
        uuid = self._by_chain.get(_chain_hash(chain))
        if uuid is not None and _chain(self._frames[uuid]) == chain:
            return uuid
        chains = self._chains
        return chains.get(chain) if chains else None

    def _index(self, chain: str, uuid: str) -> None:
        by_chain = self._by_chain
        h = _chain_hash(chain)
        if by_chain.setdefault(h, uuid) != uuid:  # another live chain has this hash
            self._chains[chain] = uuid

    def _unindex(self, chain: str, uuid: str) -> None:
        h = _chain_hash(chain)
        if self._by_chain.get(h) == uuid:
            del self._by_chain[h]
        elif self._chains.get(chain) == uuid:
            del self._chains[chain]

    def _set_chain(self, frame: bytearray, data: bytes | None) -> None:
        """Write a frame's registry entry (its chain's UTF-8) in its bytearray, or with
        None remove it."""
        trimmed, first, kept, chain_len, flags = _TRAILER.unpack_from(frame, len(frame) - _T)
        end = len(frame) - _T
        frame[end - chain_len : end] = data or b""
        if data is None:
            flags &= ~_REGISTERED
        else:
            flags |= _REGISTERED
        n = 0 if data is None else len(data)
        _TRAILER.pack_into(frame, len(frame) - _T, trimmed, first, kept, n, flags)

    def registry_set(self, chain: str, uuid: str) -> None:
        if _chain_hash(chain) not in self._by_chain and not self._chains:
            if uuid not in self._frames:  # a new root frame: the common case
                self.registry_setdefault(chain, uuid)
                return
            old = None
        else:
            old = self._lookup(chain)
            if old == uuid:
                return
        data = _utf8(chain)  # first: a chain that cannot be encoded changes nothing
        if old is not None:
            self._drop_registry(old)  # the chain names another frame now
        frames = self._frames
        frame = frames.get(uuid)
        if frame is None:
            frames[uuid] = bytearray(data + _TRAILER.pack(0, 0, 0, len(data), _REGISTERED))
            self._n_registered += 1
            self._index(chain, uuid)
            if len(frames) > self.limits.max_threads:
                self._evict()
            return
        old_chain = _chain(frame)
        if old_chain is not None:
            self._unindex(old_chain, uuid)
        else:
            # A history's frame registered now: written now, so the most recent.
            self._n_registered += 1
            del frames[uuid]
            frames[uuid] = frame
        self._set_chain(frame, data)
        self._index(chain, uuid)

    def registry_setdefault(self, chain: str, uuid: str) -> str:
        by_chain = self._by_chain
        h = _chain_hash(chain)
        if h not in by_chain and not self._chains and uuid not in self._frames:
            # A new frame with a new chain (a child frame's first use): the common case.
            data = chain.encode("utf-8", "surrogatepass")
            frames = self._frames
            frames[uuid] = bytearray(data + _TRAILER.pack(0, 0, 0, len(data), _REGISTERED))
            by_chain[h] = uuid
            self._n_registered += 1
            if len(frames) > self.limits.max_threads:
                self._evict()
            return uuid
        existing = self._lookup(chain)
        if existing is not None:
            return existing
        self.registry_set(chain, uuid)
        return uuid

    def registry_get_uuid(self, chain: str) -> str | None:
        return self._lookup(chain)

    def registry_get_chain(self, uuid: str) -> str | None:
        frame = self._frames.get(uuid)
        return None if frame is None else _chain(frame)

    def _drop_registry(self, uuid: str) -> bool:
        frame = self._frames.get(uuid)
        if frame is None:
            return False
        chain = _chain(frame)
        if chain is None:
            return False
        self._unindex(chain, uuid)
        self._n_registered -= 1
        if frame[-1] & _HISTORY:
            self._set_chain(frame, None)
        else:
            del self._frames[uuid]
        return True

    def registry_delete(self, uuid: str) -> bool:
        return self._drop_registry(uuid)

    def registry_list_all(self) -> dict[str, str]:
        found = ((uuid, _chain(frame)) for uuid, frame in self._frames.items())
        return {uuid: chain for uuid, chain in found if chain is not None}

    def registry_clear(self) -> None:
        for uuid in list(self.registry_list_all()):
            self._drop_registry(uuid)

    # -- dead letters ----------------------------------------------------------

    def deadletter_add(self, letter: DeadLetter) -> str:
        self._expire_letters()
        dead = self._dead
        letter_id = letter.id
        if not letter_id:
            letter_id = f"dl-{next(self._dead_ids)}"
            while letter_id in dead:
                letter_id = f"dl-{next(self._dead_ids)}"
        kept = dataclasses.replace(
            letter, id=letter_id, data=letter.data[: self.limits.dead_letter_bytes]
        )
        old = dead.get(letter_id)
        used = self._dead_bytes - (letter_size(old) if old is not None else 0)
        if used + letter_size(kept) > self.limits.dead_letter_budget_bytes:
            sample = over_budget(kept)
            if sample is not None:
                kept = sample
                self._counters["dead_letters_over_budget"] += 1
                self._over_budget[kept.code] = self._over_budget.get(kept.code, 0) + 1
                if self._counters["dead_letters_over_budget"] in (1, 1000, 100_000):
                    logger.warning(
                        "dead letters over their budget (%d bytes): %d rejection(s) of "
                        "outside input kept as a %d-byte sample so far",
                        self.limits.dead_letter_budget_bytes,
                        self._counters["dead_letters_over_budget"],
                        SAMPLE_BYTES,
                    )
        dead[letter_id] = kept
        self._dead_added.setdefault(letter_id, time.monotonic())
        self._dead_bytes = used + letter_size(kept)
        while len(dead) > self.limits.max_dead_letters:
            self._drop_letter(next(iter(dead)))
            self._counters["dead_letters_dropped"] += 1
            if self._counters["dead_letters_dropped"] in (1, 100, 10_000):
                logger.warning(
                    "dead-letter store full (%d): dropped %d oldest so far",
                    self.limits.max_dead_letters,
                    self._counters["dead_letters_dropped"],
                )
        return letter_id

    def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        return [self.deadletter_add(letter) for letter in letters]

    def deadletter_list(self, limit: int | None = None) -> list[DeadLetter]:
        self._expire_letters()
        letters = list(self._dead.values())
        return letters if limit is None else letters[:limit]

    def deadletter_delete(self, letter_id: str) -> bool:
        return self._drop_letter(letter_id)

    def deadletter_purge(self) -> int:
        n = len(self._dead)
        self._dead.clear()
        self._dead_added.clear()
        self._dead_bytes = 0
        return n

    def _drop_letter(self, letter_id: str) -> bool:
        letter = self._dead.pop(letter_id, None)
        if letter is None:
            return False
        del self._dead_added[letter_id]
        self._dead_bytes -= letter_size(letter)
        return True

    def _expire_letters(self) -> None:
        """Drop the letters older than ``dead_letter_ttl_s`` (the oldest come first)."""
        ttl = self.limits.dead_letter_ttl_s
        if ttl <= 0 or not self._dead_added:
            return
        limit = time.monotonic() - ttl
        added = self._dead_added
        while added:
            letter_id = next(iter(added))
            if added[letter_id] > limit:
                return
            self._drop_letter(letter_id)
            self._counters["dead_letters_expired"] += 1

    # -- lifecycle -------------------------------------------------------------

    def info(self) -> dict[str, int]:
        self._expire_letters()
        return {
            "buffer_threads": self._n_histories,
            "registry_entries": self._n_registered,
            "dead_letters": len(self._dead),
            "dead_letter_bytes": self._dead_bytes,
            **self._counters,
            **{f"dead_letters_over_budget:{code}": n for code, n in self._over_budget.items()},
        }
