"""A pump as one node of an organism on the Redis Streams transport (private to the
engine, :mod:`xml_pipeline.pump`).

:class:`Node` is the part of a :class:`~xml_pipeline.pump.StreamPump` that talks to
the streams: it reads the shards this node holds a lease on, hands their entries to
the pump's listener workers, commits each delivery, keeps its leases and shares the
shards with the other nodes, and says it is alive. The pump calls it where the
in-process path would use its queues.

What a delivery from a stream does is gathered in an :class:`Outbox` while it runs
(the history slots it records, the deliveries and replies it produces) and then
committed in one step with the input's acknowledgement
(:meth:`~xml_pipeline.transport.redis.RedisStreams.commit`). The outbox is found
through a context variable, set only around such a delivery: the in-process path
never sees one.

Stream entries carry a message and where it goes, as flat fields:

    k   "d" (a delivery to a listener's inbox) or "r" (a reply for the accepting node)
    n   the node that accepted the conversation's input (its replies go there)
    i s t q x   the message's id, sender, <to>, payload qualified name, payload XML
    re c h p    its <re>, cause (what a request() waits for), "1" if it follows a Huh,
                the payload class's import path
    l f fc      delivery: the target listener, its frame and the frame's chain,
    rf rfc rt   the frame it answers on and its chain, the listener it answers to
    th o        reply: the conversation (root frame), the external sender's label
    tp          the W3C traceparent of the message's parent span (when a node traces)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel

from ._delivery import Delivery, Message, huh_for
from ._tracing import TRACEPARENT_CHARS, traceparent_of
from ._version import __version__
from .backends.base import Slot
from .exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    EgressFailed,
    HandlerFailed,
    InvalidReturn,
    MessageError,
    NoReply,
    PumpClosed,
    XmlPipelineError,
)
from .reply import Reply
from .transport import shard_of

if TYPE_CHECKING:
    from .pump import StreamPump
    from .transport.redis import Commit, Entry, RedisStreams

__all__ = ["OUTBOX", "Node", "Outbox", "delivery_fields", "model_path", "reply_fields"]

logger = logging.getLogger("xml_pipeline.pump")

_HEARTBEAT_S = 2.0  # a node says it is alive this often ...
_HEARTBEAT_TTL_MS = 6000  # ... and is listed (and counted as a peer) this long after
_LEASE_ROUND_S = 1.0  # leases are renewed and shared at least this often ...
_LEASE_SHORT_S = 0.1  # ... and this often while shards change hands
_WAIT_MS = 500  # an idle reader looks at its leases again this often
_COMMIT_TRIES = 5  # a commit Redis refuses is tried this often, 1 s to 8 s apart
_STEP_TIMEOUT_S = 10.0


class Outbox:
    """What a delivery from a stream has produced, committed when it ends."""

    __slots__ = ("node", "outputs", "slots")

    def __init__(self, node: str) -> None:
        self.node = node  # the node that accepted the conversation
        self.slots: list[tuple[str, Slot]] = []
        self.outputs: list[tuple[bytes, dict[bytes, bytes]]] = []  # (stream, fields)


OUTBOX: ContextVar[Outbox | None] = ContextVar("xml_pipeline_outbox", default=None)


def model_path(model: BaseModel) -> str:
    """The import path of a payload model's class (``module:qualname``)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _message_fields(msg: Message, node: str) -> dict[bytes, bytes]:
    fields = {
        b"n": node.encode(),
        b"i": msg.id.encode(),
        b"s": msg.sender.encode(),
        b"q": msg.qname.encode(),
        b"x": msg.xml(),
    }
    if msg.to is not None:
        fields[b"t"] = msg.to.encode()
    if msg.re is not None:
        fields[b"re"] = msg.re.encode()
    if msg.cause is not None:
        fields[b"c"] = msg.cause.encode()
    if msg.after_huh:
        fields[b"h"] = b"1"
    if msg.trace is not None:  # set only when a pump traces
        traceparent = traceparent_of(msg.trace)
        if traceparent is not None:
            fields[b"tp"] = traceparent.encode()
    path = (
        msg.path
        if msg.path is not None
        else (model_path(msg.model) if msg.model is not None else None)
    )
    if path is not None:
        fields[b"p"] = path.encode()
    return fields


def delivery_fields(d: Delivery, node: str) -> dict[bytes, bytes]:
    """The stream entry of a delivery to a listener's inbox."""
    fields = _message_fields(d.message, node)
    fields[b"k"] = b"d"
    fields[b"l"] = d.runtime.name.encode()
    fields[b"f"] = d.frame.uuid.encode()
    fields[b"fc"] = d.frame.chain.encode()
    fields[b"rf"] = d.reply_frame.uuid.encode()
    fields[b"rfc"] = d.reply_frame.chain.encode()
    if d.reply_to is not None:
        fields[b"rt"] = d.reply_to.name.encode()
    return fields


def reply_fields(reply: Reply, msg: Message, node: str) -> dict[bytes, bytes]:
    """The stream entry of a reply for the node that accepted the conversation."""
    fields = _message_fields(msg, node)
    fields[b"k"] = b"r"
    fields[b"s"] = reply.sender.encode()
    fields[b"i"] = reply.message_id.encode()
    if reply.thread_id is not None:
        fields[b"th"] = reply.thread_id.encode()
    if reply.to is not None:
        fields[b"o"] = reply.to.encode()
    if reply.re is not None:
        fields[b"re"] = reply.re.encode()
    if b"p" not in fields:
        fields[b"p"] = model_path(reply.payload).encode()
    return fields


class Node:
    """The streams side of a pump that is a node (see the module's docstring).

    Args:
        pump: the pump it feeds (its listener workers, routing, dead letters, egress).
        streams: the transport.
        name: this node's name in the consumer group.
        serves: the listeners this node runs.
        claim_idle_ms: how long a lease on a shard lives without renewal: past it,
            another node takes the shard and what this node held there.
        max_deliveries: an entry delivered more often than this is dead-lettered.
    """

    def __init__(
        self,
        pump: StreamPump,
        streams: RedisStreams,
        name: str,
        serves: frozenset[str],
        *,
        claim_idle_ms: int,
        max_deliveries: int,
    ) -> None:
        self.pump = pump
        self.streams = streams
        self.name = name
        self.serves = serves
        self.claim_idle_ms = claim_idle_ms
        self._started = time.time()
        self.max_deliveries = max_deliveries
        self.shards = {listener.name: listener.shards for listener in pump.organism.listeners}
        self.replies = streams.replies(name)
        # What the reader reads and from where (b">" or an id: paging through what this
        # node holds), the lease key of each shard among them, and the shards this node
        # holds a lease on (read, or being given up once what it holds of them is done).
        self.starts: dict[bytes, bytes] = {self.replies: b"0"}
        self.leases: dict[bytes, bytes] = {}
        self.owned: dict[str, set[int]] = {name: set() for name in sorted(serves)}
        self.leaving: set[bytes] = set()
        # The streams of the read under way, until what it read is taken (a shard is
        # not given up meanwhile), and those to read again from the start.
        self.reading: frozenset[bytes] = frozenset()
        self.reread: set[bytes] = set()
        # The entries this node holds (read, not committed), by stream.
        self.held: dict[bytes, dict[bytes, None]] = {}
        self.room = asyncio.Event()  # set when this node commits what it held
        self.beat_now = asyncio.Event()  # a heartbeat without waiting for its time
        self.draining = False
        self.drop_replies = False  # an anonymous Client's: nobody reads them later
        self.taken_over = 0  # entries this node took over from nodes that stopped

    def __repr__(self) -> str:
        return f"<Node {self.name} of {self.pump.organism.name} on {self.streams.url}>"

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Check the shard layout against what other nodes use, and make the consumer
        group of every inbox shard and of this node's reply stream."""
        streams = self.streams
        recorded = await streams.layout(self.shards)
        differ = {n: v for n, v in recorded.items() if v != self.shards[n]}
        if differ:
            name, count = next(iter(differ.items()))
            raise ConfigError(
                f"listener {name!r}: this organism splits its inbox into "
                f"{self.shards[name]} shard(s), and the nodes that ran before used {count}; "
                "every node must use the same 'shards'. To change it, stop every node and "
                "client, wait until 'status' shows empty inboxes, and delete the Redis key "
                f"{streams.layout_key.decode()!r}"
            )
        await self._alone_under_name()
        # The name is claimed now, before the pump says it runs: a second process
        # started under it from then on sees this node (the heartbeat task beats on).
        await streams.heartbeat(self.name, self._beat_info(), _HEARTBEAT_TTL_MS)
        keys = [streams.inbox(n, k) for n, count in self.shards.items() for k in range(count)]
        await asyncio.gather(*(streams.ensure_group(key) for key in [*keys, self.replies]))

    async def _alone_under_name(self) -> None:
        """Refuse to start while another process runs under this node's name (two
        consumers of one name would each commit what the other holds). A heartbeat
        left by a process that died (``kill -9``) runs out within a few seconds: this
        waits until it is clearly stale (no beat for 2.5 beat periods), or until a new
        beat shows that its process is alive."""
        last = await self.streams.last_heartbeat(self.name)
        if last is None:
            return
        # 2.5 beat periods: a live node on a loaded machine may beat a second late; a
        # second consumer under its name would be worse than a restart waiting 5 s.
        stale_ms = int(_HEARTBEAT_S * 2500)
        waited = False
        while last is not None and last[1] < stale_ms:
            if not waited:
                logger.info(
                    "node %s: a heartbeat under this name is %d ms old; waiting to see "
                    "whether its process is alive", self.name, last[1],
                )  # fmt: skip
                waited = True
            await asyncio.sleep(min(0.25, (stale_ms - last[1]) / 1000))
            now = await self.streams.last_heartbeat(self.name)
            if now is not None and now[1] < last[1]:  # it beat again: alive
                info = now[0]
                raise ConfigError(
                    f"another process runs as node {self.name!r} (pid {info.get('pid', '?')} "
                    f"on {info.get('host', '?')}): give each node a name of its own"
                )
            last = now

    def tasks(self) -> list[tuple[Callable[[], Coroutine[Any, Any, None]], str]]:
        """The tasks a node runs for as long as its pump does."""
        return [
            (self._read, f"streams of node {self.name}"),
            (self._keep_leases, f"leases of node {self.name}"),
            (self._heartbeat, f"heartbeat of node {self.name}"),
        ]

    def stop_reading(self) -> None:
        """Read nothing more (the pump stops, or drains)."""
        self.room.set()

    def drain(self) -> None:
        """Finish what this node holds, read nothing more, and give up its shards once
        what it held of them is done (the other nodes take them at once: this node
        says at once that it is draining, so they count it out)."""
        self.draining = True
        self.room.set()
        self.beat_now.set()

    async def close(self) -> None:
        """Give up the leases (what this node still holds stays pending: the next
        owner of each shard takes it over), say the node stopped, close the streams.
        Bounded; errors are logged."""
        streams = self.streams
        with anyio.move_on_after(_STEP_TIMEOUT_S):
            try:
                for listener, shards in self.owned.items():
                    await streams.unlease(self.name, listener, shards)
                await streams.forget(self.name)
                if self.drop_replies:
                    await streams.delete(self.replies)
            except XmlPipelineError as exc:
                logger.warning("node %s: could not say it stopped: %s", self.name, exc)
        await streams.aclose()

    # -- what a delivery sends -------------------------------------------------

    def inbox_of(self, d: Delivery) -> bytes:
        """The stream a delivery goes to: the shard of its frame in its listener's inbox."""
        name = d.runtime.name
        return self.streams.inbox(name, shard_of(d.frame.uuid, self.shards[name]))

    def output(self, d: Delivery, box: Outbox) -> None:
        """A delivery made during a delivery from a stream: added by its commit."""
        box.outputs.append((self.inbox_of(d), delivery_fields(d, box.node)))

    def reply(self, reply: Reply, msg: Message, box: Outbox) -> None:
        """A reply made during a delivery from a stream: to the node that accepted the
        conversation, by the commit."""
        box.outputs.append((self.streams.replies(box.node), reply_fields(reply, msg, box.node)))

    async def accept(
        self, msg: Message, deliveries: Iterable[Delivery], *, follow: bool = False
    ) -> None:
        """Add input to the inboxes of its targets, at once and once (a call sent again
        after its answer was lost adds nothing twice); accepted once this returns. A
        full inbox makes input wait, across nodes as in one process (messages made
        inside the organism do not wait: no deadlock). ``follow``: a request() waits,
        and hears when everything the input caused ended without a reply."""
        limit = self.pump.organism.settings.queue_size
        entries = []
        for d in deliveries:
            await self._wait_for_room(d.runtime.name, limit)
            entries.append((self.inbox_of(d), delivery_fields(d, self.name)))
        await self.streams.publish(msg.cause or msg.id, entries, follow=follow)

    async def _wait_for_room(self, listener: str, limit: int) -> None:
        """Wait while ``listener``'s inbox holds ``limit`` entries or more (polling its
        depth, 5 ms to 200 ms apart); PumpClosed once the pump stops."""
        delay = 0.005
        while await self.streams.depth(listener, self.shards[listener]) >= limit:
            if not self.pump._running:
                raise PumpClosed("the pump stopped before accepting this message")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def history_with(self, box: Outbox, thread_id: str) -> list[Slot]:
        """A frame's history as a handler sees it during a delivery from a stream: what
        Redis holds, then what this delivery has recorded and will commit (its ``in``
        slot first), as it would read in one process."""
        slots = await self.pump.backend.buffer_get_thread(thread_id)
        seen = {(s.direction, s.message_id) for s in slots}
        index = slots[-1].index + 1 if slots else 0
        for thread, slot in box.slots:
            if thread == thread_id and (slot.direction, slot.message_id) not in seen:
                slots.append(slot._replace(index=index))
                index += 1
        return slots

    # -- the end of a delivery -------------------------------------------------

    async def commit(self, d: Delivery, box: Outbox) -> None:
        """End a delivery from a stream: its slots, outputs and acknowledgement at once.

        A commit Redis refuses (out of memory, a read-only replica, ...) changed
        nothing; it is tried again in place (the worker waits: the frame's next
        messages stay behind it), a few times; then the entry is left pending, and
        read again (counting towards ``max_deliveries``)."""
        entry = d.entry
        delay = 1.0
        try:
            for attempt in range(1, _COMMIT_TRIES + 1):
                try:
                    outcome = await self.until_reachable("commit", self._commit, d, box)
                    break
                except BackendError as exc:
                    logger.error(
                        "%s: the delivery of message %s could not be committed (attempt "
                        "%d of %d): %s", d.runtime.name, d.message.id, attempt,
                        _COMMIT_TRIES, exc,
                    )  # fmt: skip
                    if attempt == _COMMIT_TRIES or not self.pump._running:
                        # Read again from the start, and before the frame's entries
                        # parked behind it (else they would commit first).
                        self.pump._give_back(d)
                        self.reread.add(entry.stream)
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 8.0)
        finally:
            held = self.held.get(entry.stream)
            if held is not None:
                held.pop(entry.id, None)
            self.room.set()
        if outcome != 1:
            logger.info(
                "%s: the delivery of message %s was not committed (%s): another node "
                "has taken its shard over", d.runtime.name, d.message.id, outcome.name.lower(),
            )  # fmt: skip

    async def _commit(self, d: Delivery, box: Outbox) -> Commit:
        waiter = self.streams.replies(box.node)
        return await self.streams.commit(
            d.entry, self.name, box.slots, box.outputs, cause=d.message.cause, waiter=waiter
        )

    async def until_reachable(self, what: str, call: Any, *args: Any) -> Any:
        """``await call(*args)``, again and again while Redis cannot be reached (backing
        off up to 2 s), as long as the pump runs: an outage of the transport pauses the
        node instead of ending it. The outage and the recovery are logged once."""
        delay = 0.1
        down = False
        while True:
            try:
                result = await call(*args)
            except BackendUnavailable as exc:
                if not self.pump._running:
                    raise
                if not down:
                    logger.warning("node %s: %s: %s; retrying", self.name, what, exc)
                    down = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if down:
                logger.warning("node %s: %s: the transport answers again", self.name, what)
            return result

    # -- reading ---------------------------------------------------------------

    def held_total(self) -> int:
        return sum(len(held) for held in self.held.values())

    def let_go(self, entry: Entry) -> None:
        """Stop holding ``entry`` without committing it: it stays pending for this
        node, and a read of its stream from the start delivers it again."""
        held = self.held.get(entry.stream)
        if held is not None:
            held.pop(entry.id, None)
        self.room.set()

    def _holds(self, entry: Entry) -> bool:
        return entry.id in self.held.get(entry.stream, ())

    def _done(self, entry: Entry) -> bool:
        return not self._holds(entry)

    def _running(self) -> bool:
        return self.pump._state in ("starting", "running")

    async def _read(self) -> None:
        """Feed this node's workers from the shards it holds a lease on, and egress
        from its reply stream: one read for all of them (fenced by the leases), then,
        when there was nothing, one wait. First what this node held when it stopped
        or what it took over (its pending entries), then new entries, while the pump
        has room."""
        pump = self.pump
        streams = self.streams
        down, delay = False, 0.1
        # A node reads only what it will start soon, so that a node that joins (or
        # another one) gets a share of a backlog instead of finding it all taken.
        prefetch = min(pump.organism.settings.queue_size, max(64, 2 * sum(
            pump._runtimes[name].listener.concurrency for name in self.serves
        )))  # fmt: skip
        while True:
            # What the last read got is taken (held) or dropped by now.
            self.reading = frozenset()
            self._from_start(self.reread)  # a commit Redis refused: its entry again
            self.reread.clear()
            # Only what this node holds counts (input waiting for room in a stream does
            # not: it waits for this very reader). Draining or stopping: read no more.
            while self.held_total() >= prefetch or self.draining:
                if not self._running():
                    return
                self.room.clear()
                await self.room.wait()
            if not self._running():
                return
            room = max(1, prefetch - self.held_total())
            starts = dict(self.starts)
            # What this node held when it stopped, or took over from a node that
            # stopped, is read again one entry at a time: reading an entry again adds
            # one to its delivery count, and an entry on its last allowed delivery
            # runs alone, so that a message that kills its node does not take the
            # others down with it (see below).
            paging = {
                s: start for s, start in starts.items() if start != b">" and s != self.replies
            }
            if paging:
                starts = dict([next(iter(paging.items()))])
                room = 1
            leases = {stream: self.leases[stream] for stream in starts if stream in self.leases}
            self.reading = frozenset(starts)
            read = None
            try:
                read = await streams.read(self.name, starts, leases=leases, count=min(room, 64))
                if not read.entries and read.marks:
                    await streams.wait(read.marks, _WAIT_MS)
            except BackendUnavailable as exc:
                if not pump._running:
                    raise
                if not down:
                    logger.warning("node %s: reading: %s; retrying", self.name, exc)
                    down = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                if read is None:
                    # A read whose answer was lost may have delivered entries to this
                    # node: they are pending for it, so read those streams again from
                    # the start (a failed wait took nothing).
                    self._from_start(starts)
                continue
            except BackendError as exc:
                # Redis answered with an error: a stream or its group deleted under
                # the node (made again), or something this node cannot fix (logged).
                logger.error("node %s: reading its streams: %s", self.name, exc)
                if "NOGROUP" in str(exc):
                    for stream in starts:
                        await self.until_reachable("creating a group", streams.ensure_group, stream)
                await asyncio.sleep(1.0)
                continue
            if down:
                logger.warning("node %s: reading: the transport answers again", self.name)
                down, delay = False, 0.1
            for stream in read.lost:
                self._lose(stream)
            again = False
            for stream, start in starts.items():
                if start != b">" and stream in self.starts:  # paging through what it held
                    held = [e.id for e in read.entries if e.stream == stream]
                    self.starts[stream] = held[-1] if held else b">"
                    again = again or bool(held)
            try:
                for entry in read.entries:
                    if entry.stream == self.replies:
                        await self._reply_from(entry)
                inbound = [
                    e for e in read.entries if e.stream != self.replies and not self._holds(e)
                ]
                if not again:
                    for entry in inbound:
                        await self._take(entry)
                    continue
                # Delivered before: one that keeps killing its node ends here; one on
                # its last allowed delivery runs alone on this node, so that it cannot
                # be killed along with another one.
                for entry, count in await self._within_limit(inbound):
                    if count >= 2 and count >= self.max_deliveries:
                        await self._until(lambda: not self.held_total())
                        await self._take(entry)
                        await self._until(functools.partial(self._done, entry))
                    else:
                        await self._take(entry)
            except BackendError as exc:
                # Redis refused a step (out of memory, read-only, ...): what was not
                # taken stays pending and is read again; the node goes on.
                logger.error("node %s: handling what it read: %s", self.name, exc)
                await asyncio.sleep(1.0)
                self._from_start(starts)

    def _from_start(self, streams: Iterable[bytes]) -> None:
        """Read these streams (those still read) from the start again: what this node
        holds there, then new entries."""
        for stream in streams:
            if stream in self.starts:
                self.starts[stream] = b"0"

    async def _ack(self, entry: Entry, what: str = "acknowledging", **follow: Any) -> None:
        """Acknowledge (and delete) an entry without committing anything else."""
        commit = functools.partial(self.streams.commit, **follow) if follow else self.streams.commit
        await self.until_reachable(what, commit, entry, self.name)

    async def _until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (checked whenever this node commits), or
        the pump stops."""
        while not condition() and self._running():
            self.room.clear()
            await self.room.wait()

    async def _take(self, entry: Entry) -> None:
        """Hand an inbox entry this node now holds to its listener's workers."""
        held = self.held.setdefault(entry.stream, {})
        if entry.id in held:  # read again after an outage: already here
            return
        d = await self._from_entry(entry)
        if d is not None:
            held[entry.id] = None
            self.pump._enqueue(d)

    async def _within_limit(self, entries: list[Entry]) -> list[tuple[Entry, int]]:
        """The entries delivered at most ``max_deliveries`` times, with their delivery
        counts; the others are dead-lettered and acknowledged."""
        kept = []
        by_stream: dict[bytes, list[Entry]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry)
        for stream, group in by_stream.items():
            counts = await self.until_reachable(
                "counting deliveries", self.streams.deliveries, stream, [e.id for e in group]
            )
            for entry in group:
                count = counts.get(entry.id, 0)
                if count <= self.max_deliveries:
                    kept.append((entry, count))
                    continue
                reason = (
                    f"delivered {count} times without completing (max_deliveries "
                    f"{self.max_deliveries}): its handler or its node keeps failing"
                )
                logger.error("dead-lettering stream entry %s: %s", entry.id.decode(), reason)
                d = await self._from_entry(entry)  # None: dead-lettered and acknowledged
                if d is None:
                    continue
                # Its sender is told, as in one process: a Huh, committed with the ack.
                box = Outbox(d.node or self.name)
                token = OUTBOX.set(box)
                try:
                    await self.pump._fail(d, HandlerFailed(reason, listener=d.runtime.name))
                finally:
                    OUTBOX.reset(token)
                await self.commit(d, box)
        return kept

    async def _reply_from(self, entry: Entry) -> None:
        """Hand a reply to a conversation this node accepted to egress, then ack it;
        or tell a request() that its conversation ended without a reply."""
        pump = self.pump
        f = entry.fields
        if f.get(b"k") == b"n":
            cause = f.get(b"c", b"").decode(errors="replace")
            waiter = pump._waiters.pop(cause, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(
                    NoReply("everything the message caused ended without a reply to its caller")
                )
            await self._ack(entry)
            return
        try:
            msg = _message_of(f)
        except (KeyError, UnicodeDecodeError) as exc:
            logger.error("dropping reply entry %s: %s", entry.id, exc)
            await pump._dead_letter(
                EgressFailed(f"a reply entry that cannot be read: {exc!r}"), f.get(b"x"), None
            )
            await self._ack(entry)
            return
        try:
            model = pump._decode_made_in_worker(msg)
        except (MessageError, ConfigError) as exc:
            logger.error("a reply from %s cannot be decoded: %s", msg.sender, exc)
            model = huh_for(InvalidReturn(str(exc)), msg.xml())
        thread = f.get(b"th")
        origin = f.get(b"o")
        reply = Reply(
            None if thread is None else thread.decode(), msg.sender,
            None if origin is None else origin.decode(), msg.id, model, msg.re,
        )  # fmt: skip
        await pump._emit(reply, msg, recorded=True)
        await self._ack(entry, "acknowledging a reply")

    async def _from_entry(self, entry: Entry) -> Delivery | None:
        """The delivery a stream entry carries (None: dead-lettered and acknowledged)."""
        pump = self.pump
        f = entry.fields
        try:
            msg = _message_of(f)
            rt = pump._runtimes[f[b"l"].decode()]
            # The entry carries its frames' chains: no registry lookup.
            frames = pump._frames
            frame = frames.known(f[b"f"].decode(), f[b"fc"].decode())
            reply_frame = frames.known(f[b"rf"].decode(), f[b"rfc"].decode())
            reply_to = pump._runtimes.get(f[b"rt"].decode()) if b"rt" in f else None
            if frame is None or reply_frame is None:
                raise KeyError("its frames cannot be read")
        except (KeyError, UnicodeDecodeError) as exc:
            logger.error("dropping stream entry %s: %s", entry.id, exc)
            await pump._dead_letter(
                HandlerFailed(f"a stream entry that cannot be delivered: {exc}"), f.get(b"x"), None
            )
            # Acknowledged as a message that ended without a reply (a request() that
            # waits for it hears so, see RedisStreams.commit).
            cause = f.get(b"c", b"").decode(errors="replace")
            node = (f.get(b"n") or self.name.encode()).decode(errors="replace")
            await self._ack(entry, cause=cause, waiter=self.streams.replies(node))
            return None
        d = Delivery(msg, rt, frame, reply_frame, reply_to)
        d.entry = entry
        d.node = (f.get(b"n") or self.name.encode()).decode()
        return d

    # -- leases and heartbeats -------------------------------------------------

    def _lose(self, stream: bytes) -> None:
        """Stop reading a shard whose lease another node took (this one seemed to have
        stopped): what this node still holds of it will not commit (the fence)."""
        if stream not in self.leases:
            return
        del self.leases[stream]
        self.starts.pop(stream, None)
        self.leaving.discard(stream)
        for listener, owned in self.owned.items():
            for shard in list(owned):
                if self.streams.inbox(listener, shard) == stream:
                    owned.discard(shard)
        logger.warning(
            "node %s lost its lease on %s: another node took it over (this one had "
            "not renewed it for %d ms)", self.name, stream.decode(), self.claim_idle_ms,
        )  # fmt: skip

    async def _keep_leases(self) -> None:
        """Renew this node's leases and share the shards with the other nodes serving
        the same listeners, every ``claim_idle_ms / 3`` (at most every second)."""
        if not self.serves:
            return
        period = min(self.claim_idle_ms / 3000, _LEASE_ROUND_S)
        failing = False
        while True:
            settled = False
            try:
                settled = await self._lease_round()
            except BackendError as exc:  # tried again at the next round
                if not failing:
                    logger.warning("node %s: renewing its leases failed: %s", self.name, exc)
                failing = True
            else:
                failing = False
            # Shards changing hands (this node short of its share, or giving some up):
            # look again soon, so that a node that joins gets to work quickly.
            await asyncio.sleep(period if settled else min(period, _LEASE_SHORT_S))

    async def _lease_round(self) -> bool:
        """Renew, take and give up leases; True if this node holds its share."""
        streams = self.streams
        settled = True
        nodes = await streams.nodes()
        for listener, owned in self.owned.items():
            count = self.shards[listener]
            peers = sorted(
                {
                    n
                    for n, info in nodes.items()
                    if listener in info.get("listeners", ()) and not info.get("draining")
                }
                | {self.name}
            )
            rank = peers.index(self.name)
            want = count // len(peers) + (1 if rank < count % len(peers) else 0)
            if self.draining or not self.pump._running:
                want = 0
            got = await streams.leases(self.name, listener, count, want, self.claim_idle_ms)
            now = set(got.owned)
            for shard in owned - now:
                self._lose(streams.inbox(listener, shard))
            added = sorted(now - owned)  # taken (or held before a restart)
            for shard in added:
                stream = streams.inbox(listener, shard)
                self.leases[stream] = streams.lease(listener, shard)
                self.starts[stream] = b"0"  # what it took over first, in order
                owned.add(shard)
            if got.claimed:
                self.taken_over += got.claimed
                logger.warning(
                    "node %s took over %d entr%s of %s left pending by the shards' "
                    "former owner", self.name, got.claimed,
                    "y" if got.claimed == 1 else "ies", listener,
                )  # fmt: skip
            if added:
                self.room.set()
            # More than its share (a node joined): stop reading the last ones, and give
            # each up once what this node holds of it is done (the new owner then
            # reads it from where this one stopped: the frame order holds).
            extra = len(owned) - want
            for shard in sorted(owned, reverse=True):
                if extra <= 0:
                    break
                stream = streams.inbox(listener, shard)
                if stream not in self.leaving:
                    self.leaving.add(stream)
                    self.starts.pop(stream, None)
                extra -= 1
            done = [
                shard
                for shard in owned
                if (stream := streams.inbox(listener, shard)) in self.leaving
                and not self.held.get(stream)
                and stream not in self.reading
            ]
            if done:
                await streams.unlease(self.name, listener, done)
                for shard in done:
                    stream = streams.inbox(listener, shard)
                    owned.discard(shard)
                    self.leaving.discard(stream)
                    self.leases.pop(stream, None)
            if len(owned) != want:
                settled = False
        return settled

    def _beat_info(self) -> dict[str, Any]:
        """What a heartbeat says about this node."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "listeners": sorted(self.serves),
            "held": self.held_total(),
            "shards": {name: sorted(owned) for name, owned in self.owned.items()},
            "taken_over": self.taken_over,
            "draining": self.draining,
            "started": self._started,
            "version": __version__,
        }

    async def _heartbeat(self) -> None:
        """Say that this node is alive (``status`` lists it, the other nodes count it
        when they share the shards) every 2 s, for 6 s."""
        while True:
            try:
                await self.streams.heartbeat(self.name, self._beat_info(), _HEARTBEAT_TTL_MS)
            except BackendError as exc:
                logger.warning("node %s: heartbeat failed: %s", self.name, exc)
            with anyio.move_on_after(_HEARTBEAT_S):
                await self.beat_now.wait()
            self.beat_now.clear()


def _message_of(f: dict[bytes, bytes]) -> Message:
    """The message a stream entry carries."""

    def text(key: bytes) -> str | None:
        value = f.get(key)
        return None if value is None else value.decode()

    msg = Message(
        f[b"i"].decode(), f[b"s"].decode(), text(b"t"), f[b"q"].decode(), xml=f[b"x"],
        path=text(b"p"), re=text(b"re"), cause=text(b"c"),
    )  # fmt: skip
    msg.after_huh = f.get(b"h") == b"1"
    trace = f.get(b"tp")
    if trace is not None and len(trace) == TRACEPARENT_CHARS:
        # (checked, and ignored if invalid, by a node that traces)
        msg.trace = trace.decode(errors="replace")
    return msg
