"""The pump's working records: a message inside the pump, a listener's runtime, a
delivery in an inbox, the plan of what a handler's outputs do, and the ``Huh`` made
from an error. Private to the engine (:mod:`xml_pipeline.pump`)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from array import array
from collections import deque
from typing import Any

from lxml import etree
from pydantic import BaseModel

from .backends.base import DeadLetter
from .config import Listener
from .exceptions import MessageError
from .frame import Frame
from .parser import parse_trusted
from .payload import Codec, Huh, codec_for
from .reply import Reply

__all__ = [
    "CURRENT_DELIVERY",
    "LATENCY_BUCKETS",
    "LATENCY_SAMPLES",
    "Delivery",
    "Message",
    "Route",
    "Runtime",
    "excerpt",
    "huh_for",
    "log_fields",
    "xml_safe",
]

_EXCERPT_CHARS = 200
LATENCY_SAMPLES = 4096  # a listener's latency ring (statistics' p50/p99)
# The upper bounds (seconds) of a listener's latency histogram, kept only while metrics
# are exported (see xml_pipeline.metrics): from 100 µs (one hop is ~30 µs) to a minute.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def xml_safe(text: str) -> str:
    """``text`` with every character XML cannot carry replaced by U+FFFD."""
    if text.isprintable() and text.isascii():
        return text
    return "".join(
        c if c in "\t\n\r" or ("\x20" <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd") else "\ufffd"
        for c in text
    )


def excerpt(data: bytes | None) -> str | None:
    """A capped excerpt of some input, holding only characters XML can carry."""
    if not data:
        return None
    return xml_safe(bytes(data[: _EXCERPT_CHARS * 4]).decode("utf-8", "replace")[:_EXCERPT_CHARS])


def huh_for(exc: MessageError, data: bytes | None) -> Huh:
    return Huh(
        code=exc.code,
        message=xml_safe(exc.reason),
        listener=None if exc.listener is None else xml_safe(exc.listener),
        excerpt=excerpt(data),
    )


class Message:
    """A message inside the pump. Payload bytes, element and model are made lazily."""

    __slots__ = (
        "_element",
        "_xml",
        "after_huh",
        "cause",
        "id",
        "model",
        "path",
        "qname",
        "raw",
        "re",
        "replayed",
        "sender",
        "to",
        "trace",
    )

    # Set only on a message fed back by StreamPump.replay (never read on the hot path):
    # its refusal keeps the dead letter's history.
    replayed: DeadLetter

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
        re: str | None = None,
        cause: str | None = None,
    ) -> None:
        self.id = id
        # The id of the external message this one descends from (egress's <re>), and
        # a pump-unique name of that message, which request() matches replies by.
        self.re = re
        self.cause = cause
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
        # Its parent span, when the pump traces (see _tracing): a SpanContext made
        # here, or a W3C traceparent from outside (an envelope, a stream entry).
        self.trace: Any = None

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


class Runtime:
    """A listener's inbox, the frames its workers hold, and its counters.

    One inbox (a FIFO) feeds every worker of the listener, so a free worker takes
    the next delivery whatever its frame. For an ordered listener, ``held`` maps each
    frame a worker is handling to the deliveries of that frame taken from the inbox
    meanwhile (None: none yet): the worker holding the frame runs them next, in order
    (see ``StreamPump._worker``). An unordered listener has no ``held``.
    """

    __slots__ = (
        "blocked",
        "blocked_max",
        "buckets",
        "codecs",
        "failed",
        "failures",
        "handled",
        "held",
        "in_flight",
        "inbox",
        "latencies",
        "latency_n",
        "latency_sum",
        "listener",
        "name",
        "parked",
        "received",
    )

    def __init__(self, listener: Listener, codecs: dict[str, Codec]) -> None:
        self.listener = listener
        self.name = listener.name
        self.codecs = codecs
        # Unbounded: what enters the pump is bounded by queue_size (admission).
        self.inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self.held: dict[str, deque[Delivery] | None] | None = {} if listener.ordered else None
        self.parked = 0  # deliveries waiting in held for their frame's worker
        self.received = 0
        self.handled = 0
        self.failed = 0
        self.in_flight = 0
        self.latencies = array("d", bytes(8 * LATENCY_SAMPLES))
        self.latency_n = 0
        # Failures by Huh code (not on the path of a message that succeeds).
        self.failures: dict[str, int] = {}
        # The latency histogram: a count per LATENCY_BUCKETS bound plus one for +Inf
        # (not cumulative), and the sum of the latencies; None unless metrics are on.
        # Counted since it was switched on, never from the sliding ring above: a
        # Prometheus histogram's buckets are counts since start.
        self.buckets: array[int] | None = None
        self.latency_sum = 0.0
        # Steps of its async handler that held the event loop (see _blocking), and
        # the longest of them in seconds.
        self.blocked = 0
        self.blocked_max = 0.0


class Delivery:
    __slots__ = (
        "enqueued",
        "entry",
        "frame",
        "message",
        "node",
        "reply_frame",
        "reply_to",
        "routed",
        "runtime",
    )

    def __init__(
        self,
        message: Message,
        runtime: Runtime,
        frame: Frame,
        reply_frame: Frame,
        reply_to: Runtime | None,
    ) -> None:
        self.message = message
        self.runtime = runtime
        self.frame = frame
        self.reply_frame = reply_frame
        self.reply_to = reply_to
        self.enqueued = time.perf_counter()
        # Its outcome is settled (outputs enqueued, or a dead letter written): a stop
        # that catches its worker afterwards must not dead-letter it as well.
        self.routed = False
        # Read from a Redis Streams inbox: the entry, committed when it ends, and the
        # node that accepted its conversation (None on the in-process path).
        self.entry: Any = None
        self.node: str | None = None


# The delivery whose handler runs in this context, for log records (xml_pipeline.log).
# Set only by a pump made with log_context=True (see StreamPump._in_log_context).
CURRENT_DELIVERY: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "xml_pipeline delivery", default=None
)


def log_fields(d: Delivery) -> dict[str, str]:
    """The fields a log record about the delivery ``d`` carries (``extra=``)."""
    return {
        "conversation": d.frame.root,
        "frame": d.frame.uuid,
        "listener": d.runtime.name,
        "message_id": d.message.id,
    }


class Route:
    """What a handler's outputs do, worked out before any of it is done.

    (Replies and refusals are rare on most hops: their lists are made on demand.)
    """

    __slots__ = ("deliveries", "refusals", "replies")

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.replies: list[tuple[Reply, Message]] | None = None
        # (why, the output, whether it was a response rather than a forward)
        self.refusals: list[tuple[MessageError, Message, bool]] | None = None

    def reply(self, reply: Reply, out: Message) -> None:
        if self.replies is None:
            self.replies = []
        self.replies.append((reply, out))

    def refuse(self, error: MessageError, out: Message, *, response: bool = False) -> None:
        if self.refusals is None:
            self.refusals = []
        self.refusals.append((error, out, response))
