"""Redis Streams primitives of the distributed transport: inboxes, reads, claims and the
commit that ends a delivery.

Each listener's inbox is a stream (``P:in:<listener>``, ``P`` the backend's prefix)
read through one consumer group; a node is a consumer. An entry is a message in
flight: it is *accepted* once ``XADD`` returned, stays in the stream until the
delivery that handles it commits, and is pending for one consumer at a time.

**The commit** (:meth:`RedisStreams.commit`, ``commit.lua``) ends a delivery in one
atomic step, only if this consumer still owns the entry (the *fence*: the entry is
pending in the group for this consumer): it appends the history slots (idempotent by
message id, with the backend's trimming and TTL), adds every output to its stream,
acknowledges the entry and deletes it. A consumer presumed dead whose entry another
consumer claimed (``XAUTOCLAIM``) therefore cannot commit late: its handler may have
run (side effects outside the organism are at-least-once), but the organism's
history and messages change once.

Acknowledged entries are deleted at once, so a stream holds only what is not done:
its length is the inbox's depth, and nothing unacknowledged is ever trimmed.

The history must live on the same Redis server (a :class:`RedisBackend` with the same
prefix): the commit writes it in the backend's key layout.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.base import Slot
from ..backends.redis.backend import RedisBackend
from ..backends.redis.pipeline import Pipeline
from ..backends.redis.scripts import COMMIT, REFRESH
from ..exceptions import BackendError

__all__ = ["Commit", "Entry", "RedisStreams"]

_READ_BLOCK_MS = 1000  # XREADGROUP's longest wait: well under the socket timeout


class Commit(enum.IntEnum):
    """What :meth:`RedisStreams.commit` did."""

    COMMITTED = 1
    """Slots appended, outputs added, the entry acknowledged and deleted."""
    CLAIMED = 0
    """Nothing: the entry is pending for another consumer (it claimed it)."""
    GONE = -1
    """Nothing: the entry is not pending (acknowledged already, or never read)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry read or claimed by a consumer.

    Attributes:
        stream: the stream's key.
        id: the entry's id (``<ms>-<seq>``).
        fields: its fields and values.
    """

    stream: bytes
    id: bytes
    fields: dict[bytes, bytes]


def _fields(flat: Sequence[bytes] | None) -> dict[bytes, bytes]:
    if not flat:  # an entry deleted while pending: XAUTOCLAIM lists it apart
        return {}
    return dict(zip(flat[0::2], flat[1::2], strict=True))


class RedisStreams:
    """Inbox streams of one organism on one Redis server, and the commit.

    Args:
        url: the Redis server (the same server as ``backend``).
        backend: where the history lives; its prefix names the streams too.
        group: the consumer group every inbox is read through.
        connect_timeout_s, socket_timeout_s, retries: as for the backend.
    """

    def __init__(
        self,
        url: str,
        backend: RedisBackend,
        *,
        group: str = "nodes",
        connect_timeout_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        retries: int = 5,
    ) -> None:
        if socket_timeout_s * 1000 <= _READ_BLOCK_MS:
            raise ValueError("socket_timeout_s must be longer than a blocking read (1 s)")
        self.backend = backend
        self.group = group.encode()
        self._prefix = backend.prefix.encode()
        options: dict[str, Any] = {
            "connect_timeout_s": connect_timeout_s,
            "socket_timeout_s": socket_timeout_s,
            "retries": retries,
            "owner": "transport",
        }
        self._commands = Pipeline(url, **options)
        # Blocking reads hold their connection: they get one of their own.
        self._reads = Pipeline(url, lanes=1, **options)
        self.url = self._commands.url

    def __repr__(self) -> str:
        return f"RedisStreams({self.url!r}, group={self.group.decode()!r})"

    def inbox(self, listener: str) -> bytes:
        """The stream key of ``listener``'s inbox."""
        return self._prefix + b":in:" + listener.encode()

    def replies(self, node: str) -> bytes:
        """The stream key of the replies for the conversations ``node`` accepted."""
        return self._prefix + b":out:" + node.encode()

    async def ensure_group(self, stream: bytes) -> None:
        """Create the consumer group on ``stream`` (and the stream) unless it exists."""
        try:
            await self._commands.call(b"XGROUP", b"CREATE", stream, self.group, b"0", b"MKSTREAM")
        except BackendError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def add(self, stream: bytes, fields: Mapping[bytes, bytes]) -> bytes:
        """Add an entry (``XADD``); once this returns, the entry is accepted.

        Not sent twice when its reply is lost (it would add a second entry).
        """
        args = [item for pair in fields.items() for item in pair]
        reply = await self._commands.call(b"XADD", stream, b"*", *args, idempotent=False)
        return bytes(reply)

    async def read(
        self,
        consumer: str,
        streams: Sequence[bytes] | Mapping[bytes, bytes],
        *,
        count: int = 64,
        block_ms: int = 0,
    ) -> list[Entry]:
        """Entries for ``consumer`` (``XREADGROUP``), now pending for it.

        Args:
            consumer: this node's name in the group.
            streams: the inboxes to read, each from ``b">"`` (new entries), or a
                mapping of stream to where to read it from: ``b">"``, or an id to
                read the entries already pending for ``consumer`` after it (``b"0"``:
                all it held when it stopped, oldest first).
            count: at most this many entries per stream.
            block_ms: wait this long for a new entry when there is none (at most 1 s;
                only when every stream is read from ``b">"``).
        """
        starts = streams if isinstance(streams, Mapping) else dict.fromkeys(streams, b">")
        if not starts:
            return []
        block = min(max(block_ms, 0), _READ_BLOCK_MS)
        args: list[Any] = [b"XREADGROUP", b"GROUP", self.group, consumer.encode()]
        args += [b"COUNT", count]
        if block and all(start == b">" for start in starts.values()):
            args += [b"BLOCK", block]
        args += [b"STREAMS", *starts.keys(), *starts.values()]
        # Not idempotent: a read whose reply was lost delivered its entries anyway
        # (they are pending for this consumer and come back by claim).
        reply = await self._reads.call(*args, idempotent=False)
        entries: list[Entry] = []
        for stream, items in reply or ():
            for entry_id, flat in items:
                if flat:  # an entry deleted while pending for us has no fields
                    entries.append(Entry(bytes(stream), bytes(entry_id), _fields(flat)))
        return entries

    async def claim(
        self, consumer: str, stream: bytes, *, min_idle_ms: int, count: int = 64
    ) -> list[Entry]:
        """Take over entries pending for longer than ``min_idle_ms`` (``XAUTOCLAIM``).

        From then on the entries are pending for ``consumer``, and the consumer that
        held them can no longer commit them.
        """
        entries: list[Entry] = []
        start: Any = b"0-0"
        while True:
            reply = await self._commands.call(
                b"XAUTOCLAIM", stream, self.group, consumer.encode(), min_idle_ms, start,
                b"COUNT", count,
            )  # fmt: skip
            start, items = reply[0], reply[1]
            for entry_id, flat in items:
                if flat:  # deleted entries are dropped from the pending list by Redis
                    entries.append(Entry(stream, bytes(entry_id), _fields(flat)))
            if start in (b"0-0", "0-0") or len(entries) >= count:
                return entries

    async def commit(
        self,
        entry: Entry,
        consumer: str,
        slots: Sequence[tuple[str, Slot]] = (),
        outputs: Sequence[tuple[bytes, Mapping[bytes, bytes]]] = (),
    ) -> Commit:
        """End the delivery of ``entry``, atomically, if ``consumer`` still owns it.

        Args:
            entry: the input, as read or claimed by ``consumer``.
            consumer: this node's name in the group.
            slots: ``(thread, slot)`` history appends (idempotent by message id).
            outputs: ``(stream, fields)`` entries to add.

        Returns:
            What happened; only :attr:`Commit.COMMITTED` changed anything.
        """
        backend = self.backend
        stats, max_slots, ttl_ms, chain_prefix, refresh_below = backend.append_settings()
        keys: list[bytes] = [entry.stream, stats]
        args: list[Any] = [self.group, entry.id, consumer.encode(), max_slots, ttl_ms]
        args += [chain_prefix, refresh_below, len(slots), len(outputs)]
        for thread, slot in slots:
            slot_keys, field, tail = backend.slot_write(thread, slot)
            keys += slot_keys
            args += (field, tail)
        for stream, fields in outputs:
            keys.append(stream)
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
        # Sent again when its reply is lost: a commit that ran answers GONE the
        # second time and changes nothing.
        return Commit(int(await self._commands.eval(COMMIT, tuple(keys), *args)))

    async def refresh(self, consumer: str, stream: bytes, ids: Sequence[bytes]) -> set[bytes]:
        """Renew ``consumer``'s lease on the entries of ``stream`` it holds (their idle
        time starts again, so no other consumer claims them); returns the ids it still
        holds (the others were claimed by another consumer, or committed)."""
        if not ids:
            return set()
        held = await self._commands.eval(REFRESH, (stream,), self.group, consumer.encode(), *ids)
        return {bytes(entry_id) for entry_id in held}

    async def deliveries(self, stream: bytes, ids: Sequence[bytes]) -> dict[bytes, int]:
        """How many times each pending entry was delivered (absent: not pending)."""
        calls = [
            self._commands.call(b"XPENDING", stream, self.group, entry_id, entry_id, 1)
            for entry_id in ids
        ]  # made in one loop tick: one round trip
        replies = await asyncio.gather(*calls)
        return {
            entry_id: int(reply[0][3])
            for entry_id, reply in zip(ids, replies, strict=True)
            if reply
        }

    # -- nodes and their state ------------------------------------------------

    def _node_key(self, node: str) -> bytes:
        return self._prefix + b":node:" + node.encode()

    async def heartbeat(self, node: str, info: Mapping[str, Any], ttl_ms: int) -> None:
        """Say that ``node`` is alive for the next ``ttl_ms`` (with what it says of itself)."""
        data = json.dumps(dict(info), separators=(",", ":")).encode()
        await self._commands.call(b"SET", self._node_key(node), data, b"PX", ttl_ms)

    async def forget(self, node: str) -> None:
        """Say that ``node`` stopped."""
        await self._commands.call(b"DEL", self._node_key(node), idempotent=False)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The nodes alive (whose last heartbeat has not expired), with their info."""
        prefix = self._prefix + b":node:"
        keys: list[bytes] = []
        cursor: Any = b"0"
        while True:
            cursor, found = await self._commands.call(
                b"SCAN", cursor, b"MATCH", prefix + b"*", b"COUNT", 1000
            )
            keys += [bytes(key) for key in found]
            if cursor in (b"0", 0):
                break
        if not keys:
            return {}
        values = await self._commands.call(b"MGET", *keys)
        alive = {}
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                try:
                    alive[key[len(prefix) :].decode()] = json.loads(value)
                except ValueError:
                    alive[key[len(prefix) :].decode()] = {}
        return dict(sorted(alive.items()))

    async def inbox_status(self, stream: bytes) -> dict[str, Any]:
        """What an inbox holds: ``length`` (entries not done), ``pending`` (delivered,
        not committed), ``lag`` (not delivered yet), ``oldest_ms`` (age of the oldest
        pending entry, None if none) and ``pending_by_node``."""
        length = await self.length(stream)
        status: dict[str, Any] = {
            "length": length, "pending": 0, "lag": length, "oldest_ms": None,
            "pending_by_node": {},
        }  # fmt: skip
        try:
            summary = await self._commands.call(b"XPENDING", stream, self.group)
        except BackendError as exc:
            if "NOGROUP" in str(exc):
                return status
            raise
        count = int(summary[0])
        status["pending"] = count
        status["lag"] = max(0, length - count)
        if count and summary[1] is not None:
            created = int(bytes(summary[1]).split(b"-")[0])
            now_s, now_us = await self._commands.call(b"TIME")
            status["oldest_ms"] = max(0, int(now_s) * 1000 + int(now_us) // 1000 - created)
        status["pending_by_node"] = {bytes(name).decode(): int(n) for name, n in (summary[3] or ())}
        return status

    async def pending(self, stream: bytes) -> int:
        """How many entries of ``stream`` are delivered and not yet committed."""
        try:
            reply = await self._commands.call(b"XPENDING", stream, self.group)
        except BackendError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(reply[0])

    async def release(
        self, consumer: str, stream: bytes, ids: Sequence[bytes], idle_ms: int
    ) -> None:
        """Give up ``consumer``'s lease on entries it holds but will not finish: they
        stay pending for it, looking idle for ``idle_ms``, so that another consumer's
        next claim takes them (``XCLAIM ... IDLE idle_ms JUSTID``)."""
        if ids:
            await self._commands.call(
                b"XCLAIM", stream, self.group, consumer.encode(), 0, *ids,
                b"IDLE", idle_ms, b"JUSTID",
            )  # fmt: skip

    async def delete(self, stream: bytes) -> None:
        """Delete a stream and its consumer group (a client's reply stream, say)."""
        await self._commands.call(b"DEL", stream, idempotent=False)

    async def length(self, stream: bytes) -> int:
        """How many entries ``stream`` holds (pending or not yet read)."""
        return int(await self._commands.call(b"XLEN", stream))

    async def aclose(self) -> None:
        """Close both connection pools. Idempotent."""
        try:
            await self._reads.aclose()
        finally:
            await self._commands.aclose()
