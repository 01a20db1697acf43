"""The reference store: histories, registry and dead letters in plain dicts.

Synchronous, not thread-safe: :class:`~xml_pipeline.backends.memory.MemoryBackend`
wraps it for one event loop, and the manager server wraps it behind a lock for
other processes. Every semantic question about backends (idempotency, trimming,
eviction) is answered here first.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from .base import SAMPLE_BYTES, DeadLetter, HistoryLimits, Slot, letter_size, over_budget

__all__ = ["Store"]

logger = logging.getLogger(__name__)

_new_tuple = tuple.__new__


class _History:
    __slots__ = ("keys", "slots", "trimmed")  # slots[i] has index trimmed + i

    def __init__(self) -> None:
        self.slots: deque[tuple[Any, ...]] = deque()
        self.keys: dict[tuple[str, str], int] = {}
        self.trimmed = 0


class Store:
    """The reference semantics of :class:`~xml_pipeline.backends.Backend`, synchronous.

    Args:
        limits: trimming and eviction bounds.
    """

    def __init__(self, limits: HistoryLimits | None = None) -> None:
        self.limits = limits or HistoryLimits()
        # Frames in least-recently-used order (histories and registry share it).
        self._histories: OrderedDict[str, _History] = OrderedDict()
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
        history = histories.get(thread_id)
        if history is None:
            history = histories[thread_id] = _History()
            if len(histories) > self.limits.max_threads:
                self._evict()
        else:
            histories.move_to_end(thread_id)
        if thread_id in self._uuid_to_chain:
            self._uuid_to_chain.move_to_end(thread_id)
        key = (slot.message_id, slot.direction)
        index = history.keys.get(key)
        if index is not None:
            return index
        index = history.trimmed + len(history.slots)
        # Kept as a plain tuple, which the garbage collector stops tracking (a Slot it
        # would scan forever); its index is its position, set on the copies readers get.
        history.slots.append(tuple(slot))
        history.keys[key] = index
        if len(history.slots) > self.limits.max_slots_per_thread:
            old = history.slots.popleft()
            history.trimmed += 1
            self._counters["slots_trimmed"] += 1
            history.keys.pop((old[5], old[1]), None)  # (message_id, direction)
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
            self._histories.pop(uuid, None)
            self._drop_registry(uuid)
            self._counters["threads_evicted"] += 1

    def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        history = self._histories.get(thread_id)
        return history is not None and (message_id, direction) in history.keys

    def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        history = self._histories.get(thread_id)
        if history is None:
            return []
        first = history.trimmed
        return [_new_tuple(Slot, (first + i, *s[1:])) for i, s in enumerate(history.slots)]

    def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        history = self._histories.get(thread_id)
        if history is None:
            return None
        pos = index - history.trimmed
        if 0 <= pos < len(history.slots):
            return _new_tuple(Slot, (index, *history.slots[pos][1:]))
        return None

    def buffer_thread_len(self, thread_id: str) -> int:
        history = self._histories.get(thread_id)
        return len(history.slots) if history is not None else 0

    def buffer_thread_exists(self, thread_id: str) -> bool:
        return thread_id in self._histories

    def buffer_delete_thread(self, thread_id: str) -> bool:
        return self._histories.pop(thread_id, None) is not None

    def buffer_list_threads(self) -> list[str]:
        return list(self._histories)

    def buffer_clear(self) -> None:
        self._histories.clear()

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
