"""Redis Streams primitives of the distributed transport: inboxes, leases, reads, claims
and the commit that ends a delivery.

Each listener's inbox is split into *shards*, streams ``P:in:<listener>:<k>`` (``P``
the backend's prefix), all read through one consumer group; a node is a consumer. A
message goes to the shard of its frame (:func:`~xml_pipeline.transport.shard_of`), so
one frame's messages are in one stream, in the order they were added. An entry is a
message in flight: it is *accepted* once ``XADD`` returned, stays in the stream until
the delivery that handles it commits, and is pending for one consumer at a time.

**Leases** (``P:lease:<listener>:<k>``, :meth:`RedisStreams.leases`): a shard is read
by one consumer at a time, the one whose name its lease key holds; a lease lives for
a node's ``claim_idle_ms`` and is renewed well before. A node that takes a free shard
takes over, in the same step, every entry still pending there for another consumer;
reads are fenced by the lease too (``read.lua``: no lease, no read), so a node
presumed dead reads nothing more from a shard it lost. One frame's messages
therefore reach a listener in order across nodes, as in one process.

**The commit** (:meth:`RedisStreams.commit`, ``commit.lua``) ends a delivery in one
atomic step, only if this consumer still owns the entry (the *fence*: the entry is
pending in the group for this consumer): it appends the history slots (idempotent by
message id, with the backend's trimming and TTL), adds every output to its stream,
acknowledges the entry and deletes it. A consumer presumed dead whose entry another
consumer took over therefore cannot commit late: its handler may have run (side
effects outside the organism are at-least-once), but the organism's history and
messages change once.

Acknowledged entries are deleted at once, so a stream holds only what is not done:
its length is the inbox's depth, and nothing unacknowledged is ever trimmed.

The history must live on the same Redis server (a :class:`RedisBackend` with the same
prefix): the commit writes it in the backend's key layout.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.base import Slot
from ..backends.redis.backend import RedisBackend
from ..backends.redis.pipeline import Pipeline
from ..backends.redis.scripts import COMMIT, LEASES, PUBLISH, READ, UNLEASE
from ..exceptions import BackendError

__all__ = ["Commit", "Entry", "Leases", "Read", "RedisStreams"]

_READ_BLOCK_MS = 1000  # XREAD's longest wait: well under the socket timeout
_TOKEN_TTL_MS = 120_000  # a publish sent again within this long adds nothing twice
_OPEN_TTL_MS = 86_400_000  # a conversation a request() waits for is followed this long


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


@dataclass(frozen=True, slots=True)
class Read:
    """What :meth:`RedisStreams.read` got.

    Attributes:
        entries: the entries read, now pending for the consumer (stream order).
        lost: the shards not read because the consumer's lease on them is gone.
        marks: when nothing was read, where to wait from (:meth:`RedisStreams.wait`):
            per stream read from ``b">"``, the group's last delivered id.
    """

    entries: list[Entry]
    lost: list[bytes]
    marks: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Leases:
    """What a round of :meth:`RedisStreams.leases` did.

    Attributes:
        owned: the shards the consumer holds a lease on now.
        taken: those it took in this round (a subset of ``owned``).
        claimed: entries it took over on them from other consumers.
    """

    owned: list[int]
    taken: list[int]
    claimed: int


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
        outage_s: as for the backend (default: the backend's): ingress waits through
            an outage this long.
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
        outage_s: float | None = None,
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
            "outage_s": backend.outage_s if outage_s is None else outage_s,
            "owner": "transport",
        }
        self._commands = Pipeline(url, **options)
        # Blocking reads hold their connection: they get one of their own.
        self._reads = Pipeline(url, lanes=1, **options)
        self.url = self._commands.url

    def __repr__(self) -> str:
        return f"RedisStreams({self.url!r}, group={self.group.decode()!r})"

    def inbox(self, listener: str, shard: int) -> bytes:
        """The stream key of shard ``shard`` of ``listener``'s inbox."""
        return b"%s:in:%s:%d" % (self._prefix, listener.encode(), shard)

    def lease(self, listener: str, shard: int) -> bytes:
        """The key of the lease on shard ``shard`` of ``listener``'s inbox."""
        return b"%s:lease:%s:%d" % (self._prefix, listener.encode(), shard)

    @property
    def layout_key(self) -> bytes:
        """The key recording how many shards each listener's inbox has."""
        return self._prefix + b":shards"

    async def layout(self, shards: Mapping[str, int]) -> dict[str, int]:
        """Record the number of shards of each listener's inbox unless recorded
        already; returns what is recorded (the first node's word holds: producers
        and readers must agree on it)."""
        key = self.layout_key
        names = list(shards)
        if not names:
            return {}
        for name in names:
            await self._commands.call(b"HSETNX", key, name.encode(), shards[name])
        stored = await self._commands.call(b"HMGET", key, *(n.encode() for n in names))
        return {name: int(value) for name, value in zip(names, stored, strict=True)}

    async def recorded_layout(self) -> dict[str, int]:
        """The number of shards recorded per listener (empty: no node ran yet)."""
        stored = await self._commands.call(b"HGETALL", self.layout_key)
        if isinstance(stored, dict):
            items = list(stored.items())
        else:
            items = list(zip(stored[0::2], stored[1::2], strict=True))
        return {bytes(k).decode(): int(v) for k, v in items}

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

    def _open_key(self, cause: str) -> bytes:
        return self._prefix + b":open:" + cause.encode()

    async def publish(
        self,
        token: str,
        entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]],
        *,
        follow: bool = False,
    ) -> bool:
        """Add ``entries`` (``(stream, fields)``) at once, all or none; once this
        returns, they are accepted. ``token`` names the call (unique for at least two
        minutes): sent again after its answer was lost, it adds nothing twice.

        Args:
            token: the input's cause (what the replies are matched by).
            entries: the deliveries to the target inboxes.
            follow: count what the input causes (see :meth:`commit`), so that the
                accepting node hears when the conversation ends without a reply.

        Returns:
            False if the entries were added already under this token.
        """
        keys = [self._prefix + b":token:" + token.encode(), self._open_key(token)]
        args: list[Any] = [_TOKEN_TTL_MS, _OPEN_TTL_MS if follow else 0]
        for stream, fields in entries:
            keys.append(stream)
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
        return bool(await self._commands.eval(PUBLISH, tuple(keys), *args))

    async def read(
        self,
        consumer: str,
        starts: Mapping[bytes, bytes],
        *,
        leases: Mapping[bytes, bytes] | None = None,
        count: int = 64,
    ) -> Read:
        """Entries for ``consumer`` (``XREADGROUP``), now pending for it; never blocks
        (see :meth:`wait`).

        Args:
            consumer: this node's name in the group.
            starts: the streams to read, each from ``b">"`` (new entries) or from an
                id, to page through the entries already pending for ``consumer`` after
                it (``b"0"``: all it held when it stopped, oldest first).
            leases: the lease key of each stream that is a shard: such a stream is
                read only while ``consumer`` holds its lease (the others are listed in
                :attr:`Read.lost`). Streams not named here are read always.
            count: at most this many entries per stream.
        """
        leases = leases or {}
        leased = [stream for stream in starts if stream in leases]
        free = [stream for stream in starts if stream not in leases]
        keys: list[bytes] = []
        for stream in leased:
            keys += (leases[stream], stream)
        keys += free
        args: list[Any] = [self.group, consumer.encode(), count, len(leased)]
        args += [starts[stream] for stream in (*leased, *free)]
        # Not idempotent: a read whose reply was lost delivered its entries anyway
        # (they are pending for this consumer: it reads them again from b"0").
        reply, lost, marks = await self._reads.eval(READ, tuple(keys), *args, idempotent=False)
        entries: list[Entry] = []
        for stream, items in reply or ():
            for entry_id, flat in items:
                if flat:  # an entry deleted while pending for us has no fields
                    entries.append(Entry(bytes(stream), bytes(entry_id), _fields(flat)))
        marked = {bytes(k): bytes(v) for k, v in zip(marks[0::2], marks[1::2], strict=True)}
        return Read(entries, [bytes(stream) for stream in lost], marked)

    async def wait(self, marks: Mapping[bytes, bytes], block_ms: int) -> None:
        """Wait until an entry is added to one of the streams after its mark (see
        :attr:`Read.marks`), at most ``block_ms`` (at most 1 s); takes nothing."""
        if not marks:
            await asyncio.sleep(max(block_ms, 0) / 1000)
            return
        block = min(max(block_ms, 1), _READ_BLOCK_MS)
        await self._reads.call(
            b"XREAD", b"COUNT", 1, b"BLOCK", block, b"STREAMS", *marks.keys(), *marks.values()
        )

    async def leases(
        self, consumer: str, listener: str, shards: int, want: int, lease_ms: int
    ) -> Leases:
        """One round of ``consumer``'s leases on ``listener``'s shards: renew those it
        holds (for ``lease_ms``), then take free ones until it holds ``want``, taking
        over in the same step what their former owner left pending (``leases.lua``).
        A consumer holding more than ``want`` gives some up with :meth:`unlease`."""
        keys = [self.lease(listener, k) for k in range(shards)]
        keys += [self.inbox(listener, k) for k in range(shards)]
        owned, taken, claimed = await self._commands.eval(
            LEASES, tuple(keys), self.group, consumer.encode(), lease_ms, want
        )
        return Leases([int(k) for k in owned], [int(k) for k in taken], int(claimed))

    async def unlease(self, consumer: str, listener: str, shards: Collection[int]) -> int:
        """Give up ``consumer``'s leases on ``shards`` of ``listener`` (those it still
        holds), so that another consumer takes them at once; returns how many."""
        if not shards:
            return 0
        keys = tuple(self.lease(listener, k) for k in sorted(shards))
        return int(await self._commands.eval(UNLEASE, keys, consumer.encode()))

    async def owners(self, listener: str, shards: int) -> list[str | None]:
        """Who holds the lease on each shard of ``listener`` (None: nobody)."""
        found = await self._commands.call(
            b"MGET", *(self.lease(listener, k) for k in range(shards))
        )
        return [None if value is None else bytes(value).decode() for value in found]

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
        *,
        cause: str | None = None,
        waiter: bytes = b"",
    ) -> Commit:
        """End the delivery of ``entry``, atomically, if ``consumer`` still owns it.

        Args:
            entry: the input, as read or claimed by ``consumer``.
            consumer: this node's name in the group.
            slots: ``(thread, slot)`` history appends (idempotent by message id).
            outputs: ``(stream, fields)`` entries to add; an entry whose ``k`` field
                is ``d`` is a delivery, ``r`` a reply.
            cause: the input's cause: if it is followed (:meth:`publish`), its count
                of messages in the organism moves by the deliveries made minus this
                one; at 0 without a reply, ``waiter`` (the accepting node's reply
                stream) gets an entry ``k=n`` saying so.
            waiter: see ``cause``.

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
        made = replied = 0
        for stream, fields in outputs:
            keys.append(stream)
            args.append(len(fields))
            for name, value in fields.items():
                args += (name, value)
            kind = fields.get(b"k")
            made += kind == b"d"
            replied |= kind == b"r"
        keys += (self._open_key(cause or ""), waiter or entry.stream)
        args += ((cause or "").encode(), made, replied)
        # Sent again when its reply is lost: a commit that ran answers GONE the
        # second time and changes nothing.
        return Commit(int(await self._commands.eval(COMMIT, tuple(keys), *args)))

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
        data = json.dumps(dict(info, ttl_ms=ttl_ms), separators=(",", ":")).encode()
        await self._commands.call(b"SET", self._node_key(node), data, b"PX", ttl_ms)
        await self._commands.call(b"SADD", self._prefix + b":nodes", node.encode())

    async def last_heartbeat(self, node: str) -> tuple[dict[str, Any], int] | None:
        """What ``node`` last said of itself and how long ago (ms, by Redis's clock),
        or None if its heartbeat expired or it stopped."""
        key = self._node_key(node)
        value, left = await asyncio.gather(
            self._commands.call(b"GET", key), self._commands.call(b"PTTL", key)
        )  # one round trip
        if value is None or int(left) < 0:
            return None
        try:
            info = json.loads(value)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            return {}, 0
        return info, max(0, int(info.get("ttl_ms", 0)) - int(left))

    async def forget(self, node: str) -> None:
        """Say that ``node`` stopped."""
        await self._commands.call(b"DEL", self._node_key(node), idempotent=False)
        await self._commands.call(b"SREM", self._prefix + b":nodes", node.encode())

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The nodes alive (whose last heartbeat has not expired), with their info."""
        names = sorted(bytes(name) for name in await self._commands.call(
            b"SMEMBERS", self._prefix + b":nodes"
        ))  # fmt: skip
        if not names:
            return {}
        values = await self._commands.call(b"MGET", *(self._node_key(n.decode()) for n in names))
        alive: dict[str, dict[str, Any]] = {}
        gone = []
        for name, value in zip(names, values, strict=True):
            if value is None:
                gone.append(name)
                continue
            try:
                alive[name.decode()] = json.loads(value)
            except ValueError:
                alive[name.decode()] = {}
        if gone:  # heartbeats expired: the nodes are not coming back under that name
            await self._commands.call(b"SREM", self._prefix + b":nodes", *gone)
        return alive

    async def inbox_status(self, listener: str, shards: int) -> dict[str, Any]:
        """What ``listener``'s inbox holds, over its shards: ``length`` (entries not
        done), ``pending`` (delivered, not committed), ``lag`` (not delivered yet),
        ``oldest_ms`` (age of the oldest pending entry, None if none),
        ``pending_by_node`` and ``shards_by_node`` (the leases: who reads which shards)."""
        status: dict[str, Any] = {
            "length": 0, "pending": 0, "lag": 0, "oldest_ms": None,
            "pending_by_node": {}, "shards_by_node": {},
        }  # fmt: skip
        oldest: int | None = None
        for shard in range(shards):
            stream = self.inbox(listener, shard)
            length = await self.length(stream)
            status["length"] += length
            try:
                summary = await self._commands.call(b"XPENDING", stream, self.group)
            except BackendError as exc:
                if "NOGROUP" in str(exc):
                    status["lag"] += length
                    continue
                raise
            count = int(summary[0])
            status["pending"] += count
            status["lag"] += max(0, length - count)
            if count and summary[1] is not None:
                created = int(bytes(summary[1]).split(b"-")[0])
                oldest = created if oldest is None else min(oldest, created)
            by_node = status["pending_by_node"]
            for name, n in summary[3] or ():
                key = bytes(name).decode()
                by_node[key] = by_node.get(key, 0) + int(n)
        if oldest is not None:
            now_s, now_us = await self._commands.call(b"TIME")
            status["oldest_ms"] = max(0, int(now_s) * 1000 + int(now_us) // 1000 - oldest)
        for shard, owner in enumerate(await self.owners(listener, shards)):
            if owner is not None:
                status["shards_by_node"].setdefault(owner, []).append(shard)
        status["pending_by_node"] = dict(sorted(status["pending_by_node"].items()))
        return status

    async def depth(self, listener: str, shards: int) -> int:
        """How many entries ``listener``'s inbox holds over its shards (one round trip)."""
        lengths = await asyncio.gather(
            *(self.length(self.inbox(listener, shard)) for shard in range(shards))
        )
        return sum(lengths)

    async def pending(self, stream: bytes) -> int:
        """How many entries of ``stream`` are delivered and not yet committed."""
        try:
            reply = await self._commands.call(b"XPENDING", stream, self.group)
        except BackendError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(reply[0])

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
