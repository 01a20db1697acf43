"""What leaves the pump: :class:`Reply` records and the statistics snapshots.

These are public value types; :mod:`xml_pipeline.pump` is the engine that makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from pydantic import BaseModel

from .envelope import _envelope_around, build_envelope
from .exceptions import error_for_code
from .offload import PoolStatistics
from .payload import Huh, codec_for

__all__ = ["ListenerStatistics", "PumpStatistics", "Reply", "Unanswered"]


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A conversation whose input was accepted and that has no answer in its history
    (see :meth:`StreamPump.unanswered <xml_pipeline.StreamPump.unanswered>`).

    Attributes:
        thread_id: the conversation's id (its root frame).
        sender: the outside sender's label.
        to: the listener the input was addressed to, if it named one.
        message_id: the input's id (its ``<id>``, or the one the pump gave it): what
            the answer's ``<re>`` will be.
        payload: the input's payload class, ``{namespace}local``.
        timestamp: when it was accepted (seconds since the epoch).
        replayed: already fed back by ``replay_conversation``.
    """

    thread_id: str
    sender: str
    to: str | None
    message_id: str
    payload: str
    timestamp: float
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """A message that left the pump for an external sender.

    Attributes:
        thread_id: the conversation's root frame (None if the input never got one).
        sender: the listener that answered (or ``xml_pipeline`` for a rejection).
        to: the external sender's label, if known.
        message_id: the reply's id.
        payload: the payload model (a :class:`Huh` for errors).
        re: the id of the external message this reply answers (its ``<id>``, or
            the one the pump gave it): what a client matches replies by.
        traceparent: the W3C trace context of the delivery that made the reply, when
            the pump traces (written in the envelope's ``<meta>``).
    """

    thread_id: str | None
    sender: str
    to: str | None
    message_id: str
    payload: BaseModel
    re: str | None = None
    traceparent: str | None = None
    # The payload as the pump serialized it for the history, when it is namespaced:
    # the envelope is then built around these bytes instead of encoding it again.
    _payload_xml: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_huh(self) -> bool:
        """Whether the reply is an error report (a :class:`Huh`)."""
        return isinstance(self.payload, Huh)

    def raise_for_huh(self) -> Reply:
        """Raise the error a ``Huh`` reply reports; return the reply itself otherwise.

        ::

            reply = (await pump.request(data, to="greeter")).raise_for_huh()

        Raises:
            MessageError: the subclass named by the Huh's ``code`` (:class:`HandlerFailed`
                for ``handler-error``, :class:`MalformedMessage` for ``malformed``, …),
                with the Huh's message and listener.
        """
        payload = self.payload
        if isinstance(payload, Huh):
            raise error_for_code(payload.code, payload.message, listener=payload.listener)
        return self

    def to_xml(self) -> bytes:
        """The reply as one envelope document."""
        if self._payload_xml is not None:
            data = _envelope_around(
                self._payload_xml,
                sender=self.sender,
                to=self.to,
                thread=self.thread_id,
                id=self.message_id,
                re=self.re,
                traceparent=self.traceparent,
            )
            if data is not None:
                return data
        return build_envelope(
            sender=self.sender,
            to=self.to,
            thread=self.thread_id,
            id=self.message_id,
            re=self.re,
            traceparent=self.traceparent,
            payload=codec_for(type(self.payload)).encode(self.payload),
        )


@dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """Counters of one listener (a snapshot).

    Attributes:
        blocked: times a step of its ``async def`` handler held the event loop for
            ``pump.blocked_loop_s`` or longer (every other listener waited meanwhile).
        blocked_max_ms: the longest of those steps (None: none).
        failures: ``failed`` by the ``Huh`` code of each failure (``handler-error``,
            ``timeout``, ``peer-denied``, …).
    """

    received: int
    handled: int
    failed: int
    in_flight: int
    queued: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    blocked: int = 0
    blocked_max_ms: float | None = None
    failures: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class PumpStatistics:
    """A snapshot of the pump's counters.

    Attributes:
        ingress: messages offered to ingress.
        rejected: ingress messages refused (malformed, too large, bad envelope, no route).
        rejections: ``rejected`` by the ``Huh`` code of each refusal.
        duplicates: ingress messages ignored as retries of one already accepted
            (same sender label and ``<id>``).
        egress: replies that reached external senders.
        dead_letters: dead letters made (written, or kept in the spill until the
            backend takes them).
        abandoned: messages dead-lettered because the pump stopped before handling
            them (code ``shutdown``; counted in ``dead_letters`` too).
        in_pump: messages queued or being handled right now.
        listeners: per listener, by name.
        pool: the worker process pool of ``cpu_bound`` listeners (None without one).
        blocked_loop: times the event loop was held for ``pump.blocked_loop_s`` or
            longer: by a listener's handler (the listeners' ``blocked`` add up to part
            of it) or by anything else (a task a handler started, an egress callback).
        spilled: dead letters the backend could not take, kept in the pump's memory
            right now; they are written as soon as it answers again (and at shutdown,
            within ``drain_timeout_s``).
        spilled_total: dead letters kept in the spill since the pump started.
        spill_dropped: dead letters lost: the spill was full (1,000 letters or 16 MiB),
            or the backend refused the letter itself.
    """

    ingress: int
    rejected: int
    duplicates: int
    egress: int
    dead_letters: int
    in_pump: int
    listeners: MappingProxyType[str, ListenerStatistics]
    pool: PoolStatistics | None = None
    abandoned: int = 0
    blocked_loop: int = 0
    spilled: int = 0
    spilled_total: int = 0
    spill_dropped: int = 0
    rejections: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))
