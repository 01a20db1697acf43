"""``RedisBackend``: the key layout and the store operations, over a :class:`Pipeline`.

What each operation sends (a command or one of the Lua scripts of :mod:`.scripts`) and
the keys it touches; the package docstring draws the key layout and says what is atomic,
what expires and what is retried. Sending, batching and retrying are the pipeline's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import uuid as _uuid
from collections.abc import Sequence
from typing import Any

from ...exceptions import BackendError, BackendUnavailable, ConfigError
from ..base import (
    SAMPLE_BYTES,
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_bytes,
    dead_letter_to_bytes,
    over_budget,
    redact_url,
    slot_from_bytes,
    slot_to_bytes,
)
from ..scheme import RedisOptions
from .pipeline import Pipeline, RedisStatistics, pack_args
from .scripts import (
    DEAD_LETTER_ADD,
    DEAD_LETTER_DELETE,
    DEAD_LETTER_LIST,
    DEAD_LETTER_PURGE,
    GET_SLOT,
    REGISTRY_DELETE,
    REGISTRY_GET,
    WRITE,
)

__all__ = ["RedisBackend"]

# The package's logger, as when the backend was one module: log lines keep their name.
logger = logging.getLogger("xml_pipeline.backends.redis")

_OPTIONS = RedisOptions()  # the defaults of the organism file's redis: section
_SCAN_COUNT = 1000
_INDEX_0 = b'{"i":0,'
_INDEX_0_LEN = len(_INDEX_0)
_REFRESH_SLACK_MS = 60_000
_MANY_BYTES = 64 << 20
"""deadletter_add_many sends a batch larger than this as several script calls."""


def _glob_escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class RedisBackend:
    """Histories, registry and dead letters in Redis (see the package docstring).

    Build it with :meth:`from_url`. Nothing is connected until the first command
    (or :meth:`ping`).

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` and ``unix://`` also work).
        limits: trimming, TTL and dead-letter bounds.
        prefix: every key starts with ``prefix:``.
        connect_timeout_s: time allowed to open a connection (and for :meth:`ping`).
        socket_timeout_s: time allowed for a reply.
        retries: how many times a failed command may be sent again, at least.
        outage_s: how long a command keeps being sent again while Redis cannot be
            reached: callers wait through an outage this long instead of failing.
        allow_eviction: accept a server whose ``maxmemory-policy`` evicts keys (see
            :meth:`ping`).

    Raises:
        BackendUnavailable: the URL cannot be parsed.
    """

    def __init__(
        self,
        url: str,
        limits: HistoryLimits | None = None,
        *,
        prefix: str = _OPTIONS.prefix,
        connect_timeout_s: float = _OPTIONS.connect_timeout_s,
        socket_timeout_s: float = _OPTIONS.socket_timeout_s,
        retries: int = _OPTIONS.retries,
        outage_s: float = _OPTIONS.outage_s,
        allow_eviction: bool = _OPTIONS.allow_eviction,
    ) -> None:
        self.url = redact_url(url)
        self.allow_eviction = allow_eviction
        self.outage_s = outage_s
        self._policy_checked = False
        self.limits = limits or HistoryLimits()
        self.prefix = prefix
        self._pipeline = Pipeline(
            url,
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
            retries=retries,
            outage_s=outage_s,
        )
        ttl = self.limits.ttl_s
        self._ttl_ms = int(ttl * 1000) if ttl > 0 and math.isfinite(ttl) else 0
        if self._ttl_ms == 0 and ttl > 0 and math.isfinite(ttl):
            self._ttl_ms = 1
        # A write refreshes the TTL only once it has run down by a tenth (at most a
        # minute): four PEXPIREs cost as much as the rest of an append.
        self._refresh_below_ms = self._ttl_ms - min(self._ttl_ms // 10, _REFRESH_SLACK_MS)
        p = prefix.encode()
        self._hist = p + b":hist:"
        self._hidx = p + b":hidx:"
        self._chain = p + b":chain:"
        self._uuid = p + b":uuid:"
        self._dl_ids = p + b":dl:ids"
        self._dl_data = p + b":dl:data"
        self._dl_seq = p + b":dl:seq"
        self._stats = p + b":stats"
        self._dl_keys = (self._dl_ids, self._dl_data, self._dl_seq, self._stats, p + b":dl:ts")
        dl_ttl = self.limits.dead_letter_ttl_s
        self._dl_ttl_ms = max(1, int(dl_ttl * 1000)) if 0 < dl_ttl < math.inf else 0
        # Appends and registry writes are folded: those of one loop tick (and those
        # made while every connection is busy) go as one call of write.lua. Each is
        # idempotent, so the call may be sent again whole.
        self._writes = self._pipeline.batch(
            WRITE,
            (self._stats,),
            self.limits.max_slots_per_thread,
            self._ttl_ms,
            self._refresh_below_ms,
            self._hist,
            self._hidx,
            self._uuid,
            self._chain,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: HistoryLimits | None = None,
        *,
        prefix: str = _OPTIONS.prefix,
        connect_timeout_s: float = _OPTIONS.connect_timeout_s,
        socket_timeout_s: float = _OPTIONS.socket_timeout_s,
        retries: int = _OPTIONS.retries,
        outage_s: float = _OPTIONS.outage_s,
        allow_eviction: bool = _OPTIONS.allow_eviction,
    ) -> RedisBackend:
        """The backend a ``redis://`` URL names, with the ``redis:`` section's options.

        Raises:
            BackendUnavailable: the URL cannot be parsed.
        """
        return cls(
            url,
            limits,
            prefix=prefix,
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
            retries=retries,
            outage_s=outage_s,
            allow_eviction=allow_eviction,
        )

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    def statistics(self) -> RedisStatistics:
        """Counters of what was sent so far."""
        return self._pipeline.statistics()

    # -- key listing -----------------------------------------------------------

    async def _scan(self, prefix: bytes) -> list[bytes]:
        """Every key starting with ``prefix``, without it (SCAN, never KEYS)."""
        pattern = _glob_escape(prefix) + b"*"
        found: dict[bytes, None] = {}
        cursor: Any = b"0"
        while True:
            cursor, keys = await self._pipeline.call(
                b"SCAN", cursor, b"MATCH", pattern, b"COUNT", _SCAN_COUNT
            )
            for key in keys:
                found[key[len(prefix) :]] = None
            if cursor in (b"0", 0):
                return list(found)

    async def _unlink_all(self, *prefixes: bytes) -> None:
        for prefix in prefixes:
            names = await self._scan(prefix)
            for i in range(0, len(names), 500):
                await self._pipeline.call(
                    b"UNLINK", *(prefix + name for name in names[i : i + 500])
                )

    # -- history ---------------------------------------------------------------

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        # The item is packed here, once, with one format (this runs per slot).
        data = slot_to_bytes(slot if slot.index == 0 else slot._replace(index=0))
        if not data.startswith(_INDEX_0):  # pragma: no cover - base.py changed its format
            raise BackendError("slot_to_bytes no longer starts with the index")
        t = thread_id.encode()
        field = f"{slot.direction}:{slot.message_id}".encode()
        item = b"$1\r\na\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            len(t), t, len(field), field, len(data) - _INDEX_0_LEN, data[_INDEX_0_LEN:]
        )  # fmt: skip
        return int(await self._writes.run(item, 4))

    def slot_write(
        self, thread_id: str, slot: Slot
    ) -> tuple[tuple[bytes, bytes, bytes], bytes, bytes]:
        """What appending ``slot`` to ``thread_id`` passes to ``lib_append.lua``: the
        keys (history, index, the frame's uuid key), the field and the JSON tail.

        For scripts that append history as part of a larger atomic step (the Redis
        Streams transport's commit); :meth:`buffer_append` makes the same append, folded
        with the other writes of its loop tick into one call of ``write.lua``.
        """
        data = slot_to_bytes(slot._replace(index=0))
        if not data.startswith(_INDEX_0):  # pragma: no cover - base.py changed its format
            raise BackendError("slot_to_bytes no longer starts with the index")
        t = thread_id.encode()
        keys = (self._hist + t, self._hidx + t, self._uuid + t)
        return keys, f"{slot.direction}:{slot.message_id}".encode(), data[len(_INDEX_0) :]

    def append_settings(self) -> tuple[bytes, int, int, bytes, int]:
        """The rest of what ``lib_append.lua`` takes: the stats key, max slots, TTL
        (ms), the chain key prefix and the TTL below which a write refreshes it (ms)."""
        return (
            self._stats,
            self.limits.max_slots_per_thread,
            self._ttl_ms,
            self._chain,
            self._refresh_below_ms,
        )

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        field = f"{direction}:{message_id}".encode()
        return bool(await self._pipeline.call(b"HEXISTS", self._hidx + thread_id.encode(), field))

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        items = await self._pipeline.call(b"LRANGE", self._hist + thread_id.encode(), 0, -1)
        return [self._slot(item) for item in items]

    async def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        if index < 0:
            return None
        t = thread_id.encode()
        item = await self._pipeline.eval(GET_SLOT, (self._hist + t, self._hidx + t), index)
        return None if item is None else self._slot(item)

    def _slot(self, data: bytes) -> Slot:
        try:
            return slot_from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{self.url}: a stored slot is not valid: {exc}") from exc

    async def buffer_thread_len(self, thread_id: str) -> int:
        return int(await self._pipeline.call(b"LLEN", self._hist + thread_id.encode()))

    async def buffer_thread_exists(self, thread_id: str) -> bool:
        return bool(await self._pipeline.call(b"EXISTS", self._hist + thread_id.encode()))

    async def buffer_delete_thread(self, thread_id: str) -> bool:
        t = thread_id.encode()
        # Both keys are written together: either both exist or neither.
        n = await self._pipeline.call(b"DEL", self._hist + t, self._hidx + t, idempotent=False)
        return bool(n)

    async def buffer_list_threads(self) -> list[str]:
        return [name.decode() for name in await self._scan(self._hist)]

    async def buffer_clear(self) -> None:
        await self._unlink_all(self._hist, self._hidx)

    # -- registry --------------------------------------------------------------

    async def _registry_set(self, chain: str, uuid: str, setdefault: bool) -> str:
        item = pack_args(b"d" if setdefault else b"s", chain.encode(), uuid.encode())
        return bytes(await self._writes.run(item, 3)).decode()

    async def registry_set(self, chain: str, uuid: str) -> None:
        await self._registry_set(chain, uuid, False)

    async def registry_setdefault(self, chain: str, uuid: str) -> str:
        return await self._registry_set(chain, uuid, True)

    async def registry_get_uuid(self, chain: str) -> str | None:
        """The uuid of a chain, checked against the uuid's own key.

        Raises:
            BackendCorrupted: the uuid's key is missing or names another chain.
        """
        c = chain.encode()
        reply = await self._pipeline.eval(REGISTRY_GET, (self._chain + c,), self._uuid, c)
        return None if reply is None else bytes(reply).decode()

    async def registry_get_chain(self, uuid: str) -> str | None:
        """The chain of a uuid, checked against the chain's own key.

        Raises:
            BackendCorrupted: the chain's key is missing or names another uuid.
        """
        u = uuid.encode()
        reply = await self._pipeline.eval(REGISTRY_GET, (self._uuid + u,), self._chain, u)
        return None if reply is None else bytes(reply).decode()

    async def registry_delete(self, uuid: str) -> bool:
        reply = await self._pipeline.eval(
            REGISTRY_DELETE,
            (self._uuid + uuid.encode(),),
            self._chain,
            uuid.encode(),
            idempotent=False,
        )
        return bool(reply)

    async def registry_list_all(self) -> dict[str, str]:
        uuids = await self._scan(self._uuid)
        found: dict[str, str] = {}
        for i in range(0, len(uuids), 500):
            part = uuids[i : i + 500]
            chains = await self._pipeline.call(b"MGET", *(self._uuid + u for u in part))
            for u, chain in zip(part, chains, strict=True):
                if chain is not None:  # expired between SCAN and MGET
                    found[u.decode()] = bytes(chain).decode()
        return found

    async def registry_clear(self) -> None:
        await self._unlink_all(self._uuid, self._chain)

    # -- dead letters ----------------------------------------------------------

    async def deadletter_add(self, letter: DeadLetter) -> str:
        [letter_id] = await self.deadletter_add_many((letter,))
        return letter_id

    async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Store the letters with one script call (one command, atomic), ids in order.

        A batch past 64 MiB goes as several calls, sent together in one pipeline.
        """
        if not letters:
            return []
        limits = self.limits
        cap = limits.dead_letter_bytes
        ids: list[str] = []
        calls: list[list[bytes]] = [[]]
        size = 0
        for letter in letters:
            # The id is made here, so a retried add overwrites rather than duplicates.
            letter_id = letter.id or f"dl-{_uuid.uuid4().hex}"
            ids.append(letter_id)
            kept = dataclasses.replace(letter, id=letter_id, data=letter.data[:cap])
            data = dead_letter_to_bytes(kept)
            sample = over_budget(kept)
            sample_data = dead_letter_to_bytes(sample) if sample is not None else b""
            if calls[-1] and size + len(data) > _MANY_BYTES:
                calls.append([])
                size = 0
            calls[-1] += (letter_id.encode(), data, sample_data, kept.code.encode())
            size += len(data) + len(sample_data)
        bounds = (limits.max_dead_letters, limits.dead_letter_budget_bytes, self._dl_ttl_ms)
        replies = await asyncio.gather(
            *(self._pipeline.eval(DEAD_LETTER_ADD, self._dl_keys, *bounds, *args)
              for args in calls)
        )  # fmt: skip
        for dropped, total, cut, total_cut in replies:
            if dropped and any(total - dropped < n <= total for n in (1, 100, 10_000)):
                logger.warning(
                    "dead-letter store full (%d): dropped %d oldest so far",
                    limits.max_dead_letters,
                    total,
                )
            if cut and any(total_cut - cut < n <= total_cut for n in (1, 1000, 100_000)):
                logger.warning(
                    "dead letters over their budget (%d bytes): %d rejection(s) of outside "
                    "input kept as a %d-byte sample so far",
                    limits.dead_letter_budget_bytes, total_cut, SAMPLE_BYTES,
                )  # fmt: skip
        return ids

    async def deadletter_list(self, limit: int | None = None) -> list[DeadLetter]:
        if limit == 0:
            return []
        last = limit - 1 if limit is not None and limit > 0 else -1
        items = await self._pipeline.eval(DEAD_LETTER_LIST, self._dl_keys, last, self._dl_ttl_ms)
        try:
            letters = [dead_letter_from_bytes(item) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{self.url}: a stored dead letter is not valid: {exc}") from exc
        return letters[:limit] if limit is not None and limit < 0 else letters

    async def deadletter_delete(self, letter_id: str) -> bool:
        reply = await self._pipeline.eval(
            DEAD_LETTER_DELETE, self._dl_keys, letter_id.encode(), idempotent=False
        )
        return bool(reply)

    async def deadletter_purge(self) -> int:
        reply = await self._pipeline.eval(DEAD_LETTER_PURGE, self._dl_keys, idempotent=False)
        return int(reply)

    # -- lifecycle -------------------------------------------------------------

    async def ping(self) -> None:
        """Check that Redis answers, once, within ``connect_timeout_s``; the first time,
        also that it does not evict keys.

        A server whose ``maxmemory-policy`` is not ``noeviction`` may drop history,
        registry entries, dead letters and stream entries (a lost message) when it is
        full: it is refused unless ``allow_eviction`` (then a warning is logged). A
        server that does not let us read its configuration (``CONFIG`` renamed or not
        permitted, as some managed services do) is accepted with a warning.

        Raises:
            BackendUnavailable: ``<url> is unreachable: <reason>``.
            ConfigError: the server evicts keys and ``allow_eviction`` is off.
        """
        await self._pipeline.ping()
        if self._policy_checked:
            return
        try:
            reply = await self._pipeline.call(b"CONFIG", b"GET", b"maxmemory-policy")
        except BackendUnavailable:
            raise
        except BackendError as exc:
            logger.warning(
                "%s: cannot read maxmemory-policy (%s): make sure it is noeviction",
                self.url, exc,
            )  # fmt: skip
            self._policy_checked = True
            return
        if isinstance(reply, dict):
            items = list(reply.items())
        else:
            items = list(zip(reply[0::2], reply[1::2], strict=True))
        policy = next((bytes(v).decode() for k, v in items if bytes(k) == b"maxmemory-policy"), "")
        self._policy_checked = True
        if policy in ("", "noeviction"):
            return
        if not self.allow_eviction:
            self._policy_checked = False
            raise ConfigError(
                f"{self.url}: maxmemory-policy is {policy}: a full Redis would evict "
                "history, registry entries, dead letters and in-flight messages. Set "
                "maxmemory-policy noeviction (CONFIG SET, or redis.conf), or accept "
                "eviction with 'redis: {allow_eviction: true}'"
            )
        logger.warning(
            "%s: maxmemory-policy is %s: a full Redis may evict history and messages "
            "(allowed by redis.allow_eviction)", self.url, policy,
        )  # fmt: skip

    async def dead_letter_count(self) -> int:
        """How many dead letters are kept (one command, unlike :meth:`info`)."""
        return int(await self._pipeline.call(b"ZCARD", self._dl_ids))

    async def info(self) -> dict[str, int]:
        threads = await self._scan(self._hist)
        uuids = await self._scan(self._uuid)
        dead = await self._pipeline.call(b"ZCARD", self._dl_ids)
        raw = await self._pipeline.call(b"HGETALL", self._stats)
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[0::2], raw[1::2], strict=True)
        stats = {bytes(k).decode(): int(v) for k, v in pairs}
        counters = ("slots_trimmed", "dead_letter_bytes", "dead_letters_dropped",
                    "dead_letters_expired", "dead_letters_over_budget")  # fmt: skip
        return {
            "buffer_threads": len(threads),
            "registry_entries": len(uuids),
            "dead_letters": int(dead),
            **{name: stats.get(name, 0) for name in counters},
            **{k: n for k, n in stats.items() if k.startswith("dead_letters_over_budget:")},
        }

    async def aclose(self) -> None:
        """Fail what is still queued, stop what is in flight, close the connections."""
        await self._pipeline.aclose()

    async def close(self) -> None:
        """Alias of :meth:`aclose`."""
        await self.aclose()
