"""The reference store: histories, registry and dead letters.

Histories are packed: a frame's slots are records in one bytearray (see "compact
histories" below), so that a store holding hundreds of thousands of frames costs the
cyclic garbage collector nothing to scan and about 100 bytes of overhead per frame.
Registry and dead letters are plain dicts of strings and records.

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

# -- compact histories -----------------------------------------------------------------
#
# A frame's history is two bytearrays, ``log`` and ``starts`` (in two dicts, not a
# tuple: a new tuple sits in the young generation until its first collection). Neither
# is an object the cyclic garbage collector tracks, so however many histories are kept,
# no collection ever scans them (a deque, a dict and a record per frame made every
# collection walk them, and cost ~1 KB each). One record per kept slot in ``log``,
# oldest first:
#
#     d timestamp | H sender | H to | H payload | I xml length | I id length | H direction |
#     id (UTF-8) | the inline names (I length + UTF-8 each) | xml
#
# Direction, sender, to and payload are codes in the store's table of names (the
# listener names, payload classes and labels a store sees are few, and shared by every
# slot); past _MAX_NAMES names, or for a name longer than _MAX_NAME_CHARS, the name is
# written inline (_INLINE). ``starts`` is ``q trimmed`` (slots trimmed so far) followed
# by one 16-byte entry per kept record: ``q start`` (counted from the frame's first
# record ever) and ``q`` a hash of the record's *key* (its id length, direction and id,
# which open the record after the header). The oldest slot is trimmed by deleting the
# front of ``log`` (which a bytearray does without moving the rest), and a record's
# position in ``log`` is its start minus the oldest kept one's. The idempotency check
# of an append searches the hashes and reads back only the record a matching one
# points to, whatever the size of the payloads.

_HEAD = struct.Struct("<dHHHIIH")  # timestamp, sender, to, payload, xml length, then the key
_KEY = struct.Struct("<IH")  # id length, direction
_KEY_AT = _HEAD.size - _KEY.size
_Q = struct.Struct("<q")
_QQ = struct.Struct("<qq")  # trimmed, the oldest kept record's start
_LEN = struct.Struct("<I")
_INLINE = 0xFFFF  # the name follows inline
_NONE = 0xFFFE  # no addressee (a broadcast)
# At most this many names: the listeners, payload classes and labels a store sees
# first get codes; past it (outside senders using a new label each, say) names are
# written inline, so a hostile sender cannot grow the table beyond ~0.5 MB.
_MAX_NAMES = 4096
_MAX_NAME_CHARS = 64  # longer names (labels from outside) are not worth a table entry


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


def _key_hash(key: bytes) -> bytes:
    """The 8 bytes ``keys`` holds for a record's key (this process's hash of it)."""
    return _Q.pack(hash(key))


def _find(log: bytearray, starts: bytearray, key: bytes) -> int:
    """Which kept record (0 is the oldest) has ``key`` as its id and direction, or -1.

    Searches the hashes in ``starts`` (8 bytes of each 16), then reads the record a
    match points to: the cost grows with the number of kept slots, not with their
    bytes (a search of ``log`` read every payload kept: ~20 ms an append at 10,000
    slots of 4 KB)."""
    wanted = _key_hash(key)
    at = starts.find(wanted, 16)
    if at == -1:
        return -1
    first = _Q.unpack_from(starts, 8)[0]
    n = len(key)
    while at != -1:
        if at % 16:  # astride two entries, or a start's bytes: not a hash
            at = starts.find(wanted, at + 1)
            continue
        pos = _Q.unpack_from(starts, at - 8)[0] - first + _KEY_AT
        if log[pos : pos + n] == key:
            return (at - 16) >> 4
        at = starts.find(wanted, at + 16)
    return -1


def _kept(starts: bytearray) -> int:
    """How many records a frame's ``starts`` lists."""
    return (len(starts) - 8) >> 4


class Store:
    """The reference semantics of :class:`~xml_pipeline.backends.Backend`, synchronous.

    Args:
        limits: trimming and eviction bounds.
    """

    def __init__(self, limits: HistoryLimits | None = None) -> None:
        self.limits = limits or HistoryLimits()
        # Frames in least-recently-used order (histories and registry share it).
        # Each frame's log, in least-recently-used order, and its records' starts and
        # key hashes.
        self._histories: OrderedDict[str, bytearray] = OrderedDict()
        self._starts: dict[str, bytearray] = {}
        self._names = _Names()
        self._chain_to_uuid: dict[str, str] = {}
        self._uuid_to_chain: OrderedDict[str, str] = OrderedDict()
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
        histories = self._histories
        log = histories.get(thread_id)
        if log is None:
            log = histories[thread_id] = bytearray()
            starts = self._starts[thread_id] = bytearray(8)
            if len(histories) > self.limits.max_threads:
                self._evict()
        else:
            histories.move_to_end(thread_id)
            starts = self._starts[thread_id]
        if thread_id in self._uuid_to_chain:
            self._uuid_to_chain.move_to_end(thread_id)
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
        if len(starts) > 8:
            at = _find(log, starts, key)
            if at != -1:
                return int(_Q.unpack_from(starts, 0)[0]) + at
            trimmed, first = _QQ.unpack_from(starts)
        else:
            trimmed, first = _Q.unpack_from(starts)[0], 0
        index: int = trimmed + _kept(starts)
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
        # The record is made whole before anything is written: a slot it cannot be made
        # of (xml not bytes, say) leaves the history as it was.
        if _INLINE in (sender_code, to_code, payload_code):
            inline = []
            for name, c in ((sender, sender_code), (to, to_code), (payload, payload_code)):
                if c == _INLINE:
                    data = _utf8(name)  # type: ignore[arg-type]  # never None: that is _NONE
                    inline.append(_LEN.pack(len(data)) + data)
            record = b"".join((head, message_id, *inline, xml))
        else:
            record = b"".join((head, message_id, xml))
        starts += _Q.pack(first + len(log))
        starts += _key_hash(key)
        log += record
        if _kept(starts) > self.limits.max_slots_per_thread:
            # The oldest record goes: it ends where the next one starts (or the log ends).
            end = _Q.unpack_from(starts, 24)[0] - first if len(starts) > 24 else len(log)
            del log[:end]
            del starts[8:24]
            _Q.pack_into(starts, 0, trimmed + 1)
            self._counters["slots_trimmed"] += 1
        return index

    def _evict(self) -> None:
        # The least recently written frame goes first, history and registry entry
        # together (both are kept in least-recently-used order).
        limit = self.limits.max_threads
        while len(self._histories) > limit or len(self._uuid_to_chain) > limit:
            if len(self._histories) > limit:
                uuid = next(iter(self._histories))
            else:
                uuid = next(iter(self._uuid_to_chain))
            self._drop_history(uuid)
            self._drop_registry(uuid)
            self._counters["threads_evicted"] += 1

    def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        log = self._histories.get(thread_id)
        code = self._names.codes.get(direction)
        if log is None or code is None:
            return False
        data = _utf8(message_id)
        key = _KEY.pack(len(data), code) + data
        return _find(log, self._starts[thread_id], key) != -1

    def _drop_history(self, thread_id: str) -> bool:
        self._starts.pop(thread_id, None)
        return self._histories.pop(thread_id, None) is not None

    def _slots(self, thread_id: str, at: int, stop: int) -> list[Slot]:
        """The slots of the frame's records ``at`` to ``stop - 1`` (0 is the oldest kept)."""
        if stop <= at:
            return []
        log, starts = self._histories[thread_id], self._starts[thread_id]
        names = self._names.names
        trimmed, first = struct.unpack_from("<qq", starts, 0)
        out = []
        entries = struct.unpack_from(f"<{2 * (stop - at)}q", starts, 8 + 16 * at)
        for i, start in enumerate(entries[::2]):
            pos = start - first
            timestamp, *codes, xml_len, id_len, direction = _HEAD.unpack_from(log, pos)
            pos += _HEAD.size
            message_id = log[pos : pos + id_len].decode("utf-8", "surrogatepass")
            pos += id_len
            fields: list[str | None] = []
            for c in codes:
                if c < _NONE:
                    fields.append(names[c])
                elif c == _NONE:
                    fields.append(None)
                else:
                    n = _LEN.unpack_from(log, pos)[0]
                    pos += _LEN.size
                    fields.append(log[pos : pos + n].decode("utf-8", "surrogatepass"))
                    pos += n
            sender, to, payload = fields
            xml = bytes(log[pos : pos + xml_len])
            index = trimmed + at + i
            out.append(
                _new_tuple(
                    Slot, (index, names[direction], sender, to, payload, message_id, timestamp, xml)
                )
            )
        return out

    def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        starts = self._starts.get(thread_id)
        if starts is None:
            return []
        return self._slots(thread_id, 0, _kept(starts))

    def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        starts = self._starts.get(thread_id)
        if starts is None:
            return None
        pos = index - _Q.unpack_from(starts, 0)[0]
        if 0 <= pos < _kept(starts):
            return self._slots(thread_id, pos, pos + 1)[0]
        return None

    def buffer_thread_len(self, thread_id: str) -> int:
        starts = self._starts.get(thread_id)
        return _kept(starts) if starts is not None else 0

    def buffer_thread_exists(self, thread_id: str) -> bool:
        return thread_id in self._histories

    def buffer_delete_thread(self, thread_id: str) -> bool:
        return self._drop_history(thread_id)

    def buffer_list_threads(self) -> list[str]:
        return list(self._histories)

    def buffer_clear(self) -> None:
        self._histories.clear()
        self._starts.clear()

    # -- registry --------------------------------------------------------------

    def registry_set(self, chain: str, uuid: str) -> None:
        old = self._chain_to_uuid.get(chain)
        if old is not None and old != uuid:
            self._uuid_to_chain.pop(old, None)
        old_chain = self._uuid_to_chain.get(uuid)
        if old_chain is not None and old_chain != chain:
            self._chain_to_uuid.pop(old_chain, None)
        self._chain_to_uuid[chain] = uuid
        self._uuid_to_chain[uuid] = chain
        if len(self._uuid_to_chain) > self.limits.max_threads:
            self._evict()

    def registry_setdefault(self, chain: str, uuid: str) -> str:
        existing = self._chain_to_uuid.get(chain)
        if existing is not None:
            return existing
        self.registry_set(chain, uuid)
        return uuid

    def registry_get_uuid(self, chain: str) -> str | None:
        return self._chain_to_uuid.get(chain)

    def registry_get_chain(self, uuid: str) -> str | None:
        return self._uuid_to_chain.get(uuid)

    def _drop_registry(self, uuid: str) -> bool:
        chain = self._uuid_to_chain.pop(uuid, None)
        if chain is None:
            return False
        if self._chain_to_uuid.get(chain) == uuid:
            del self._chain_to_uuid[chain]
        return True

    def registry_delete(self, uuid: str) -> bool:
        return self._drop_registry(uuid)

    def registry_list_all(self) -> dict[str, str]:
        return dict(self._uuid_to_chain)

    def registry_clear(self) -> None:
        self._chain_to_uuid.clear()
        self._uuid_to_chain.clear()

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
            "buffer_threads": len(self._histories),
            "registry_entries": len(self._uuid_to_chain),
            "dead_letters": len(self._dead),
            "dead_letter_bytes": self._dead_bytes,
            **self._counters,
            **{f"dead_letters_over_budget:{code}": n for code, n in self._over_budget.items()},
        }
