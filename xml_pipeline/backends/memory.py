"""The in-memory backend: the reference implementation of :class:`Backend`.

Everything lives in this process (see :class:`~xml_pipeline.backends.store.Store`
for the semantics). The other backends are checked against it by the conformance
suite in :mod:`xml_pipeline.testing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from ..exceptions import BackendUnavailable
from .base import DeadLetter, HistoryLimits, Slot
from .store import Store

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Histories, registry and dead letters in this process's memory.

    Args:
        limits: trimming and eviction bounds.
    """

    url = "memory://"

    def __init__(self, limits: HistoryLimits | None = None) -> None:
        self.limits = limits or HistoryLimits()
        self._store = Store(self.limits)

    @classmethod
    def from_url(cls, url: str = "memory://", limits: HistoryLimits | None = None) -> MemoryBackend:
        """The backend ``memory://`` names (a new, empty store; the URL says nothing more).

        Raises:
            BackendUnavailable: ``url`` is not ``memory://``.
        """
        if urlsplit(url).scheme != "memory":
            raise BackendUnavailable(f"{url!r} is not a memory URL: expected memory://")
        return cls(limits)

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        return self._store.buffer_append(thread_id, slot)

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        return self._store.buffer_contains(thread_id, message_id, direction)

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        return self._store.buffer_get_thread(thread_id)

    async def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        return self._store.buffer_get_slot(thread_id, index)

    async def buffer_thread_len(self, thread_id: str) -> int:
        return self._store.buffer_thread_len(thread_id)

    async def buffer_thread_exists(self, thread_id: str) -> bool:
        return self._store.buffer_thread_exists(thread_id)

    async def buffer_delete_thread(self, thread_id: str) -> bool:
        return self._store.buffer_delete_thread(thread_id)

    async def buffer_list_threads(self) -> list[str]:
        return self._store.buffer_list_threads()

    async def buffer_clear(self) -> None:
        return self._store.buffer_clear()

    async def registry_set(self, chain: str, uuid: str) -> None:
        return self._store.registry_set(chain, uuid)

    async def registry_setdefault(self, chain: str, uuid: str) -> str:
        return self._store.registry_setdefault(chain, uuid)

    async def registry_get_uuid(self, chain: str) -> str | None:
        return self._store.registry_get_uuid(chain)

    async def registry_get_chain(self, uuid: str) -> str | None:
        return self._store.registry_get_chain(uuid)

    async def registry_delete(self, uuid: str) -> bool:
        return self._store.registry_delete(uuid)

    async def registry_list_all(self) -> dict[str, str]:
        return self._store.registry_list_all()

    async def registry_clear(self) -> None:
        return self._store.registry_clear()

    async def deadletter_add(self, letter: DeadLetter) -> str:
        return self._store.deadletter_add(letter)

    async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        return self._store.deadletter_add_many(letters)

    async def deadletter_list(self, limit: int | None = None) -> list[DeadLetter]:
        return self._store.deadletter_list(limit)

    async def deadletter_delete(self, letter_id: str) -> bool:
        return self._store.deadletter_delete(letter_id)

    async def deadletter_purge(self) -> int:
        return self._store.deadletter_purge()

    async def info(self) -> dict[str, int]:
        return self._store.info()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def close(self) -> None:
        return None
