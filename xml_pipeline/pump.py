"""The stream pump: ingress → parse → thread → route → listener inbox → handler → route again.

::

    async with StreamPump(load_organism("hello.yaml"), egress=print_reply) as pump:
        await pump.inject(b"<message ...>...</message>")
        await pump.wait_idle()

Each listener runs ``concurrency`` worker tasks fed by one inbox: a free worker
takes the next delivery, whatever its frame, so a slow message holds up nothing
but its own frame. The messages of one frame reach an ordered listener (the
default) one at a time and in order: a delivery whose frame another worker is
handling waits for that worker, which runs it next. An unordered listener runs
them at once, up to its ``concurrency`` (a fan-out in parallel). Ingress is
admitted only while fewer than ``queue_size`` messages are inside the pump, so a
slow listener slows ingress down instead of growing memory. Messages produced
inside the pump are routed as objects: they are not re-serialized and re-parsed
unless a target decodes the payload with another class.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import difflib
import functools
import itertools
import json
import logging
import os
import random
import re as _regex
import socket
import time
import uuid as _uuid
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from pydantic import BaseModel

from ._blocking import BlockWatch, Steps
from ._delivery import (
    CURRENT_DELIVERY,
    LATENCY_BUCKETS,
    LATENCY_SAMPLES,
    Delivery,
    Message,
    Route,
    Runtime,
    huh_for,
    log_fields,
    xml_safe,
)
from ._node import OUTBOX, Node, Outbox
from ._stats import percentile
from ._tracing import Tracing, tracing_for
from .backends import (
    Backend,
    DeadLetter,
    Slot,
    backend_scheme,
    client_url,
    open_backend,
)
from .backends.base import letter_size
from .backends.memory import MemoryBackend
from .config import Organism, import_object
from .envelope import (
    ENVELOPE_NAMESPACE,
    _read_envelope,
    envelope_from_element,
)
from .exceptions import (
    Abandoned,
    BackendCorrupted,
    BackendError,
    BackendFailed,
    BackendUnavailable,
    ConfigError,
    DepthExceeded,
    Duplicate,
    EgressFailed,
    EnvelopeError,
    FrameCorrupted,
    HandlerFailed,
    HandlerTimeout,
    InvalidReturn,
    MessageError,
    MessageTooLarge,
    NoReply,
    NoRoute,
    Overloaded,
    PayloadInvalid,
    PeerDenied,
    PumpClosed,
    PumpError,
    XmlPipelineError,
)
from .frame import Frame, FrameRegistry, decode_frame
from .handler import HandlerMetadata, responses_of
from .offload import PoolStatistics, SyncRunner, WorkerPool, worker_spec
from .parser import parse_bytes
from .payload import Huh, codec_for
from .reply import ListenerStatistics, PumpStatistics, Reply, Unanswered
from .routing import RoutingTable
from .transport import open_transport
from .worker import Meta

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .transport.redis import RedisStreams

__all__ = ["StreamPump", "unanswered_conversations"]

logger = logging.getLogger(__name__)

PUMP_SENDER = "xml_pipeline"
"""The sender of the ``Huh`` messages the pump itself produces."""

_MESSAGE_TAG = "{" + ENVELOPE_NAMESPACE + "}message"
_HUH_QNAME = codec_for(Huh).qname


Egress = Callable[[Reply], Awaitable[None] | None]

# Each step of the shutdown (waiting for ingress calls, for the workers, closing the
# backend) gives up after this long; the pool bounds its own.
_STEP_TIMEOUT_S = 10.0
_ABANDON_BATCH = 500
_REPLAYING: contextvars.ContextVar[DeadLetter | None] = contextvars.ContextVar(
    "xml_pipeline_replaying", default=None
)  # the dead letter a replay is feeding back as input (its refusal keeps its history)
_REASON_CHARS = 2000
_ENVELOPE_MARK = (
    ENVELOPE_NAMESPACE.encode()
)  # of a dead letter's reason (a parser's message can quote the input)
_RETRY_S = 0.5  # a delivery from a stream that found Redis unreachable runs again then
_WARNED_KEPT = 1024
# Dead letters the backend could not take are kept in memory (the spill) and written
# once it answers again: at most this many, holding at most this many bytes of data
# and reasons; past that they are counted and dropped.
SPILL_LETTERS = 1000
SPILL_BYTES = 16 * 1024 * 1024
_SPILL_RETRY_S = 0.5  # the spill is written again after this, doubling...
_SPILL_RETRY_CAP_S = 10.0  # ...up to this (jittered)
# A <thread> naming a conversation nobody knows yet opens one under that name: a
# bounded token, so that clients can name their conversations (and retry them).
_THREAD_TOKEN = _regex.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
# Registry keys that reserve an external message's (sender, <id>), so that a
# retry is recognized atomically on every backend (registry_setdefault), even
# across processes and restarts; the value names the conversation that took it.
# A key is "re:" + a JSON list: frame chains are bare JSON lists, so the two never meet.
_RESERVED_PREFIX = "re:"
_REPLAY_CLAIM = "re:replay:"  # registry key of an unanswered conversation fed back
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


async def _complete(aw: Coroutine[Any, Any, None]) -> None:
    """Run ``aw`` to its end in a task of its own, even if the caller is cancelled.

    anyio's shielded scopes do not stop a native ``Task.cancel()`` (a second
    cancel, ``asyncio.timeout``), so the work runs in its own task; a cancellation
    that arrives meanwhile is raised once the work is done.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True  # raised below, once the work is over
    if cancelled:
        task.result()  # its own error first
        raise asyncio.CancelledError
    task.result()


async def unanswered_conversations(
    backend: Backend, *, older_than_s: float = 0.0
) -> list[Unanswered]:
    """The conversations in ``backend`` whose input was accepted and that hold no
    answer, oldest first: what a pump that crashed (or was killed) left unanswered.

    Read from the histories (a root frame whose history holds its input and no reply),
    so it needs a backend that outlives the pump (``manager://``, ``redis://``). A
    conversation in flight, or one that ends without an answer by design, is listed
    too: ``older_than_s`` leaves out what was accepted less than that long ago. Costs
    one history read per conversation in the registry.
    """
    chains = await backend.registry_list_all()
    claimed = {chain[len(_REPLAY_CLAIM) :] for chain in chains.values()
               if chain.startswith(_REPLAY_CLAIM)}  # fmt: skip
    roots = []
    for uuid, chain in chains.items():
        frame = decode_frame(uuid, chain) if chain.startswith("[") else None
        if frame is not None and not frame.hops and frame.root == uuid:
            roots.append(frame)
    limit = time.time() - older_than_s
    found: list[Unanswered] = []
    for i in range(0, len(roots), 100):
        batch = roots[i : i + 100]
        histories = await asyncio.gather(*(backend.buffer_get_thread(f.uuid) for f in batch))
        for frame, slots in zip(batch, histories, strict=True):
            if not slots or slots[0].direction != "out" or slots[0].timestamp > limit:
                continue  # no input kept (expired, trimmed), or too recent
            if any(slot.direction == "in" for slot in slots):
                continue  # answered (a reply, or a Huh)
            first = slots[0]
            found.append(
                Unanswered(
                    frame.uuid, frame.origin, first.to, first.message_id,
                    first.payload, first.timestamp, frame.uuid in claimed,
                )
            )  # fmt: skip
    found.sort(key=lambda u: u.timestamp)
    return found


class StreamPump:
    """Runs an organism. Use as an async context manager.

    Args:
        organism: the resolved organism (see :func:`~xml_pipeline.load_organism`).
        backend: a backend to use (not closed by the pump); by default the pump
            opens the organism's backend URL and closes it on exit.
        egress: called with every :class:`Reply` that reaches an external sender.
        transport: a Redis URL: this pump is one node of an organism served by
            several processes through Redis Streams (the backend must be Redis on the
            same server). None: the organism's ``transport``, else in-process inboxes.
        node: this node's name in the transport's consumer group (default: the host
            name). A node restarted under the same name takes up what it held.
        serve: the listeners this node runs (default: all of them).
        claim_idle_ms: an entry held by a node that has not renewed its lease for this
            long is taken over by another node (default: twice the longest
            ``timeout_s`` of the listeners served, at least 60 s).
        max_deliveries: an entry delivered more often than this without being
            committed (a message that kills its node, say) is dead-lettered.
        log_context: every record logged while a handler runs carries the delivery's
            conversation, frame, listener and message id (see :mod:`xml_pipeline.log`).
            Off by default: it costs a little on every hop.
        tracing: OpenTelemetry spans, one per delivery (the ``otel`` extra; see
            docs/operating.md). None (default): on when the application has set a
            global tracer provider by the time the pump starts; True: with the global
            provider; a ``TracerProvider``: with that one; False: off.
    """

    def __init__(
        self,
        organism: Organism,
        *,
        backend: Backend | None = None,
        egress: Egress | None = None,
        transport: str | None = None,
        node: str | None = None,
        serve: Collection[str] | None = None,
        claim_idle_ms: int | None = None,
        max_deliveries: int = 5,
        log_context: bool = False,
        tracing: bool | TracerProvider | None = None,
    ) -> None:
        self.organism = organism
        self._log_context = log_context
        self._settings = organism.settings
        self._owns_backend = backend is None
        self.backend: Backend = (
            backend
            if backend is not None
            else open_backend(organism.backend, organism.history, **organism.backend_options)
        )
        # Cached frames are kept alive, and every one is an object the garbage collector
        # scans at each full collection: enough for the conversations in flight (each
        # admitted message opens a few frames), not one per conversation kept. A frame
        # that fell out is read back from the registry.
        self._frames = FrameRegistry(
            self.backend,
            cache_size=max(
                1024, min(4 * organism.settings.queue_size, organism.history.max_threads)
            ),
        )
        self._egress = egress
        table = RoutingTable(organism.listeners)
        self._runtimes: dict[str, Runtime] = {
            listener.name: Runtime(listener, table.by_listener[listener.name])
            for listener in organism.listeners
        }
        self._routes: dict[str, tuple[Runtime, ...]] = {
            qname: tuple(self._runtimes[route.listener.name] for route in routes)
            for qname, routes in table.by_qname.items()
        }
        self._ids = itertools.count(1)
        self._id_prefix = _uuid.uuid4().hex[:12] + "-"
        self._pending = 0
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._space.set()
        # request() waiters by the cause of the replies they wait for (see Message),
        # and how many messages with that cause are inside the pump: when it drops to
        # 0 without a reply, the waiter gets NoReply.
        self._waiters: dict[str, asyncio.Future[Reply]] = {}
        self._open: dict[str, int] = {}
        self._ingesting = 0
        self._ingest_done = asyncio.Event()
        self._ingest_done.set()
        self._sync: dict[str, SyncRunner] = {}
        self._pool: WorkerPool | None = None
        self._classes: dict[str, type[BaseModel]] = {}
        self._pool_stats: PoolStatistics | None = None  # the last, once the pool is closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> running -> closing -> closed
        self._running = False  # accepting input (the hot path reads this one)
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._scope: anyio.CancelScope | None = None  # cancels the listener workers
        self._served = asyncio.Event()  # set once every worker task has ended
        self._started = asyncio.Event()  # set once __aenter__ is over, in any way
        self._closed = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self._worker_tasks: set[asyncio.Task[Any]] = set()
        self._abandoned: list[tuple[Delivery, str]] = []
        self._warned: set[tuple[str, str]] = set()  # (listener, target) of bad forwards
        self._abandoned_count = 0
        self._ingress = 0
        self._rejected = 0
        self._rejections: dict[str, int] = {}  # by Huh code
        self._egress_count = 0
        self._dead_letters = 0
        # The spill (see SPILL_LETTERS): oldest first, written by _keep_spilling.
        self._spill: deque[DeadLetter] = deque()
        self._spill_bytes = 0
        self._spilled_total = 0
        self._spill_dropped = 0
        self._spill_ready = asyncio.Event()
        self._duplicates = 0
        self._egress_failures = 0
        # Times inline handler steps and watches the loop's lateness (see _blocking).
        limit = self._settings.blocked_loop_s
        self._watch = BlockWatch(limit) if limit else None
        # Spans (see _tracing): decided once, when the pump starts; None: no tracing,
        # and the delivery path is the one without it.
        self._tracing_setting = tracing
        self._tracing: Tracing | None = None
        # This node's name in the consumer group and the listeners it serves (with a
        # transport), and its streams side (None: the in-process inboxes).
        self._node: Node | None = None
        self.node = node or socket.gethostname()
        self._serves = frozenset(self._runtimes) if serve is None else frozenset(serve)
        unknown = sorted(self._serves - set(self._runtimes))
        if unknown:
            raise ConfigError(f"cannot serve unknown listener(s): {', '.join(unknown)}")
        transport = transport if transport is not None else organism.transport
        self.transport: str | None = None
        """The Redis Streams transport's URL (password hidden), or None: in-process."""
        streams = None
        if transport is not None:
            streams = open_transport(transport, self.backend)
            self.transport = streams.url
        elif serve is not None:
            raise ConfigError("serving some listeners only needs a transport (a Redis URL)")
        if claim_idle_ms is None:
            longest = max(
                (self._runtimes[n].listener.timeout_s or 0.0 for n in self._serves), default=0.0
            )
            claim_idle_ms = max(60_000, int(2000 * longest))
        if claim_idle_ms <= 0 or max_deliveries < 1:
            raise ConfigError("claim_idle_ms must be positive and max_deliveries at least 1")
        if streams is not None:
            self._node = Node(
                self, streams, self.node, self._serves,
                claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries,
            )  # fmt: skip

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> StreamPump:
        if self._state != "new":
            raise PumpError(
                "this StreamPump is running already"
                if self._state == "running"
                else "this StreamPump was closed; create a new one"
            )
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        try:
            self._tracing = tracing_for(self._tracing_setting)
            await self.backend.ping()
            if self._node is not None:
                await self._node.open()
            await self._start_pool()
            for rt in self._runtimes.values():
                if not rt.listener.is_async and not rt.listener.cpu_bound:
                    size = min(rt.listener.concurrency, self._settings.sync_threads)
                    self._sync[rt.name] = SyncRunner(rt.name, size, carry_context=self._log_context)
            # One task group owns every task the pump starts. It is entered here and
            # left in __aexit__, so a task that fails cancels the body of the
            # `async with` (structured concurrency). The workers live in a nested
            # scope of their own, so aclose() cancels them without cancelling the body.
            stack = contextlib.AsyncExitStack()
            task_group = await stack.enter_async_context(anyio.create_task_group())
            self._exit_stack = stack
            await task_group.start(self._serve, name="xml_pipeline pump")
        except BaseException:
            try:
                self._begin_close()
                await _complete(self._shutdown())
            finally:
                self._started.set()
                entered, self._exit_stack = self._exit_stack, None
                if entered is not None:
                    await entered.aclose()
            raise
        self._state = "running"
        self._running = True
        self._started.set()
        return self

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every listener worker (and the pool's watchdog) until cancelled."""
        # This task and those it starts run for as long as the pump: not in the
        # context (the span) of the application's task that entered the pump.
        isolated = None if self._tracing is None else self._tracing.isolate()
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                for rt in self._runtimes.values():
                    if rt.name not in self._serves:
                        continue
                    deliver: Callable[[Delivery], Awaitable[None]] = (
                        self._deliver_offloaded if rt.listener.cpu_bound else self._deliver
                    )
                    if self._log_context:  # decided here, once: nothing on the hop otherwise
                        deliver = functools.partial(self._in_log_context, deliver)
                    if self._tracing is not None:
                        # Wrapped once here: a pump that does not trace pays nothing
                        # per delivery. (The span of a cpu_bound delivery is made here,
                        # around the pool call: its context goes with the task, so the
                        # handler's own spans in the worker are its children.)
                        deliver = self._tracing.wrap(deliver)
                    for i in range(rt.listener.concurrency):
                        tg.start_soon(self._worker, rt, deliver, name=f"listener {rt.name}#{i}")
                pool = self._pool
                if pool is not None and any(
                    rt.listener.cpu_bound and rt.listener.timeout_s
                    for rt in self._runtimes.values()
                ):
                    tg.start_soon(pool.watch, name="xml_pipeline pool watchdog")
                if self._node is not None:
                    for task, name in self._node.tasks():
                        tg.start_soon(task, name=name)
                if self._watch is not None:
                    tg.start_soon(self._watch.monitor, name="xml_pipeline loop monitor")
                tg.start_soon(self._keep_spilling, name="xml_pipeline dead-letter spill")
                task_status.started()
        finally:
            if isolated is not None and self._tracing is not None:
                self._tracing.restore(isolated)
            self._served.set()

    async def _start_pool(self) -> None:
        # A node runs the worker processes of the cpu_bound listeners it serves only.
        offloaded = [
            rt.listener
            for rt in self._runtimes.values()
            if rt.listener.cpu_bound and rt.name in self._serves
        ]
        if not offloaded:
            return
        workers = self.organism.process_pool.worker_count
        for listener in offloaded:
            if not listener.ordered and listener.concurrency < workers:
                logger.warning(
                    "listener %s is ordered: false, but its concurrency (%d) is below "
                    "process_pool.workers (%d): one frame's fan-out uses at most %d of "
                    "them at once",
                    listener.name, listener.concurrency, workers, listener.concurrency,
                )  # fmt: skip
        url = self.organism.backend
        # Workers read a shared store directly only when it is the one the pump uses
        # (a backend object passed in may not be what the organism's URL names); they
        # join it as any other process does (a store this pump serves included).
        shared = backend_scheme(url).shared and (
            self._owns_backend or not isinstance(self.backend, MemoryBackend)
        )
        try:
            joined = (
                client_url(url, self.organism.backend_options, backend=self.backend)
                if shared
                else None
            )
            spec = worker_spec(self.organism, joined, only=self._serves)
            pool = WorkerPool(self.organism.process_pool, spec)
            self._pool = pool
            await pool.start()
        except ConfigError as exc:
            where = self.organism.path
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            # The task group is left as if the body had ended normally: its tasks
            # have ended by now, so it only raises what one of them raised, and an
            # error of the body reaches the caller as it is (not in a group).
            stack, self._exit_stack = self._exit_stack, None
            if stack is not None:
                await stack.aclose()

    async def aclose(self) -> None:
        """Stop: refuse new input, cancel every worker, stop the worker processes,
        dead-letter what was still queued or running (code ``shutdown``), and close
        the backend if the pump opened it.

        Call :meth:`drain` first to finish the work instead. The cleanup runs to its
        end even if the calling task is cancelled meanwhile (again); each step has
        a deadline, so a hung backend or worker cannot hold it up for long.
        """
        if self._state == "new":
            self._state = "closed"
            self._closed.set()
            return
        if self._state == "starting":  # another task is entering: let it finish first
            await _complete(self._wait(self._started))
        if self._state != "running":
            await _complete(self._wait(self._closed))
            return
        self._begin_close()
        if asyncio.current_task() in self._worker_tasks:
            # Called by a handler: the shutdown waits for every worker, this one
            # included, so it runs on its own; this message is abandoned with the rest.
            self._closer = asyncio.ensure_future(self._shutdown())
            return
        await _complete(self._shutdown())

    @staticmethod
    async def _wait(event: asyncio.Event) -> None:
        await event.wait()

    def _begin_close(self) -> None:
        self._state = "closing"
        self._running = False
        self._space.set()  # wake ingress waiting for room: it will refuse
        if self._node is not None:
            self._node.stop_reading()  # and a node's reader: it stops

    async def _shutdown(self) -> None:
        try:
            # Ingress calls under way finish (or refuse) first, so that nothing is
            # enqueued once the inboxes are emptied below.
            with anyio.move_on_after(_STEP_TIMEOUT_S):
                await self._ingest_done.wait()
            if self._scope is not None:
                self._scope.cancel()
                with anyio.move_on_after(_STEP_TIMEOUT_S):
                    await self._served.wait()
        finally:
            try:
                if self._pool is not None:
                    pool, self._pool = self._pool, None
                    try:
                        await pool.aclose()
                    finally:
                        self._pool_stats = pool.statistics()
            finally:
                try:
                    await self._abandon_all()
                finally:
                    for runner in self._sync.values():
                        runner.shutdown()
                    self._sync.clear()
                    try:
                        if self._node is not None:
                            await self._node.close()
                        if self._owns_backend:
                            with anyio.move_on_after(_STEP_TIMEOUT_S):
                                await self.backend.aclose()
                    finally:
                        self._state = "closed"
                        self._closed.set()

    async def _abandon_all(self) -> None:
        """Dead-letter what the workers left: running first, then queued, in batches;
        the spill (letters the backend could not take earlier) goes first. Both within
        ``drain_timeout_s``: what is not written by then is counted and logged."""
        deadline = anyio.current_time() + self._settings.drain_timeout_s
        if self._spill:
            with anyio.CancelScope(deadline=deadline):
                delay = 0.05
                # A backend that does not retry by itself (manager://) may be back in
                # a moment: tried again, with backoff, until the deadline.
                while not await self._write_spill():
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            if self._spill:
                logger.error(
                    "could not write %d dead letter(s) kept while the backend failed, "
                    "at shutdown within %g s: they are lost",
                    len(self._spill), self._settings.drain_timeout_s,
                )  # fmt: skip
        abandoned = self._abandoned
        self._abandoned = []
        for rt in self._runtimes.values():
            # Taken from the inbox before what is still in it: those parked for the
            # worker holding their frame (stopped with the others) first.
            if rt.held:
                for parked in rt.held.values():
                    while parked:
                        abandoned.append((parked.popleft(), "queued"))
                        rt.parked -= 1
                        self._release()
            inbox = rt.inbox
            while not inbox.empty():
                abandoned.append((inbox.get_nowait(), "queued"))
                self._release()
        # What came from a stream stays pending there: the next owner of its shard
        # takes it over (this node gives up its leases when it closes), or this node
        # takes it up again when it restarts under its name.
        abandoned = [(d, state) for d, state in abandoned if d.entry is None]
        waiters = list(self._waiters.values())
        self._waiters.clear()
        self._open.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(Abandoned("the pump stopped before a reply came"))
        if not abandoned:
            return
        self._abandoned_count += len(abandoned)
        letters = []
        for d, state in abandoned:
            msg = d.message
            reason = f"{state} for {d.runtime.name} when the pump stopped"
            logger.debug("dead-lettering message %s: %s", msg.id, reason)
            data = msg.raw if msg.raw is not None else msg.xml()
            error = Abandoned(reason)
            letters.append(self._letter(error, data, "delivery", d.runtime.name, d.frame.uuid, msg,
                                        reply_thread=d.reply_frame.uuid))  # fmt: skip
        written = 0
        # Bounded even when the backend is slow or down: what is not written by the
        # deadline is counted and logged once.
        with anyio.CancelScope(deadline=deadline):
            for i in range(0, len(letters), _ABANDON_BATCH):
                batch = letters[i : i + _ABANDON_BATCH]
                try:
                    await self.backend.deadletter_add_many(batch)
                except XmlPipelineError as exc:
                    logger.error(
                        "could not write %d dead letter(s) at shutdown: %s",
                        len(letters) - written, exc,
                    )  # fmt: skip
                    return
                written += len(batch)
        self._dead_letters += written
        if written < len(letters):
            logger.error(
                "could not write %d dead letter(s) at shutdown within %g s",
                len(letters) - written, self._settings.drain_timeout_s,
            )  # fmt: skip
        logger.info("%d message(s) dead-lettered at shutdown (code shutdown)", written)

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being handled."""
        while self._pending:
            await self._idle.wait()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until idle, at most ``timeout`` seconds (default: ``drain_timeout_s``).

        Returns:
            True if the pump became idle in time.
        """
        limit = self._settings.drain_timeout_s if timeout is None else timeout
        if self._node is not None:
            # A node finishes what it holds and reads nothing more: the rest of the
            # inboxes is for the other nodes (or for this one when it starts again).
            self._node.drain()
        try:
            async with asyncio.timeout(limit):
                await self.wait_idle()
        except TimeoutError:
            return False
        return True

    def statistics(self) -> PumpStatistics:
        """An immutable snapshot of the pump's counters."""
        listeners = {}
        for name, rt in self._runtimes.items():
            n = min(rt.latency_n, LATENCY_SAMPLES)
            p50 = p99 = None
            if n:
                samples = sorted(rt.latencies[:n])
                p50 = percentile(samples, 0.50) * 1e3
                p99 = percentile(samples, 0.99) * 1e3
            listeners[name] = ListenerStatistics(
                received=rt.received,
                handled=rt.handled,
                failed=rt.failed,
                in_flight=rt.in_flight,
                queued=rt.inbox.qsize() + rt.parked,
                latency_p50_ms=p50,
                latency_p99_ms=p99,
                blocked=rt.blocked,
                blocked_max_ms=rt.blocked_max * 1e3 if rt.blocked else None,
                failures=MappingProxyType(dict(rt.failures)),
            )
        return PumpStatistics(
            ingress=self._ingress,
            rejected=self._rejected,
            rejections=MappingProxyType(dict(self._rejections)),
            duplicates=self._duplicates,
            egress=self._egress_count,
            dead_letters=self._dead_letters,
            in_pump=self._pending,
            listeners=MappingProxyType(listeners),
            pool=self._pool_stats if self._pool is None else self._pool.statistics(),
            abandoned=self._abandoned_count,
            blocked_loop=0 if self._watch is None else self._watch.count,
            spilled=len(self._spill),
            spilled_total=self._spilled_total,
            spill_dropped=self._spill_dropped,
        )

    def _transport_streams(self) -> RedisStreams | None:
        """The Redis Streams transport of a node (None: in-process inboxes)."""
        return None if self._node is None else self._node.streams

    def _unready(self) -> list[str]:
        """Why this pump should not be sent work now (empty: it can be)."""
        problems = []
        if self._state != "running":
            problems.append(f"pump {self._state}")
        elif self._node is not None and self._node.draining:
            problems.append("draining")
        if (
            self._state == "running"
            and self._pool is None
            and any(self._runtimes[name].listener.cpu_bound for name in self._serves)
        ):
            problems.append("worker pool down")
        return problems

    def _count_latencies(self) -> None:
        """Keep a latency histogram per listener from now on (xml_pipeline.metrics
        asks for it; it costs a bisect per delivery, so only then)."""
        for rt in self._runtimes.values():
            if rt.buckets is None:
                rt.buckets = array("q", bytes(8 * (len(LATENCY_BUCKETS) + 1)))

    def _latency_histograms(self) -> dict[str, tuple[list[int], float]]:
        """Per listener: its histogram's counts (per bucket, not cumulative, +Inf
        last) and sum in seconds; listeners without one are left out."""
        return {
            name: (list(rt.buckets), rt.latency_sum)
            for name, rt in self._runtimes.items()
            if rt.buckets is not None
        }

    # -- ingress ---------------------------------------------------------------

    async def inject(
        self,
        message: bytes | str | BaseModel,
        *,
        to: str | None = None,
        sender: str = "api",
        thread: str | None = None,
    ) -> str | None:
        """Feed one message from outside. Waits while the pump is full (backpressure).

        Args:
            message: an envelope document, a bare payload document, or a payload model.
            to: the listener for a bare payload (or an envelope without ``<to>``);
                None sends it to every listener accepting it.
            sender: the external sender's label for a bare payload.
            thread: a conversation to continue, for a bare payload.

        Returns:
            The conversation's id (its root frame), or None if the message was rejected.
            A rejection is answered with a ``Huh`` through egress and dead-lettered.
        """
        return await self._ingest(message, to=to, sender=sender, thread=thread)

    async def request(
        self,
        message: bytes | str | BaseModel,
        *,
        to: str | None = None,
        sender: str = "api",
        thread: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Inject a message and wait for the first reply to its conversation.

        Every failure to handle the message, at ingress or in a handler, comes back
        the same way: as a reply whose payload is a :class:`Huh` (what the caller
        would get on the wire). Call :meth:`Reply.raise_for_huh` to turn it into the
        matching :class:`MessageError`. A request gets the first reply caused by its
        own message (matched by cause, not by arrival, so concurrent requests on one
        conversation never swap replies). That first reply may be a ``Huh`` about a
        side branch (a forward that went nowhere, say) while other work of the
        conversation goes on: later replies still reach egress.

        Raises:
            Duplicate: a retry of a message already accepted (same sender and
                ``<id>``); the original's reply went to the original's caller.
            NoReply: everything the message caused ended (nothing of it left inside
                the pump) without a reply for the caller.
            Abandoned: the pump stopped before a reply came.
            PumpClosed: the pump is not running.
            TimeoutError: no reply within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        causes: list[str] = []

        def watch(msg: Message) -> None:
            cause = msg.cause or msg.id  # set at ingress
            causes.append(cause)
            self._waiters[cause] = future
            if self._node is None:  # counted only where every delivery is seen
                self._open[cause] = 0

        rejected: list[MessageError] = []
        try:
            await self._ingest(
                message,
                to=to,
                sender=sender,
                thread=thread,
                on_accept=watch,
                on_reject=rejected.append,
                on_reply=future,
            )
            if rejected and isinstance(rejected[0], Duplicate):
                raise rejected[0]
            async with asyncio.timeout(timeout):
                return await future
        finally:
            for cause in causes:
                if self._waiters.get(cause) is future:
                    del self._waiters[cause]
                    self._open.pop(cause, None)

    async def _admit(self) -> None:
        cap = self._settings.queue_size
        while self._pending >= cap and self._running:
            self._space.clear()
            await self._space.wait()

    def _hold(self) -> None:
        self._pending += 1
        self._idle.clear()

    def _release(self) -> None:
        self._pending -= 1
        if self._pending < self._settings.queue_size:
            self._space.set()
            if not self._pending:
                self._idle.set()

    async def _ingest(
        self,
        message: bytes | str | BaseModel,
        *,
        to: str | None,
        sender: str,
        thread: str | None,
        on_accept: Callable[[Message], None] | None = None,
        on_reject: Callable[[MessageError], None] | None = None,
        on_reply: asyncio.Future[Reply] | None = None,
        reserve: bool = True,
    ) -> str | None:
        if not self._running:
            raise PumpClosed(
                "the pump is not running (use 'async with StreamPump(...)')"
                if self._state in ("new", "starting")
                else "the pump is stopping or stopped"
            )
        self._ingress += 1
        self._ingesting += 1
        self._ingest_done.clear()
        # Input is never part of a delivery's commit, even when a handler (or a task it
        # started) sends it while its delivery from a stream runs.
        token = OUTBOX.set(None) if self._node is not None else None
        try:
            if self._pending >= self._settings.queue_size:  # no coroutine when there is room
                await self._admit()
                if not self._running:
                    raise PumpClosed("the pump stopped before accepting this message")
            return await self._ingest_admitted(
                message,
                to=to,
                sender=sender,
                thread=thread,
                on_accept=on_accept,
                on_reject=on_reject,
                on_reply=on_reply,
                reserve=reserve,
            )
        finally:
            if token is not None:
                OUTBOX.reset(token)
            self._ingesting -= 1
            if not self._ingesting:
                self._ingest_done.set()

    async def _ingest_admitted(
        self,
        message: bytes | str | BaseModel,
        *,
        to: str | None,
        sender: str,
        thread: str | None,
        on_accept: Callable[[Message], None] | None,
        on_reject: Callable[[MessageError], None] | None,
        on_reply: asyncio.Future[Reply] | None,
        reserve: bool,
    ) -> str | None:
        self._hold()
        raw: bytes | None = None
        root: Frame | None = None
        label: str | None = None  # the envelope's <from>, once known
        given_id: str | None = None  # the envelope's <id>
        tracing = self._tracing
        span = token = None  # the input's span, when the pump traces
        try:
            try:
                traceparent = None
                if type(message) is not bytes and isinstance(message, BaseModel):
                    label = sender
                    msg = Message(
                        self._new_id(), sender, to, codec_for(type(message)).qname, model=message
                    )
                else:
                    raw = self._raw_bytes(message)
                    element = parse_bytes(raw, self._settings.limits)
                    if element.tag == _MESSAGE_TAG:
                        # The envelope's fields as they are read (no Envelope record).
                        label, env_to, thread, given_id, element, _, traceparent = _read_envelope(
                            element
                        )
                        if env_to is not None:
                            to = env_to
                    else:
                        label = sender
                    msg = Message(
                        given_id or self._new_id(), label, to, str(element.tag),
                        element=element, raw=raw,
                    )  # fmt: skip
                if tracing is not None:
                    # The current span while the input is taken in: a refusal's Huh
                    # carries its context too.
                    span, token = tracing.receive(msg, traceparent)
                # What the replies answer (<re>), and what a request() matches them by:
                # the pump's own id when the sender's <id> might not be unique here.
                msg.re = msg.id
                msg.cause = msg.id if given_id is None else self._new_id()
                if xml_safe(label) != label:
                    raise EnvelopeError("the sender label holds characters XML cannot carry")
                targets = self._ingress_targets(msg)
                new_thread = None
                if thread is not None:
                    known = await self._frames.resolve(thread)
                    if known is not None:
                        # A frame inside a conversation is no conversation: a new one.
                        root = None if known.hops else known
                    elif _THREAD_TOKEN.fullmatch(thread) is not None:
                        new_thread = thread
                    else:
                        raise EnvelopeError(
                            "a new conversation's <thread> must be a token of 1 to 128 "
                            "characters (letters, digits and . _ : @ -), starting with a "
                            "letter or digit"
                        )
            except MessageError as exc:
                self._rejected += 1
                self._rejections[exc.code] = self._rejections.get(exc.code, 0) + 1
                if span is not None and tracing is not None:
                    tracing.refused(span, exc)
                if on_reject is not None:
                    on_reject(exc)
                if label is None or xml_safe(label) != label:
                    label = sender if xml_safe(sender) == sender else None
                if raw is None and isinstance(message, str):
                    raw = message[: self.organism.history.dead_letter_bytes].encode("utf-8")
                await self._reject(exc, raw, label, given_id, on_reply, to=to)
                return None
            uuid = root.uuid if root is not None else (new_thread or self._frames.new_uuid())
            if span is not None:
                span.set_attribute("messaging.message.conversation_id", uuid)
            mark = None
            if given_id is not None and reserve:
                # Reserve (sender, <id>) atomically: of concurrent retries, on any
                # backend and across processes, exactly one goes on. The mark names
                # this attempt (pump-unique) and its conversation.
                key = _RESERVED_PREFIX + _json([label, given_id])
                mark = f"{_RESERVED_PREFIX}{uuid} {msg.cause}"
                taken = await self.backend.registry_setdefault(key, mark)
                if taken != mark:
                    self._duplicates += 1
                    logger.info("message %r from %r is a retry; ignored", given_id, label,
                                extra={"message_id": given_id})  # fmt: skip
                    if on_reject is not None:
                        on_reject(Duplicate(f"message {given_id!r} was already accepted"))
                    return taken[len(_RESERVED_PREFIX) :].partition(" ")[0]
            try:
                if root is None:
                    root = await self._frames.new_root(
                        msg.sender, uuid, named=new_thread is not None
                    )
                await self._record(root, "out", msg, msg.to)
                # A plain loop: an async comprehension is a function call of its own.
                deliveries = []
                for rt in targets:
                    child = await self._frames.child(root, rt.name)
                    deliveries.append(Delivery(msg, rt, child, root, None))
                if self._node is not None:  # accepted once every XADD returned
                    follow = on_accept is not None
                    if on_accept is not None:
                        # A waiting request() is registered first: another node may
                        # answer before the last XADD returns (on failure the
                        # caller drops it again).
                        on_accept(msg)
                        on_accept = None
                    await self._node.accept(msg, deliveries, follow=follow)
                elif not self._running:  # stopped meanwhile: the inboxes were emptied
                    raise PumpClosed("the pump stopped before accepting this message")
            except BaseException:
                if mark is not None:
                    # Not accepted after all: a retry must be able to go on.
                    await _complete(self._unreserve(mark))
                raise
            if on_accept is not None:
                on_accept(msg)
            if self._node is None:
                for d in deliveries:
                    self._enqueue(d)
            return root.uuid
        finally:
            if tracing is not None and span is not None:
                tracing.end(span, token)
            self._release()

    async def _unreserve(self, mark: str) -> None:
        with contextlib.suppress(XmlPipelineError):
            await self.backend.registry_delete(mark)  # only this attempt's reservation

    def _raw_bytes(self, message: bytes | str) -> bytes:
        if type(message) is bytes:
            return message
        cap = self._settings.limits.max_bytes
        if isinstance(message, str):
            # A character is at least one byte: refuse before encoding a huge string.
            if len(message) > cap:
                raise MessageTooLarge(f"message is over {cap} bytes; the limit is {cap}")
            return message.encode("utf-8")
        return bytes(message)

    def _ingress_targets(self, msg: Message) -> tuple[Runtime, ...]:
        if msg.to is not None:
            rt = self._runtimes.get(msg.to)
            if rt is None or msg.qname not in rt.codecs:
                raise self._no_route(msg.to, msg.qname, None)
            return (rt,)
        targets = self._routes.get(msg.qname)
        if not targets:
            raise self._no_route(None, msg.qname, None)
        return targets

    async def _reject(
        self,
        exc: MessageError,
        raw: bytes | None,
        label: str | None,
        re_id: str | None = None,
        on_reply: asyncio.Future[Reply] | None = None,
        *,
        to: str | None = None,
    ) -> None:
        logger.info("rejected at ingress (%s): %s", exc.code, exc.reason,
                    extra=None if re_id is None else {"message_id": re_id})  # fmt: skip
        await self._dead_letter(exc, raw, "ingress", sender=label, message_id=re_id, to=to)
        reply = Reply(None, PUMP_SENDER, label, self._new_id(), huh_for(exc, raw), re_id)
        if on_reply is not None and not on_reply.done():
            on_reply.set_result(reply)
        await self._emit(reply, None)

    # -- delivery --------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _enqueue(self, delivery: Delivery) -> None:
        if self._tracing is not None:
            # Made by the delivery running now (its span is the current one): its
            # child. Done here, where every message made inside the pump passes.
            self._tracing.stamp(delivery.message)
        if self._node is not None:
            box = OUTBOX.get()
            if box is not None:  # a delivery from a stream: added by its commit
                self._node.output(delivery, box)
                return
        rt = delivery.runtime
        self._hold()
        rt.received += 1
        if self._open:
            cause = delivery.message.cause
            if cause in self._open:
                self._open[cause] += 1
        rt.inbox.put_nowait(delivery)

    @staticmethod
    async def _in_log_context(deliver: Callable[[Delivery], Awaitable[None]], d: Delivery) -> None:
        """``deliver(d)`` with ``d`` as the delivery log records name (log_context=True).

        A context variable rather than ``extra=`` on each call: the handler's own log
        lines carry it too. Set around the delivery in the worker task's context, so
        only this delivery sees it (measured: benchmarks/relay.py, CHANGELOG).
        """
        token = CURRENT_DELIVERY.set(d)
        try:
            await deliver(d)
        finally:
            CURRENT_DELIVERY.reset(token)

    def _done_with(self, delivery: Delivery) -> None:
        """A delivery left the pump: a request() whose message caused nothing that is
        still inside the pump, and no reply, gets NoReply."""
        cause = delivery.message.cause
        if cause is None or not self._running:
            return
        left = self._open.get(cause)
        if left is None:
            return
        if left > 1:
            self._open[cause] = left - 1
            return
        del self._open[cause]
        waiter = self._waiters.pop(cause, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                NoReply(
                    f"message {delivery.message.re} to conversation {delivery.frame.root} "
                    "caused no reply to its caller"
                )
            )

    async def _worker(self, rt: Runtime, deliver: Callable[[Delivery], Awaitable[None]]) -> None:
        """Run deliveries from the listener's inbox until cancelled.

        For an ordered listener, the worker *holds* the frame of the delivery it runs
        (``rt.held``): a worker taking a delivery of a frame held by another parks it
        there and takes the next one, and the holder runs what was parked for its frame
        before it lets the frame go. So a frame's messages run one at a time, in inbox
        order, and no worker idles while the inbox has work of another frame.
        """
        task = asyncio.current_task()
        if task is not None:
            self._worker_tasks.add(task)
        inbox = rt.inbox
        held = rt.held  # None: unordered, nothing held
        frame: str | None = None  # the frame this worker holds
        again: Delivery | None = None
        while True:
            if again is not None:
                # Redis could not be reached: the same delivery runs again, here and
                # before the next one (its frame stays held, so the frame's next
                # messages wait: order holds).
                delivery, again = again, None
                await asyncio.sleep(_RETRY_S)
                if not self._running:
                    # Its entry stays pending: the next owner takes it, and the frame's
                    # entries parked behind it after it, in order.
                    self._give_back(delivery)
                    continue
                delivery.routed = False
                self._hold()
            elif held is None:
                delivery = await inbox.get()
            else:
                if frame is not None:
                    parked = held[frame]
                    if parked:  # taken meanwhile by other workers: next, in order
                        delivery = parked.popleft()
                        rt.parked -= 1
                    else:
                        del held[frame]
                        frame = None
                if frame is None:
                    delivery = await inbox.get()
                    frame = delivery.frame.uuid
                    while frame in held:  # another worker runs this frame: after it
                        parked = held[frame]
                        if parked is None:
                            held[frame] = deque((delivery,))
                        else:
                            parked.append(delivery)
                        rt.parked += 1
                        delivery = await inbox.get()
                        frame = delivery.frame.uuid
                    held[frame] = None
            rt.in_flight += 1
            box = token = None
            retry = False
            if delivery.entry is not None:  # from a stream: gather what it does
                box = Outbox(delivery.node or self.node)
                token = OUTBOX.set(box)
            try:
                await deliver(delivery)
            except asyncio.CancelledError:
                # Dead-lettered by the shutdown, with the others, in one batch.
                if not delivery.routed:
                    self._abandoned.append((delivery, "running"))
                raise
            except Exception as exc:
                from_stream = box is not None
                if self._tracing is None:
                    retry = await self._delivery_raised(delivery, exc, from_stream)
                else:  # under the delivery's span, still open: the Huh descends from it
                    with self._tracing.resumed(delivery):
                        retry = await self._delivery_raised(delivery, exc, from_stream)
                if retry:
                    box = None
            finally:
                if token is not None:
                    OUTBOX.reset(token)
                rt.in_flight -= 1
                n = rt.latency_n
                elapsed = time.perf_counter() - delivery.enqueued
                rt.latencies[n % LATENCY_SAMPLES] = elapsed
                rt.latency_n = n + 1
                buckets = rt.buckets
                if buckets is not None:  # metrics on: ~0.1 µs (a C bisect, two adds)
                    buckets[bisect_right(LATENCY_BUCKETS, elapsed)] += 1
                    rt.latency_sum += elapsed
                if self._open:
                    self._done_with(delivery)
                self._release()
            if box is not None and self._node is not None:
                await self._node.commit(delivery, box)
            elif retry:
                again = delivery

    def _give_back(self, delivery: Delivery) -> None:
        """``delivery`` (from a stream) leaves its entry pending, to be read again: let
        go of the entries of its frame parked behind it from the same stream, so that
        they are read again after it, in the stream's order, instead of running (and
        committing) before it. They stay pending for this node; nothing is lost."""
        held, entry, node = delivery.runtime.held, delivery.entry, self._node
        if held is None or entry is None or node is None:
            return
        parked = held.get(delivery.frame.uuid)
        if not parked:
            return
        kept = [d for d in parked if d.entry is None or d.entry.stream != entry.stream]
        for other in parked:
            if other.entry is not None and other.entry.stream == entry.stream:
                delivery.runtime.parked -= 1
                node.let_go(other.entry)
                self._release()
        parked.clear()
        parked.extend(kept)

    async def _delivery_raised(self, delivery: Delivery, exc: Exception, from_stream: bool) -> bool:
        """A delivery function raised ``exc`` (not a handler's failure: those are
        Huhs already). Returns True when the delivery is to run again; else it failed,
        and its sender was told."""
        rt = delivery.runtime
        if from_stream and isinstance(exc, BackendUnavailable) and self._running:
            # Redis cannot be reached: nothing of this run is committed, and the
            # delivery is tried again (its entry stays this node's).
            logger.info("%s: %s; the delivery is tried again", rt.name, exc,
                        extra=log_fields(delivery))  # fmt: skip
            return True
        if isinstance(exc, BackendError):
            if not isinstance(exc, BackendCorrupted):
                logger.warning("backend failed delivering to %s: %s", rt.name, exc,
                               extra=log_fields(delivery))  # fmt: skip
            error: MessageError = self._backend_failed(exc, f"delivering to {rt.name}", rt.name)
        else:  # a bug in the pump itself: keep serving
            logger.exception("internal error delivering to %s", rt.name,
                             extra=log_fields(delivery))  # fmt: skip
            error = HandlerFailed(f"internal error: {type(exc).__name__}: {exc}", listener=rt.name)
        try:
            await self._fail(delivery, error)
        except Exception:
            logger.exception("could not report an internal error")
        return False

    async def _record(self, frame: Frame, direction: str, msg: Message, to: str | None) -> None:
        slot = Slot(0, direction, msg.sender, to, msg.qname, msg.id, time.time(), msg.xml())  # type: ignore[arg-type]
        box = OUTBOX.get()
        if box is not None:  # a delivery from a stream: written by its commit
            box.slots.append((frame.uuid, slot))
            return
        await self.backend.buffer_append(frame.uuid, slot)

    async def _deliver(self, d: Delivery) -> None:
        rt = d.runtime
        msg = d.message
        listener = rt.listener
        codec = rt.codecs[msg.qname]
        model = msg.model
        if model is None or type(model) is not codec.cls:
            try:
                model = codec.decode(msg.element())
            except PayloadInvalid as exc:
                exc.listener = listener.name
                await self._fail(d, exc)
                return
            if msg.model is None:
                msg.model = model
        frame = d.frame
        await self._record(frame, "in", msg, listener.name)
        box = OUTBOX.get() if d.entry is not None else None
        meta = HandlerMetadata(
            *self._meta_of(d),
            functools.partial(self.backend.buffer_get_thread, frame.uuid)
            if box is None or self._node is None
            else functools.partial(self._node.history_with, box, frame.uuid),
            self._loop,
        )
        try:
            result = await self._call(rt, model, meta)
            responses = responses_of(listener.name, result)
        except InvalidReturn as exc:
            logger.warning("handler of %s: %s", listener.name, exc.reason)
            await self._fail(d, exc)
            return
        except MessageError as exc:
            await self._fail(d, exc)
            return
        after_huh = msg.qname == _HUH_QNAME
        outs: list[tuple[bool, Message]] = []
        for response in responses:
            payload = response.payload
            out = Message(
                self._new_id(),
                listener.name,
                response.to,
                codec_for(type(payload)).qname,
                model=payload,
                re=msg.re,
                cause=msg.cause,
            )
            out.after_huh = after_huh
            outs.append((response.is_response, out))
        try:
            for _, out in outs:
                out.xml()  # serialized once, for the history; refuses what XML cannot carry
        except ValueError as exc:
            error = InvalidReturn(
                f"{listener.name} returned a payload XML cannot carry: {exc}",
                listener=listener.name,
            )
            logger.warning("handler of %s: %s", listener.name, error.reason)
            await self._fail(d, error)
            return
        await self._send_outs(d, outs)

    @staticmethod
    def _meta_of(d: Delivery) -> tuple[str, str, str, str, bool, int, bool]:
        """What a handler learns about a delivery, as plain values (HandlerMetadata's)."""
        frame = d.frame
        msg = d.message
        return (
            frame.uuid,
            msg.sender,
            d.runtime.name,
            msg.id,
            d.reply_to is d.runtime,
            frame.depth,
            d.reply_to is None and not d.reply_frame.hops,
        )

    async def _send_outs(self, d: Delivery, outs: list[tuple[bool, Message]]) -> None:
        """Route a handler's outputs, all or nothing.

        Every backend write (history slots, child frames) is done for every output
        first; only then are the deliveries enqueued, at once. A backend failure on
        the way fails the input with ``backend-unavailable`` and delivers none of
        the outputs (those already recorded stay in the history: appends are
        idempotent, so a retry does not write them twice).
        """
        rt = d.runtime
        frame = d.frame
        route = Route()
        try:
            for is_response, out in outs:
                if is_response:
                    await self._plan_respond(out, frame, rt, route)
                else:
                    await self._plan_forward(out, frame, rt, route)
        except BackendError as exc:
            if d.entry is not None and isinstance(exc, BackendUnavailable):
                raise  # from a stream: tried again, nothing committed (see _worker)
            what = f"routing what {rt.name} emitted (nothing was delivered)"
            await self._fail(d, self._backend_failed(exc, what, rt.name))
            return
        for delivery in route.deliveries:
            self._enqueue(delivery)
        d.routed = True
        rt.handled += 1
        if route.replies is not None:
            for reply, out in route.replies:
                await self._emit(reply, out, recorded=True)
        if route.refusals is not None:
            for error, out, response in route.refusals:
                await self._refuse(error, out, frame, rt, response=response)

    async def _deliver_offloaded(self, d: Delivery) -> None:
        """Deliver to a cpu_bound listener: its handler runs in a worker process."""
        rt = d.runtime
        msg = d.message
        listener = rt.listener
        frame = d.frame
        pool = self._pool
        if pool is None:
            raise PumpClosed("the worker pool is closed")

        await self._record(frame, "in", msg, listener.name)
        history = None
        if listener.history_snapshot:
            box = OUTBOX.get() if d.entry is not None else None
            if box is not None and self._node is not None:  # with what it will commit
                history = await self._node.history_with(box, frame.uuid)
            else:
                history = list(await self.backend.buffer_get_thread(frame.uuid))
        meta = Meta._make(self._meta_of(d))
        try:
            # With the context of this delivery's span (the current one) when the pump
            # traces: the handler's own spans in the worker are its children.
            trace = None if self._tracing is None else self._tracing.traceparent_now()
            outputs = await pool.run(
                listener.name, msg.xml(), meta, history, listener.timeout_s, trace
            )
        except MessageError as exc:
            if isinstance(exc, InvalidReturn):
                logger.warning("handler of %s: %s", listener.name, exc.reason)
            await self._fail(d, exc)
            return
        after_huh = msg.qname == _HUH_QNAME
        outs: list[tuple[bool, Message]] = []
        for output in outputs:
            out = Message(
                self._new_id(), listener.name, output.to, output.qname, xml=output.xml,
                path=output.class_path, re=msg.re, cause=msg.cause,
            )  # fmt: skip
            out.after_huh = after_huh
            outs.append((output.is_response, out))
        await self._send_outs(d, outs)

    async def _call(self, rt: Runtime, model: BaseModel, meta: HandlerMetadata) -> Any:
        listener = rt.listener
        timeout = listener.timeout_s
        # The deadline is set before the handler starts: a first step that holds the
        # event loop (run below, before anything is awaited) counts against it.
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        scope: asyncio.Timeout | None = None
        result: Any = None
        try:
            if listener.is_async:
                call: Any = listener.handler(model, meta)
                watch = self._watch
                if watch is not None:
                    # Its first step runs here, timed; most handlers end in it. The
                    # rest of one that suspends is awaited as Steps, each step timed
                    # (see _blocking).
                    result = watch.first_step(rt, call)
                    call = result if type(result) is Steps else None
                if call is not None:
                    if deadline is None:
                        return await call
                    async with asyncio.timeout_at(deadline) as scope:
                        result = await call
            else:
                runner = self._sync[listener.name]
                if self._tracing is None:
                    future = runner.submit(listener.handler, model, meta)
                else:  # in the delivery's context: its own spans are the span's children
                    run = contextvars.copy_context().run
                    future = runner.submit(run, listener.handler, model, meta)
                if deadline is None:
                    return await future
                async with asyncio.timeout_at(deadline) as scope:
                    result = await future
        except TimeoutError as exc:
            if scope is not None and scope.expired():
                if not listener.is_async:
                    logger.warning(
                        "%s is past its timeout; if it already started, it keeps its thread "
                        "until it returns",
                        listener.name,
                    )
                raise HandlerTimeout(
                    f"{listener.name} did not finish within {timeout:g} s", listener=listener.name
                ) from exc
            raise HandlerFailed(
                f"{listener.name} raised TimeoutError: {exc}", listener=listener.name
            ) from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the pump itself is being cancelled
            # The handler let a CancelledError of its own escape: a failure, not a stop.
            raise HandlerFailed(
                f"{listener.name} raised CancelledError", listener=listener.name
            ) from exc
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # SystemExit and KeyboardInterrupt raised by a handler fail its message,
            # as they do in a worker process: they do not stop the pump.
            logger.warning("handler of %s raised %s: %s", listener.name, type(exc).__name__, exc,
                           exc_info=logger.isEnabledFor(logging.DEBUG))  # fmt: skip
            raise HandlerFailed(
                f"{listener.name} raised {type(exc).__name__}: {exc}", listener=listener.name
            ) from exc
        if deadline is not None and timeout is not None and listener.is_async:
            # (A sync handler's thread kept its own time: its answer stands.)
            late = asyncio.get_running_loop().time() - deadline
            if late >= 0:
                # It ended past its deadline before the timer could fire: the loop was
                # held meanwhile (by this handler, as a rule; see _blocking). Its answer
                # is dropped, as it would have been had the timer fired in time.
                raise HandlerTimeout(
                    f"{listener.name} did not finish within {timeout:g} s (it returned "
                    f"after {timeout + late:.3f} s, the event loop being held meanwhile; "
                    "its answer was dropped)",
                    listener=listener.name,
                )
        return result

    def _no_route(self, target: str | None, qname: str, listener: str | None) -> NoRoute:
        """A NoRoute naming the target, with a hint when the payload's namespace is off."""
        if target is not None:
            if target in self._runtimes:
                reason = f"listener {target!r} does not accept {qname}"
            else:
                reason = f"no listener is named {target!r}"
                close = difflib.get_close_matches(target, list(self._runtimes), n=1)
                if close:
                    reason += f" (did you mean {close[0]!r}?)"
        else:
            reason = f"no listener accepts {qname}"
        local = qname.rpartition("}")[2]
        rt = self._runtimes.get(target) if target is not None else None
        accepted = rt.codecs if rt is not None else self._routes
        others = sorted(q for q in accepted if q != qname and q.rpartition("}")[2] == local)
        if others:
            spaces = " or ".join(repr(q.partition("}")[0].lstrip("{")) for q in others)
            reason += f" (hint: {local} is accepted in the namespace {spaces})"
        return NoRoute(reason, listener=listener)

    async def _plan_forward(self, out: Message, frame: Frame, rt: Runtime, route: Route) -> None:
        listener = rt.listener
        peers = listener.peers
        try:
            if out.to is not None:
                target = self._runtimes.get(out.to)
                if target is None or out.qname not in target.codecs:
                    error = self._no_route(out.to, out.qname, listener.name)
                    # Once per (listener, target) at WARNING; a handler (an LLM's
                    # output, say) can invent targets without end, so only so many.
                    key = (listener.name, out.to)
                    first = key not in self._warned and len(self._warned) < _WARNED_KEPT
                    if first:
                        self._warned.add(key)
                    logger.log(logging.WARNING if first else logging.DEBUG,
                               "%s forwarded to %r: %s", listener.name, out.to,
                               error.reason)  # fmt: skip
                    raise error
                if peers is not None and out.to not in peers:
                    raise PeerDenied(
                        f"{listener.name} may not forward to {out.to!r} (peers: "
                        f"{', '.join(sorted(peers)) or 'none'})",
                        listener=listener.name,
                    )
                targets: tuple[Runtime, ...] = (target,)
            else:
                targets = self._routes.get(out.qname, ())
                if not targets:
                    raise self._no_route(None, out.qname, listener.name)
                if peers is not None:
                    targets = tuple(t for t in targets if t.name in peers)
                    if not targets:
                        raise PeerDenied(
                            f"{listener.name} may not forward {out.qname} "
                            "to any listener accepting it",
                            listener=listener.name,
                        )
            if frame.depth + 1 > self._settings.max_depth:
                raise DepthExceeded(
                    f"forwarding from {listener.name} would exceed max_depth "
                    f"{self._settings.max_depth}",
                    listener=listener.name,
                )
            self._check_room(len(route.deliveries) + len(targets), listener.name)
        except MessageError as exc:
            await self._record(frame, "out", out, out.to)
            route.refuse(exc, out)
            return
        await self._record(frame, "out", out, out.to)
        for target in targets:
            child = await self._frames.child(frame, target.name)
            route.deliveries.append(Delivery(out, target, child, frame, rt))

    async def _plan_respond(self, out: Message, frame: Frame, rt: Runtime, route: Route) -> None:
        parent = await self._frames.parent(frame)
        owner = parent.listener
        if owner is None:
            await self._record(frame, "out", out, parent.origin)
            if out.model is None:
                try:
                    out.model = self._decode_made_in_worker(out)
                except (MessageError, ConfigError) as exc:
                    error = InvalidReturn(
                        f"{rt.name} answered with a payload the pump cannot decode: {exc}",
                        listener=rt.name,
                    )
                    route.refuse(error, out, response=True)
                    return
            await self._record(parent, "in", out, parent.origin)
            reply = Reply(parent.uuid, out.sender, parent.origin, out.id, out.model, out.re)
            route.reply(reply, out)
            return
        await self._record(frame, "out", out, owner)
        target = self._runtimes.get(owner)
        try:
            if target is None or out.qname not in target.codecs:
                raise NoRoute(
                    f"{rt.name} answered {owner!r} with {out.qname}, which it does not accept",
                    listener=rt.name,
                )
            self._check_room(len(route.deliveries) + 1, rt.name)
        except MessageError as exc:
            route.refuse(exc, out, response=True)
            return
        route.deliveries.append(Delivery(out, target, parent, frame, rt))

    def _decode_made_in_worker(self, out: Message) -> BaseModel:
        cls = self._classes.get(out.path or "")
        if cls is None:
            try:
                cls = import_object(out.path or "")
            except Exception as exc:
                raise ConfigError(f"cannot import {out.path!r}: {exc}") from exc
            if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
                raise ConfigError(f"{out.path!r} is not a pydantic model class")
            self._classes[out.path or ""] = cls
        return codec_for(cls).decode(out.element())

    def _check_room(self, count: int, listener: str) -> None:
        limit = self._settings.max_in_pump
        if self._pending + count > limit:
            raise Overloaded(
                f"{listener} sent a message while {self._pending} were inside the pump "
                f"(max_in_pump {limit})",
                listener=listener,
            )

    async def _refuse(
        self, exc: MessageError, out: Message, frame: Frame, rt: Runtime, *, response: bool
    ) -> None:
        """A message a handler emitted cannot be routed: dead letter, and Huh to its sender."""
        stage = "response" if response else "forward"
        await self._dead_letter(exc, out.xml(), stage, rt.name, frame.uuid, out)
        if not out.after_huh:
            await self._send_huh(exc, out, frame, rt, PUMP_SENDER)

    async def _emit(self, reply: Reply, msg: Message | None, *, recorded: bool = False) -> None:
        """Hand a reply to the external sender (and to a request() waiting for it)."""
        node = self._node
        box = OUTBOX.get() if node is not None else None
        tracing = self._tracing
        if tracing is not None and reply.traceparent is None:
            # The context of the delivery that made it (a reply from another node
            # carries its own), so that the caller can continue the trace.
            if msg is not None:
                tracing.stamp(msg)
            trace = msg.trace if msg is not None else tracing.current()
            if trace is not None:
                object.__setattr__(reply, "traceparent", tracing.traceparent(trace))
        if not recorded and reply.thread_id is not None and msg is not None:
            try:
                root = await self._frames.resolve(reply.thread_id)
                if root is not None:
                    await self._record(root, "in", msg, reply.to)
            except BackendError as exc:  # the reply still goes out
                logger.warning("could not record a reply in the history: %s", exc)
        if box is not None and msg is not None and node is not None:
            node.reply(reply, msg, box)  # to the node that accepted the input
            return
        if msg is not None and msg._xml is not None and msg.qname[0] == "{":
            object.__setattr__(reply, "_payload_xml", msg._xml)  # a cache, set once
        self._egress_count += 1
        if self._waiters and msg is not None and msg.cause is not None:
            waiter = self._waiters.pop(msg.cause, None)
            if waiter is not None:
                self._open.pop(msg.cause, None)
                if not waiter.done():
                    waiter.set_result(reply)
        if self._egress is not None:
            try:
                result = self._egress(reply)
                if result is not None:
                    await result
            except Exception as exc:
                self._egress_failures += 1
                if self._egress_failures % 1000 == 1:
                    logger.warning(
                        "egress callback failed (%d so far; replies are dead-lettered): %s: %s",
                        self._egress_failures, type(exc).__name__, exc,
                        exc_info=logger.isEnabledFor(logging.DEBUG),
                    )  # fmt: skip
                error = EgressFailed(f"egress failed: {type(exc).__name__}: {exc}")
                with contextlib.suppress(Exception):
                    # The reply as it would have been written: a replay writes it again.
                    cls = type(reply.payload)
                    await self._dead_letter(
                        error, reply.to_xml(), "egress", None, reply.thread_id, msg,
                        sender=reply.sender, message_id=reply.message_id, to=reply.to,
                        re=reply.re, payload_class=f"{cls.__module__}:{cls.__qualname__}",
                    )  # fmt: skip

    # -- errors ----------------------------------------------------------------

    async def reject(
        self, error: MessageError, data: bytes | None = None, *, sender: str | None = None
    ) -> None:
        """Report input refused before it reached the pump (an over-long line, say).

        It is answered like any rejected ingress: a ``Huh`` through egress
        (addressed to ``sender``) and a dead letter.
        """
        self._ingress += 1
        self._rejected += 1
        self._rejections[error.code] = self._rejections.get(error.code, 0) + 1
        await self._reject(error, data, sender)

    async def replay(self, letter: DeadLetter) -> bool:
        """Feed a dead letter back where it failed. Returns False if it was refused again.

        By the letter's ``stage``:

        * ``delivery``: delivered again to its listener, on the frame where it failed,
          from the same sender: the conversation goes on, and its answer goes where it
          would have gone (to the caller's frame, or out with the conversation's
          thread, sender label and ``<re>``).
        * ``forward`` / ``response``: the message its listener emitted in that frame is
          routed again, as the forward or the response it was.
        * ``egress``: the reply is handed to egress again (no handler runs).
        * ``ingress``, or no stage: fed in as input, as from its first sender.

        A delivery whose frame is gone (expired, evicted) or whose listener no longer
        exists is fed in as new input to that listener instead (logged). A letter
        refused again becomes a new dead letter that keeps the first code and reason,
        one more ``attempts`` and the new refusal as ``last_error``. Claiming the
        letter, so that it is replayed once, is the caller's (see ``deadletters
        replay``, which deletes it atomically first).

        Raises:
            PumpClosed: the pump is not running.
        """
        if not self._running:
            raise PumpClosed("the pump is not running")
        token = _REPLAYING.set(letter)
        try:
            if letter.stage == "egress":
                return await self._replay_reply(letter)
            stage, name, thread = letter.stage, letter.listener, letter.thread_id
            rt = self._runtimes.get(name) if name is not None else None
            if stage in ("delivery", "forward", "response") and rt is not None and thread:
                frame = await self._frames.resolve(thread)
                if frame is not None and frame.listener == rt.name:
                    async with self._as_input():
                        return await self._replay_in_frame(letter, frame, rt)
                logger.warning(
                    "replaying dead letter %s: its frame %s (%s) is gone; fed in as new "
                    "input", letter.id, thread, name,
                )  # fmt: skip
            is_envelope = _ENVELOPE_MARK in letter.data[:400]
            try:
                root = await self._ingest(
                    letter.data,
                    to=None if is_envelope else (letter.listener or letter.to),
                    sender=letter.sender or "replay",
                    thread=None,
                    # Refused input never reserved its <id>: reserved now, so a client
                    # that sends it again meanwhile runs it once. Anything else was
                    # reserved when it was first accepted.
                    reserve=letter.stage == "ingress",
                )
            except MessageError:
                return False
            return root is not None
        finally:
            _REPLAYING.reset(token)

    async def _replay_in_frame(self, letter: DeadLetter, frame: Frame, rt: Runtime) -> bool:
        stage = letter.stage
        try:
            element = parse_bytes(letter.data, self._settings.limits)
            if element.tag == _MESSAGE_TAG:
                element = envelope_from_element(element).payload
        except MessageError as exc:
            await self._dead_letter(exc, letter.data, stage, rt.name, frame.uuid, None,
                                    sender=letter.sender, message_id=letter.message_id,
                                    re=letter.re, to=letter.to)  # fmt: skip
            return False
        qname = str(element.tag)
        if stage == "delivery":
            sender = letter.sender or PUMP_SENDER
            msg = Message(self._new_id(), sender, rt.name, qname, element=element, re=letter.re)
        else:
            msg = Message(self._new_id(), rt.name, letter.to, qname, element=element, re=letter.re)
        msg.cause = self._new_id()
        msg.replayed = letter
        route = Route()
        if stage == "delivery":
            if qname not in rt.codecs:
                route.refuse(self._no_route(rt.name, qname, None), msg)
            else:
                reply_frame = await self._reply_frame_of(letter, frame, sender)
                reply_to = self._runtimes.get(reply_frame.listener or "")
                route.deliveries.append(Delivery(msg, rt, frame, reply_frame, reply_to))
        elif stage == "response":
            await self._plan_respond(msg, frame, rt, route)
        else:
            await self._plan_forward(msg, frame, rt, route)
        if route.deliveries:
            if self._node is not None:
                await self._node.accept(msg, route.deliveries)
            elif not self._running:  # stopped meanwhile: the inboxes were emptied
                raise PumpClosed("the pump stopped before the letter was fed back")
            else:
                for delivery in route.deliveries:
                    self._enqueue(delivery)
        if route.replies is not None:
            for reply, out in route.replies:
                await self._emit(reply, out, recorded=True)
        if route.refusals is None:
            return True
        for error, out, response in route.refusals:
            if stage == "delivery":
                await self._dead_letter(error, letter.data, stage, rt.name, frame.uuid, out)
            else:
                await self._refuse(error, out, frame, rt, response=response)
        return False

    async def _reply_frame_of(self, letter: DeadLetter, frame: Frame, sender: str) -> Frame:
        """Where an error about a replayed delivery goes (as the first time): the frame
        its letter recorded; for a letter without one, the caller's frame when the
        sender is its owner (a forward), else the sender's own frame (a response)."""
        if letter.reply_thread is not None:
            known = await self._frames.resolve(letter.reply_thread)
            if known is not None:
                return known
        parent = await self._frames.parent(frame)
        if sender == (parent.listener if parent.hops else parent.origin):
            return parent
        return await self._frames.child(frame, sender)

    @contextlib.asynccontextmanager
    async def _as_input(self) -> AsyncIterator[None]:
        """A replay feeding something in, counted as input: admitted (it waits while the
        pump is full), held while it is planned, and waited for by a stopping pump."""
        if not self._running:
            raise PumpClosed("the pump is stopping or stopped")
        self._ingesting += 1
        self._ingest_done.clear()
        try:
            await self._admit()
            if not self._running:
                raise PumpClosed("the pump stopped before the letter was fed back")
            self._hold()
            try:
                yield
            finally:
                self._release()
        finally:
            self._ingesting -= 1
            if not self._ingesting:
                self._ingest_done.set()

    async def _replay_reply(self, letter: DeadLetter) -> bool:
        """Hand an egress letter's reply to egress again."""
        try:
            env = envelope_from_element(parse_bytes(letter.data, self._settings.limits))
            cls = import_object(letter.payload_class or "")
            if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
                raise ConfigError(f"{letter.payload_class!r} is not a pydantic model class")
            model = codec_for(cls).decode(env.payload)
        except (MessageError, ConfigError) as exc:
            reason = f"the reply cannot be made again: {exc}"
            await self._dead_letter(EgressFailed(reason), letter.data, "egress", None,
                                    letter.thread_id, None, sender=letter.sender,
                                    message_id=letter.message_id, to=letter.to,
                                    re=letter.re, payload_class=letter.payload_class)  # fmt: skip
            return False
        failures = self._egress_failures
        reply = Reply(env.thread, env.sender, env.to, env.id or self._new_id(), model, env.re)
        await self._emit(reply, None, recorded=True)
        return self._egress_failures == failures

    async def unanswered(self, *, older_than_s: float = 0.0) -> list[Unanswered]:
        """The conversations whose input was accepted and that hold no answer, oldest
        first: what a pump that crashed (or was killed) left unanswered. See
        :func:`unanswered_conversations`."""
        return await unanswered_conversations(self.backend, older_than_s=older_than_s)

    async def replay_conversation(self, thread_id: str, *, again: bool = False) -> bool:
        """Feed an unanswered conversation's input again, into the same conversation:
        its answer goes out on ``thread_id`` with the input's id as ``<re>``.

        Claimed once in the backend (atomically): of replays running at once, one
        feeds it; one already fed back is not fed again unless ``again``. What the
        first attempt did before it stopped stays done (handlers may see the input
        twice: at least once, as after any crash).

        Returns:
            False: not fed (unknown, answered, no input kept, or claimed already).

        Raises:
            PumpClosed: the pump is not running.
        """
        if not self._running:
            raise PumpClosed("the pump is not running")
        root = await self._frames.resolve(thread_id)
        if root is None or root.hops:
            return False
        slots = await self.backend.buffer_get_thread(thread_id)
        if not slots or slots[0].direction != "out" or any(s.direction == "in" for s in slots):
            return False
        claim = f"{_REPLAY_CLAIM}{thread_id}"
        mark = f"{_RESERVED_PREFIX}replay {self._new_id()} {time.time():.3f}"
        if again:
            await self.backend.registry_set(claim, mark)
        elif await self.backend.registry_setdefault(claim, mark) != mark:
            return False
        first = slots[0]
        msg = Message(self._new_id(), root.origin, first.to, first.payload, xml=first.xml,
                      re=first.message_id, cause=self._new_id())  # fmt: skip
        try:
            async with self._as_input():
                try:
                    targets = self._ingress_targets(msg)
                except MessageError as exc:
                    await self._reject(exc, first.xml, root.origin, first.message_id,
                                       to=first.to)  # fmt: skip
                    return False
                children = [await self._frames.child(root, rt.name) for rt in targets]
                deliveries = [Delivery(msg, rt, child, root, None)
                              for rt, child in zip(targets, children, strict=True)]  # fmt: skip
                if self._node is not None:
                    await self._node.accept(msg, deliveries)
                elif not self._running:
                    raise PumpClosed("the pump stopped before the conversation was fed")
                else:
                    for d in deliveries:
                        self._enqueue(d)
        except BaseException:
            # Not fed after all: a later replay must be able to feed it.
            with anyio.CancelScope(shield=True), contextlib.suppress(XmlPipelineError):
                await self.backend.registry_delete(mark)
            raise
        return True

    @staticmethod
    def _backend_failed(exc: BackendError, doing: str, listener: str) -> BackendFailed:
        """What a message fails with when the backend failed ``doing`` something for it:
        ``backend-corrupted`` when the backend lost part of its frame (the message can
        only fail again there: said at ERROR, with what to delete), else
        ``backend-unavailable``."""
        if isinstance(exc, BackendCorrupted):
            logger.error("the backend lost part of a frame, %s: %s", doing, exc)
            return FrameCorrupted(
                f"the backend lost part of this conversation's frames, {doing}: {exc}",
                listener=listener,
            )
        return BackendFailed(f"the backend failed {doing}: {exc}", listener=listener)

    async def _fail(self, d: Delivery, exc: MessageError) -> None:
        rt = d.runtime
        rt.failed += 1
        rt.failures[exc.code] = rt.failures.get(exc.code, 0) + 1
        if self._tracing is not None:
            self._tracing.failed(exc)  # on the span of the delivery (the running one)
        msg = d.message
        data = msg.raw if msg.raw is not None else msg.xml()
        await self._dead_letter(exc, data, "delivery", rt.name, d.frame.uuid, msg,
                                reply_thread=d.reply_frame.uuid)  # fmt: skip
        d.routed = True
        if msg.qname == _HUH_QNAME or msg.after_huh:
            logger.warning(
                "%s failed (%s) on a message about an earlier error; dead-lettered only",
                rt.name,
                exc.code,
            )
            return
        await self._send_huh(exc, msg, d.reply_frame, d.reply_to, rt.name, about=d.frame)

    async def _send_huh(
        self,
        exc: MessageError,
        concerned: Message,
        frame: Frame,
        to: Runtime | None,
        sender: str,
        *,
        about: Frame | None = None,
    ) -> None:
        """Send a Huh about ``concerned`` to ``to`` on ``frame`` (to the external sender
        if ``to`` is None).

        A listener that does not accept ``Huh`` cannot be told: the Huh then goes
        to the conversation's external sender, so the error is never silent.
        """
        huh = huh_for(exc, concerned.xml())
        msg = Message(
            self._new_id(), sender, None, _HUH_QNAME, model=huh,
            re=concerned.re, cause=concerned.cause,
        )  # fmt: skip
        if to is not None and _HUH_QNAME not in to.codecs:
            logger.info(
                "%s does not accept Huh: the %s error goes to the conversation's caller",
                to.name, exc.code,
            )  # fmt: skip
            to = None
            frame = await self._root_of(frame)
        if to is None:
            msg.to = frame.origin
            await self._emit(Reply(frame.root, sender, frame.origin, msg.id, huh, msg.re), msg)
            return
        msg.to = to.name
        self._enqueue(Delivery(msg, to, frame, about or frame, None))

    async def _root_of(self, frame: Frame) -> Frame:
        root = await self._frames.resolve(frame.root)
        return root if root is not None else Frame(frame.root, frame.origin, frame.root, ())

    def _letter(
        self,
        exc: MessageError,
        data: bytes | None,
        stage: str | None,
        listener: str | None = None,
        thread_id: str | None = None,
        msg: Message | None = None,
        **fields: Any,
    ) -> DeadLetter:
        """The dead letter of ``exc`` at ``stage``; ``fields`` override what ``msg``
        says (``sender``, ``message_id``, ``re``, ``to``) or add ``payload_class``.

        A letter being replayed that is refused again keeps its first code and reason,
        one more attempt, and the new refusal as ``last_error``.
        """
        code, reason = exc.code, exc.reason[:_REASON_CHARS]
        attempts, last_error = 1, None
        prior = getattr(msg, "replayed", None) if msg is not None else None
        if prior is None:
            prior = _REPLAYING.get()  # refused again while replay() feeds it
        if prior is not None and (prior.stage, prior.listener) != (stage, listener):
            prior = None  # another step failed (the next hop, say): a letter of its own
        if prior is not None:
            attempts, last_error = prior.attempts + 1, f"{code}: {reason}"
            code, reason = prior.code, prior.reason
        if msg is not None:
            fields = {"sender": msg.sender, "message_id": msg.id, "re": msg.re,
                      "to": msg.to, **fields}  # fmt: skip
        return DeadLetter(
            # Named here, not by the backend: a letter written again (from the spill,
            # after a write that may have been applied) replaces itself, once.
            id=f"dl-{os.urandom(16).hex()}",
            timestamp=time.time(),
            code=code,
            reason=reason,
            listener=listener,
            thread_id=thread_id,
            data=bytes(data or b"")[: self.organism.history.dead_letter_bytes],
            attempts=attempts,
            last_error=last_error,
            stage=stage,
            **{"message_id": None, **fields},
        )

    async def _dead_letter(
        self,
        exc: MessageError,
        data: bytes | None,
        stage: str | None,
        listener: str | None = None,
        thread_id: str | None = None,
        msg: Message | None = None,
        **fields: Any,
    ) -> None:
        self._dead_letters += 1
        letter = self._letter(exc, data, stage, listener, thread_id, msg, **fields)
        if self._spill:  # the backend failed already: this one goes after those
            self._to_spill(letter, None)
            return
        try:
            await self.backend.deadletter_add(letter)
        except XmlPipelineError as error:
            self._to_spill(letter, error)

    # -- the spill: dead letters the backend could not take ---------------------

    def _to_spill(self, letter: DeadLetter, error: XmlPipelineError | None) -> None:
        """Keep ``letter`` until the backend takes it (see :data:`SPILL_LETTERS`)."""
        size = letter_size(letter)
        if len(self._spill) >= SPILL_LETTERS or self._spill_bytes + size > SPILL_BYTES:
            self._spill_dropped += 1
            n = self._spill_dropped
            if n == 1 or n % 1000 == 0:
                logger.warning(
                    "dead letters kept while the backend fails: full (%d letters or %d "
                    "bytes); %d dropped so far (this one %s: %s)",
                    SPILL_LETTERS, SPILL_BYTES, n, letter.code, letter.reason,
                )  # fmt: skip
            return
        if error is not None and not self._spill:
            logger.warning(
                "could not write a dead letter (%s: %s): %s; it is kept in memory (up to "
                "%d letters or %d bytes) and written when the backend answers again",
                letter.code, letter.reason, error, SPILL_LETTERS, SPILL_BYTES,
            )  # fmt: skip
        self._spill.append(letter)
        self._spill_bytes += size
        self._spilled_total += 1
        self._spill_ready.set()

    async def _keep_spilling(self) -> None:
        """Write the spill whenever it holds letters, backing off while the backend
        fails (a task of the pump's task group, until the shutdown)."""
        delay = _SPILL_RETRY_S
        while True:
            await self._spill_ready.wait()
            if await self._write_spill():
                delay = _SPILL_RETRY_S
                continue
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, _SPILL_RETRY_CAP_S)

    async def _write_spill(self) -> bool:
        """Write the spill, oldest first, in batches. False: the backend failed (what
        it took is out of the spill, the rest stays)."""
        spill = self._spill
        written = 0
        while spill:
            batch = list(itertools.islice(spill, _ABANDON_BATCH))
            try:
                await self.backend.deadletter_add_many(batch)
            except BackendUnavailable:
                return False
            except XmlPipelineError as exc:
                # Refused, not unreachable: one letter may be at fault (too large for
                # the store, say); the others are written one by one, it is dropped.
                logger.error("could not write %d kept dead letter(s): %s", len(batch), exc)
                if not await self._write_one_by_one(batch):
                    return False
                continue
            for letter in batch:
                self._unspill(letter)
            written += len(batch)
        self._spill_ready.clear()
        if written:
            logger.warning(
                "wrote %d dead letter(s) kept while the backend failed (%d dropped so far)",
                written, self._spill_dropped,
            )  # fmt: skip
        return True

    async def _write_one_by_one(self, batch: list[DeadLetter]) -> bool:
        for letter in batch:
            try:
                await self.backend.deadletter_add(letter)
            except BackendUnavailable:
                return False
            except XmlPipelineError as exc:
                self._spill_dropped += 1
                logger.error(
                    "dropped a dead letter the backend refuses (%s: %s): %s",
                    letter.code, letter.reason, exc,
                )  # fmt: skip
            self._unspill(letter)
        return True

    def _unspill(self, letter: DeadLetter) -> None:
        """``letter``, written or dropped, leaves the spill (its head)."""
        spill = self._spill
        if spill and spill[0] is letter:
            spill.popleft()
            self._spill_bytes -= letter_size(letter)
