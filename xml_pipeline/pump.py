"""The stream pump: ingress → parse → thread → route → listener inbox → handler → route again.

::

    async with StreamPump(load_organism("hello.yaml"), egress=print_reply) as pump:
        await pump.inject(b"<message ...>...</message>")
        await pump.wait_idle()

Each listener runs ``concurrency`` worker tasks, each with its own inbox; a
delivery goes to the inbox chosen by its frame, so the messages of one frame
reach a listener in order while different frames run in parallel. Ingress is
admitted only while fewer than ``queue_size`` messages are inside the pump, so a
slow listener slows ingress down instead of growing memory. Messages produced
inside the pump are routed as objects: they are not re-serialized and re-parsed
unless a target decodes the payload with another class.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import itertools
import logging
import time
import uuid as _uuid
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import urlsplit

from lxml import etree
from pydantic import BaseModel

from ._pool import PoolStatistics, WorkerPool, worker_spec
from ._sync import SyncRunner
from .backends import Backend, DeadLetter, Slot, open_backend
from .backends.memory import MemoryBackend
from .config import Listener, Organism, import_object
from .envelope import (
    ENVELOPE_NAMESPACE,
    Envelope,
    _envelope_around,
    build_envelope,
    envelope_from_element,
)
from .exceptions import (
    Abandoned,
    ConfigError,
    DepthExceeded,
    Duplicate,
    EgressFailed,
    EnvelopeError,
    HandlerFailed,
    HandlerTimeout,
    InvalidReturn,
    MessageError,
    MessageTooLarge,
    NoRoute,
    Overloaded,
    PayloadInvalid,
    PeerDenied,
    XmlPipelineError,
)
from .frame import Frame, FrameRegistry
from .handler import HandlerMetadata, responses_of
from .parser import parse_bytes, parse_trusted
from .payload import Codec, Huh, codec_for
from .routing import RoutingTable

__all__ = ["ListenerStatistics", "PumpStatistics", "Reply", "StreamPump"]

logger = logging.getLogger(__name__)

PUMP_SENDER = "xml_pipeline"
"""The sender of the ``Huh`` messages the pump itself produces."""

_MESSAGE_TAG = "{" + ENVELOPE_NAMESPACE + "}message"
_HUH_QNAME = codec_for(Huh).qname
_EXCERPT_CHARS = 200
_LATENCY_SAMPLES = 4096
_FIRST_IDS_KEPT = 65_536


def _xml_safe(text: str) -> str:
    """``text`` with every character XML cannot carry replaced by U+FFFD."""
    if text.isprintable() and text.isascii():
        return text
    return "".join(
        c if c in "\t\n\r" or ("\x20" <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd") else "\ufffd"
        for c in text
    )


def _excerpt(data: bytes | None) -> str | None:
    """A capped excerpt of some input, holding only characters XML can carry."""
    if not data:
        return None
    return _xml_safe(bytes(data[: _EXCERPT_CHARS * 4]).decode("utf-8", "replace")[:_EXCERPT_CHARS])


def _huh(exc: MessageError, data: bytes | None) -> Huh:
    return Huh(
        code=exc.code,
        message=_xml_safe(exc.reason),
        listener=None if exc.listener is None else _xml_safe(exc.listener),
        excerpt=_excerpt(data),
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """A message that left the pump for an external sender.

    Attributes:
        thread_id: the conversation's root frame (None if the input never got one).
        sender: the listener that answered (or ``xml_pipeline`` for a rejection).
        to: the external sender's label, if known.
        message_id: the reply's id.
        payload: the payload model (a :class:`Huh` for errors).
    """

    thread_id: str | None
    sender: str
    to: str | None
    message_id: str
    payload: BaseModel
    # The payload as the pump serialized it for the history, when it is namespaced:
    # the envelope is then built around these bytes instead of encoding it again.
    _payload_xml: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_xml(self) -> bytes:
        """The reply as one envelope document."""
        if self._payload_xml is not None:
            data = _envelope_around(
                self._payload_xml,
                sender=self.sender,
                to=self.to,
                thread=self.thread_id,
                id=self.message_id,
            )
            if data is not None:
                return data
        return build_envelope(
            sender=self.sender,
            to=self.to,
            thread=self.thread_id,
            id=self.message_id,
            payload=codec_for(type(self.payload)).encode(self.payload),
        )


@dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """Counters of one listener (a snapshot)."""

    received: int
    handled: int
    failed: int
    in_flight: int
    queued: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None


@dataclass(frozen=True, slots=True)
class PumpStatistics:
    """A snapshot of the pump's counters.

    Attributes:
        ingress: messages offered to ingress.
        rejected: ingress messages refused (malformed, too large, bad envelope, no route).
        duplicates: ingress messages ignored as retries of one already accepted
            (same ``<id>`` on the same conversation).
        egress: replies that reached external senders.
        dead_letters: dead letters written.
        in_pump: messages queued or being handled right now.
        listeners: per listener, by name.
        pool: the worker process pool of ``cpu_bound`` listeners (None without one).
    """

    ingress: int
    rejected: int
    duplicates: int
    egress: int
    dead_letters: int
    in_pump: int
    listeners: MappingProxyType[str, ListenerStatistics]
    pool: PoolStatistics | None = None


class _GcTuning:
    """Raises the GC's generation-0 threshold while at least one pump runs.

    Every hop allocates a few dozen short-lived objects while histories keep many
    long-lived ones: with the default threshold (700) the collector runs every few
    hops and costs about a third of the pump's time (benchmarks/relay.py). The
    setting is process-wide, so it is undone when the last pump stops.
    """

    def __init__(self) -> None:
        self.users = 0
        self.saved: tuple[int, int, int] | None = None

    def acquire(self, wanted: int) -> None:
        current = gc.get_threshold()
        if self.users == 0:
            self.saved = current
        self.users += 1
        if current[0] < wanted:
            gc.set_threshold(wanted, current[1], current[2])

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.saved is not None:
            gc.set_threshold(*self.saved)
            self.saved = None


_GC = _GcTuning()


class _Message:
    """A message inside the pump. Payload bytes, element and model are made lazily."""

    __slots__ = (
        "_element",
        "_xml",
        "after_huh",
        "id",
        "model",
        "path",
        "qname",
        "raw",
        "sender",
        "to",
    )

    def __init__(
        self,
        id: str,  # noqa: A002
        sender: str,
        to: str | None,
        qname: str,
        model: BaseModel | None = None,
        element: etree._Element | None = None,
        raw: bytes | None = None,
        xml: bytes | None = None,
        path: str | None = None,
    ) -> None:
        self.id = id
        self.sender = sender
        self.to = to
        self.qname = qname
        self.model = model
        self._element = element
        self.raw = raw
        self._xml = xml
        # The payload class's import path, for a message made in a worker process
        # (decoded in the pump only if it must leave as a model).
        self.path = path
        # Emitted by a handler that was handling a Huh: an error about this message
        # is dead-lettered without another Huh, so Huh handlers cannot loop.
        self.after_huh = False

    def element(self) -> etree._Element:
        element = self._element
        if element is None:
            if self.model is None:
                assert self._xml is not None
                element = self._element = parse_trusted(self._xml)
            else:
                element = self._element = codec_for(type(self.model)).encode(self.model)
        return element

    def xml(self) -> bytes:
        xml = self._xml
        if xml is None:
            model = self.model
            if self._element is None and model is not None:
                xml = self._xml = codec_for(type(model)).encode_bytes(model)
            else:
                xml = self._xml = etree.tostring(self.element())
        return xml


class _Runtime:
    """A listener's inboxes, workers and counters."""

    __slots__ = (
        "codecs",
        "failed",
        "handled",
        "in_flight",
        "inboxes",
        "latencies",
        "latency_n",
        "listener",
        "name",
        "received",
    )

    def __init__(self, listener: Listener, codecs: dict[str, Codec]) -> None:
        self.listener = listener
        self.name = listener.name
        self.codecs = codecs
        self.inboxes: list[asyncio.Queue[_Delivery]] = [
            asyncio.Queue() for _ in range(listener.concurrency)
        ]
        self.received = 0
        self.handled = 0
        self.failed = 0
        self.in_flight = 0
        self.latencies = array("d", bytes(8 * _LATENCY_SAMPLES))
        self.latency_n = 0


class _Delivery:
    __slots__ = ("enqueued", "frame", "message", "reply_frame", "reply_to", "runtime")

    def __init__(
        self,
        message: _Message,
        runtime: _Runtime,
        frame: Frame,
        reply_frame: Frame,
        reply_to: _Runtime | None,
    ) -> None:
        self.message = message
        self.runtime = runtime
        self.frame = frame
        self.reply_frame = reply_frame
        self.reply_to = reply_to
        self.enqueued = time.perf_counter()


Egress = Callable[[Reply], Awaitable[None] | None]


class StreamPump:
    """Runs an organism. Use as an async context manager.

    Args:
        organism: the resolved organism (see :func:`~xml_pipeline.load_organism`).
        backend: a backend to use (not closed by the pump); by default the pump
            opens the organism's backend URL and closes it on exit.
        egress: called with every :class:`Reply` that reaches an external sender.
    """

    def __init__(
        self,
        organism: Organism,
        *,
        backend: Backend | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.organism = organism
        self._settings = organism.settings
        self._owns_backend = backend is None
        self.backend: Backend = (
            backend
            if backend is not None
            else open_backend(organism.backend, organism.history, **organism.backend_options)
        )
        # Cached frames are kept alive (and scanned by the garbage collector): no more
        # of them than the backend keeps threads.
        self._frames = FrameRegistry(
            self.backend, cache_size=max(1024, min(65_536, organism.history.max_threads))
        )
        self._egress = egress
        table = RoutingTable(organism.listeners)
        self._runtimes: dict[str, _Runtime] = {
            listener.name: _Runtime(listener, table.by_listener[listener.name])
            for listener in organism.listeners
        }
        self._routes: dict[str, tuple[_Runtime, ...]] = {
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
        self._waiters: dict[str, collections.deque[asyncio.Future[Reply]]] = {}
        # (sender, <id>) of conversations opened from outside, to spot retries.
        self._first_ids: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._ingesting = 0
        self._ingest_done = asyncio.Event()
        self._ingest_done.set()
        self._sync: dict[str, SyncRunner] = {}
        self._pool: WorkerPool | None = None
        self._classes: dict[str, type[BaseModel]] = {}
        self._pool_stats: PoolStatistics | None = None  # the last, once the pool is closed
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._gc_tuned = False
        self._ingress = 0
        self._rejected = 0
        self._egress_count = 0
        self._dead_letters = 0
        self._duplicates = 0
        self._egress_failures = 0

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> StreamPump:
        if self._running:
            raise RuntimeError("this StreamPump is already running")
        self._loop = asyncio.get_running_loop()
        try:
            await self.backend.ping()
        except BaseException:
            if self._owns_backend:
                await self.backend.aclose()
            raise
        try:
            await self._start_pool()
        except BaseException:
            if self._owns_backend:
                await self.backend.aclose()
            raise
        self._tune_gc()
        for rt in self._runtimes.values():
            if not rt.listener.is_async and not rt.listener.cpu_bound:
                size = min(rt.listener.concurrency, self._settings.sync_threads)
                self._sync[rt.name] = SyncRunner(rt.name, size)
        for rt in self._runtimes.values():
            deliver = self._deliver_offloaded if rt.listener.cpu_bound else self._deliver
            for i, inbox in enumerate(rt.inboxes):
                task = asyncio.create_task(
                    self._worker(rt, inbox, deliver), name=f"listener {rt.name}#{i}"
                )
                self._tasks.append(task)
        self._running = True
        return self

    async def _start_pool(self) -> None:
        offloaded = [rt.listener for rt in self._runtimes.values() if rt.listener.cpu_bound]
        if not offloaded:
            return
        url = self.organism.backend
        if urlsplit(url).scheme == "manager":
            url = getattr(self.backend, "url", url)
        # Workers read a shared store directly only when it is the one the pump uses
        # (a backend object passed in may not be what the organism's URL names).
        shared = urlsplit(url).scheme in ("manager", "redis", "rediss") and (
            self._owns_backend or not isinstance(self.backend, MemoryBackend)
        )
        pool = None
        try:
            spec = worker_spec(self.organism, url if shared else None)
            pool = WorkerPool(self.organism.process_pool, spec)
            await pool.start(watch_timeouts=any(lst.timeout_s for lst in offloaded))
        except ConfigError as exc:
            where = self.organism.path
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from exc
        self._pool = pool

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse new input, cancel every worker, and close the backend if the pump opened it.

        What is still queued or running is dead-lettered (code ``shutdown``); call
        :meth:`drain` first to finish it instead.
        """
        self._running = False
        self._space.set()  # wake ingress waiting for room: it will refuse
        await self._ingest_done.wait()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # Nothing accepted is lost silently: what is still queued is dead-lettered.
        for rt in self._runtimes.values():
            for inbox in rt.inboxes:
                while not inbox.empty():
                    delivery = inbox.get_nowait()
                    await self._abandon(delivery, "queued")
                    self._release()
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(Abandoned("the pump stopped before a reply came"))
        self._waiters.clear()
        for runner in self._sync.values():
            runner.shutdown()
        self._sync.clear()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool_stats = self._pool.statistics()
            self._pool = None
        if self._gc_tuned:
            self._gc_tuned = False
            _GC.release()
        if self._owns_backend:
            await self.backend.aclose()

    def _tune_gc(self) -> None:
        wanted = self._settings.gc_threshold
        if wanted is not None:
            _GC.acquire(wanted)
            self._gc_tuned = True

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
            n = min(rt.latency_n, _LATENCY_SAMPLES)
            p50 = p99 = None
            if n:
                samples = sorted(rt.latencies[:n])
                p50 = samples[int(0.50 * (n - 1))] * 1e3
                p99 = samples[int(0.99 * (n - 1))] * 1e3
            listeners[name] = ListenerStatistics(
                received=rt.received,
                handled=rt.handled,
                failed=rt.failed,
                in_flight=rt.in_flight,
                queued=sum(q.qsize() for q in rt.inboxes),
                latency_p50_ms=p50,
                latency_p99_ms=p99,
            )
        return PumpStatistics(
            ingress=self._ingress,
            rejected=self._rejected,
            duplicates=self._duplicates,
            egress=self._egress_count,
            dead_letters=self._dead_letters,
            in_pump=self._pending,
            listeners=MappingProxyType(listeners),
            pool=self._pool_stats if self._pool is None else self._pool.statistics(),
        )

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

        Concurrent requests on one conversation get its replies in order of arrival.

        Raises:
            MessageError: ingress rejected the message (the ``Huh`` it got says why);
                :class:`Duplicate` for a retry of a message already accepted.
            Abandoned: the pump stopped before a reply came.
            TimeoutError: no reply within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        roots: list[str] = []

        def watch(frame: Frame) -> None:
            roots.append(frame.uuid)
            self._waiters.setdefault(frame.uuid, collections.deque()).append(future)

        error: list[MessageError] = []
        await self._ingest(
            message, to=to, sender=sender, thread=thread, on_root=watch, on_reject=error.append
        )
        try:
            if error and not roots:
                raise error[0]
            async with asyncio.timeout(timeout):
                return await future
        finally:
            for root in roots:
                waiters = self._waiters.get(root)
                if waiters is not None and future in waiters:
                    waiters.remove(future)
                    if not waiters:
                        del self._waiters[root]

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
        on_root: Callable[[Frame], None] | None = None,
        on_reject: Callable[[MessageError], None] | None = None,
    ) -> str | None:
        if not self._running:
            raise RuntimeError("the pump is not running (use 'async with StreamPump(...)')")
        self._ingress += 1
        self._ingesting += 1
        self._ingest_done.clear()
        try:
            await self._admit()
            if not self._running:
                raise RuntimeError("the pump stopped before accepting this message")
            return await self._ingest_admitted(
                message, to=to, sender=sender, thread=thread, on_root=on_root, on_reject=on_reject
            )
        finally:
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
        on_root: Callable[[Frame], None] | None,
        on_reject: Callable[[MessageError], None] | None,
    ) -> str | None:
        self._hold()
        raw: bytes | None = None
        root: Frame | None = None
        env: Envelope | None = None
        try:
            try:
                if isinstance(message, BaseModel):
                    codec = codec_for(type(message))
                    env = Envelope(sender, to, thread, None, codec.encode(message))
                    msg = _Message(self._new_id(), sender, to, codec.qname, model=message)
                else:
                    raw = self._raw_bytes(message)
                    element = parse_bytes(raw, self._settings.limits)
                    if element.tag == _MESSAGE_TAG:
                        env = envelope_from_element(element)
                        if env.to is None and to is not None:
                            env = Envelope(env.sender, to, env.thread, env.id, env.payload)
                    else:
                        env = Envelope(sender, to, thread, None, element)
                    msg = _Message(
                        env.id or self._new_id(), env.sender, env.to, env.qname,
                        element=env.payload, raw=raw,
                    )  # fmt: skip
                if _xml_safe(env.sender) != env.sender:
                    raise EnvelopeError("the sender label holds characters XML cannot carry")
                targets = self._ingress_targets(msg)
            except MessageError as exc:
                self._rejected += 1
                if on_reject is not None:
                    on_reject(exc)
                label = env.sender if env is not None and _xml_safe(env.sender) == env.sender else (
                    sender if _xml_safe(sender) == sender else None
                )  # fmt: skip
                if raw is None and isinstance(message, str):
                    raw = message[: self.organism.history.dead_letter_bytes].encode("utf-8")
                await self._reject(exc, raw, label)
                return None
            if env.thread is not None:
                known = await self._frames.resolve(env.thread)
                if known is not None and not known.hops:
                    root = known
            retry_of = await self._retry_of(env, root)
            if retry_of is not None:
                self._duplicates += 1
                logger.info("message %r from %r is a retry; ignored", env.id, env.sender)
                if on_reject is not None:
                    on_reject(Duplicate(f"message {env.id!r} was already accepted"))
                return retry_of
            if root is None:
                root = await self._frames.new_root(env.sender)
                if env.id is not None:
                    self._remember_first_id(env.sender, env.id, root.uuid)
            if on_root is not None:
                on_root(root)
            await self._record(root, "out", msg, msg.to)
            for rt in targets:
                child = await self._frames.child(root, rt.name)
                self._enqueue(_Delivery(msg, rt, child, root, None))
            return root.uuid
        finally:
            self._release()

    async def _retry_of(self, env: Envelope, root: Frame | None) -> str | None:
        """The conversation that already accepted this message, if it is a retry."""
        if env.id is None:
            return None
        if root is not None:
            seen = await self.backend.buffer_contains(root.uuid, env.id, "out")
            return root.uuid if seen else None
        return self._first_ids.get((env.sender, env.id))

    def _remember_first_id(self, sender: str, message_id: str, root: str) -> None:
        first = self._first_ids
        first[(sender, message_id)] = root
        if len(first) > _FIRST_IDS_KEPT:
            first.popitem(last=False)

    def _raw_bytes(self, message: bytes | str) -> bytes:
        cap = self._settings.limits.max_bytes
        if isinstance(message, str):
            # A character is at least one byte: refuse before encoding a huge string.
            if len(message) > cap:
                raise MessageTooLarge(f"message is over {cap} bytes; the limit is {cap}")
            return message.encode("utf-8")
        return message if type(message) is bytes else bytes(message)

    def _ingress_targets(self, msg: _Message) -> tuple[_Runtime, ...]:
        if msg.to is not None:
            rt = self._runtimes.get(msg.to)
            if rt is None or msg.qname not in rt.codecs:
                raise NoRoute(f"no listener {msg.to!r} accepts {msg.qname}")
            return (rt,)
        targets = self._routes.get(msg.qname)
        if not targets:
            raise NoRoute(f"no listener accepts {msg.qname}")
        return targets

    async def _reject(self, exc: MessageError, raw: bytes | None, label: str | None) -> None:
        logger.info("rejected at ingress (%s): %s", exc.code, exc.reason)
        await self._dead_letter(exc, raw, None, None, None)
        await self._emit(Reply(None, PUMP_SENDER, label, self._new_id(), _huh(exc, raw)), None)

    # -- delivery --------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _enqueue(self, delivery: _Delivery) -> None:
        rt = delivery.runtime
        self._hold()
        rt.received += 1
        inboxes = rt.inboxes
        inboxes[hash(delivery.frame.uuid) % len(inboxes)].put_nowait(delivery)

    async def _worker(
        self,
        rt: _Runtime,
        inbox: asyncio.Queue[_Delivery],
        deliver: Callable[[_Delivery], Awaitable[None]],
    ) -> None:
        while True:
            delivery = await inbox.get()
            rt.in_flight += 1
            try:
                await deliver(delivery)
            except asyncio.CancelledError:
                await self._abandon(delivery, "running")
                raise
            except Exception as exc:  # a bug in the pump itself: keep serving
                logger.exception("internal error delivering to %s", rt.name)
                error = HandlerFailed(
                    f"internal error: {type(exc).__name__}: {exc}", listener=rt.name
                )
                try:
                    await self._fail(delivery, error)
                except Exception:
                    logger.exception("could not report an internal error")
            finally:
                rt.in_flight -= 1
                n = rt.latency_n
                rt.latencies[n % _LATENCY_SAMPLES] = time.perf_counter() - delivery.enqueued
                rt.latency_n = n + 1
                self._release()

    async def _record(self, frame: Frame, direction: str, msg: _Message, to: str | None) -> None:
        await self.backend.buffer_append(
            frame.uuid,
            Slot(0, direction, msg.sender, to, msg.qname, msg.id, time.time(), msg.xml()),  # type: ignore[arg-type]
        )

    async def _deliver(self, d: _Delivery) -> None:
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
        meta = HandlerMetadata(
            *self._meta_of(d),
            functools.partial(self.backend.buffer_get_thread, frame.uuid),
            self._loop,
        )
        try:
            result = await self._call(listener, model, meta)
            responses = responses_of(listener.name, result)
        except MessageError as exc:
            await self._fail(d, exc)
            return
        after_huh = msg.qname == _HUH_QNAME
        outs: list[tuple[bool, _Message]] = []
        for response in responses:
            payload = response.payload
            out = _Message(
                self._new_id(),
                listener.name,
                response.to,
                codec_for(type(payload)).qname,
                model=payload,
            )
            out.after_huh = after_huh
            outs.append((response.is_response, out))
        try:
            for _, out in outs:
                out.xml()  # serialized once, for the history; refuses what XML cannot carry
        except ValueError as exc:
            await self._fail(
                d,
                InvalidReturn(
                    f"{listener.name} returned a payload XML cannot carry: {exc}",
                    listener=listener.name,
                ),
            )
            return
        await self._send_outs(d, outs)

    @staticmethod
    def _meta_of(d: _Delivery) -> tuple[str, str, str, str, bool, int, bool]:
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

    async def _send_outs(self, d: _Delivery, outs: list[tuple[bool, _Message]]) -> None:
        rt = d.runtime
        frame = d.frame
        for is_response, out in outs:
            if is_response:
                await self._respond(out, frame, rt)
            else:
                await self._forward(out, frame, rt)
        rt.handled += 1

    async def _deliver_offloaded(self, d: _Delivery) -> None:
        """Deliver to a cpu_bound listener: its handler runs in a worker process."""
        rt = d.runtime
        msg = d.message
        listener = rt.listener
        frame = d.frame
        pool = self._pool
        assert pool is not None
        await self._record(frame, "in", msg, listener.name)
        history = None
        if listener.history_snapshot:
            history = [tuple(s) for s in await self.backend.buffer_get_thread(frame.uuid)]
        meta = self._meta_of(d)
        try:
            results = await pool.run(listener.name, msg.xml(), meta, history, listener.timeout_s)
        except MessageError as exc:
            await self._fail(d, exc)
            return
        after_huh = msg.qname == _HUH_QNAME
        outs: list[tuple[bool, _Message]] = []
        for to, is_response, qname, path, xml in results:
            out = _Message(self._new_id(), listener.name, to, qname, xml=xml, path=path)
            out.after_huh = after_huh
            outs.append((is_response, out))
        await self._send_outs(d, outs)

    async def _call(self, listener: Listener, model: BaseModel, meta: HandlerMetadata) -> Any:
        timeout = listener.timeout_s
        try:
            if listener.is_async:
                if timeout is None:
                    return await listener.handler(model, meta)
                async with asyncio.timeout(timeout) as scope:
                    return await listener.handler(model, meta)
            future = self._sync[listener.name].submit(listener.handler, model, meta)
            if timeout is None:
                return await future
            async with asyncio.timeout(timeout) as scope:
                return await future
        except TimeoutError as exc:
            if timeout is not None and scope.expired():
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
        except Exception as exc:
            logger.warning("handler of %s raised %s: %s", listener.name, type(exc).__name__, exc,
                           exc_info=logger.isEnabledFor(logging.DEBUG))  # fmt: skip
            raise HandlerFailed(
                f"{listener.name} raised {type(exc).__name__}: {exc}", listener=listener.name
            ) from exc

    async def _forward(self, out: _Message, frame: Frame, rt: _Runtime) -> None:
        listener = rt.listener
        peers = listener.peers
        try:
            if out.to is not None:
                target = self._runtimes.get(out.to)
                if target is None or out.qname not in target.codecs:
                    raise NoRoute(
                        f"no listener {out.to!r} accepts {out.qname}", listener=listener.name
                    )
                if peers is not None and out.to not in peers:
                    raise PeerDenied(
                        f"{listener.name} may not forward to {out.to!r} (peers: "
                        f"{', '.join(sorted(peers)) or 'none'})",
                        listener=listener.name,
                    )
                targets: tuple[_Runtime, ...] = (target,)
            else:
                targets = self._routes.get(out.qname, ())
                if not targets:
                    raise NoRoute(f"no listener accepts {out.qname}", listener=listener.name)
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
            self._check_room(len(targets), listener.name)
        except MessageError as exc:
            await self._record(frame, "out", out, out.to)
            await self._refuse(exc, out, frame, rt)
            return
        await self._record(frame, "out", out, out.to)
        for target in targets:
            child = await self._frames.child(frame, target.name)
            self._enqueue(_Delivery(out, target, child, frame, rt))

    async def _respond(self, out: _Message, frame: Frame, rt: _Runtime) -> None:
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
                    await self._refuse(error, out, frame, rt)
                    return
            await self._emit(Reply(parent.uuid, out.sender, parent.origin, out.id, out.model), out)
            return
        await self._record(frame, "out", out, owner)
        target = self._runtimes.get(owner)
        try:
            if target is None or out.qname not in target.codecs:
                raise NoRoute(
                    f"{rt.name} answered {owner!r} with {out.qname}, which it does not accept",
                    listener=rt.name,
                )
            self._check_room(1, rt.name)
        except MessageError as exc:
            await self._refuse(exc, out, frame, rt)
            return
        self._enqueue(_Delivery(out, target, parent, frame, rt))

    def _decode_made_in_worker(self, out: _Message) -> BaseModel:
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

    async def _refuse(self, exc: MessageError, out: _Message, frame: Frame, rt: _Runtime) -> None:
        """A message a handler emitted cannot be routed: dead letter, and Huh to its sender."""
        await self._dead_letter(exc, out.xml(), rt.name, frame.uuid, out.id)
        if not out.after_huh:
            await self._send_huh(exc, out.xml(), frame, rt, PUMP_SENDER)

    async def _emit(self, reply: Reply, msg: _Message | None) -> None:
        if reply.thread_id is not None and msg is not None:
            root = await self._frames.resolve(reply.thread_id)
            if root is not None:
                await self._record(root, "in", msg, reply.to)
        if msg is not None and msg._xml is not None and msg.qname[0] == "{":
            object.__setattr__(reply, "_payload_xml", msg._xml)  # a cache, set once
        self._egress_count += 1
        if reply.thread_id is not None:
            waiters = self._waiters.get(reply.thread_id)
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
                    break
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
                    data = msg.xml() if msg is not None else None
                    await self._dead_letter(error, data, None, reply.thread_id, reply.message_id)

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
        await self._reject(error, data, sender)

    async def _abandon(self, d: _Delivery, state: str) -> None:
        msg = d.message
        exc = Abandoned(f"{state} for {d.runtime.name} when the pump stopped")
        logger.warning("dead-lettering message %s: %s", msg.id, exc.reason)
        with contextlib.suppress(Exception):
            await self._dead_letter(exc, msg.raw if msg.raw is not None else msg.xml(),
                                    d.runtime.name, d.frame.uuid, msg.id)  # fmt: skip

    async def _fail(self, d: _Delivery, exc: MessageError) -> None:
        rt = d.runtime
        rt.failed += 1
        msg = d.message
        data = msg.raw if msg.raw is not None else msg.xml()
        await self._dead_letter(exc, data, rt.name, d.frame.uuid, msg.id)
        if msg.qname == _HUH_QNAME or msg.after_huh:
            logger.warning(
                "%s failed (%s) on a message about an earlier error; dead-lettered only",
                rt.name,
                exc.code,
            )
            return
        await self._send_huh(exc, msg.xml(), d.reply_frame, d.reply_to, rt.name, about=d.frame)

    async def _send_huh(
        self,
        exc: MessageError,
        data: bytes | None,
        frame: Frame,
        to: _Runtime | None,
        sender: str,
        *,
        about: Frame | None = None,
    ) -> None:
        """Send a Huh to ``to`` on ``frame`` (to the external sender if ``to`` is None)."""
        huh = _huh(exc, data)
        msg = _Message(self._new_id(), sender, None, _HUH_QNAME, model=huh)
        if to is None:
            msg.to = frame.origin
            await self._emit(Reply(frame.root, sender, frame.origin, msg.id, huh), msg)
            return
        if _HUH_QNAME not in to.codecs:
            logger.warning(
                "%s does not accept Huh; the %s error was only dead-lettered", to.name, exc.code
            )
            return
        msg.to = to.name
        self._enqueue(_Delivery(msg, to, frame, about or frame, None))

    async def _dead_letter(
        self,
        exc: MessageError,
        data: bytes | None,
        listener: str | None,
        thread_id: str | None,
        message_id: str | None,
    ) -> None:
        self._dead_letters += 1
        letter = DeadLetter(
            id="",
            timestamp=time.time(),
            code=exc.code,
            reason=exc.reason,
            listener=listener,
            thread_id=thread_id,
            message_id=message_id,
            data=bytes(data or b"")[: self.organism.history.dead_letter_bytes],
        )
        try:
            await self.backend.deadletter_add(letter)
        except XmlPipelineError:
            logger.exception("could not write a dead letter (%s: %s)", exc.code, exc.reason)
