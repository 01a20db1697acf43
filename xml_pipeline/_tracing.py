"""OpenTelemetry spans for the pump's deliveries (the ``otel`` extra; private to the
engine, :mod:`xml_pipeline.pump`).

One span per delivery (kind CONSUMER, named ``process <listener>``) whose parent is
the span of the delivery that produced its message; one span per accepted input
(``receive``), the parent of its first deliveries and a child of the caller's
``<traceparent>`` when it sent one. So a conversation is one trace, across worker
processes (the context travels with each task) and across nodes (in each stream
entry), and a caller that sends a ``<traceparent>`` sees the pump's spans in its own
trace; replies carry the context of the delivery that made them.

The library uses the OpenTelemetry API only: it asks a tracer provider for a tracer
(the one passed to the pump, or the global one the application configured) and never
sets a provider, an exporter or a propagator itself.

Whether the pump traces is decided once, when it starts (:func:`tracing_for`): a pump
that does not trace runs its delivery functions unwrapped, so tracing off costs one
check per message at most (on rare paths). Even a no-op span costs a few microseconds
per message, which is why "the API is installed" alone does not turn tracing on.

A message inside the pump holds its parent as ``Message.trace``: a ``SpanContext``
when it was made in this process, or a W3C ``traceparent`` string when it came from
outside (an envelope, a stream entry); parsed only when a span is started from it.

Only the pump's own spans (a delivery's, an input's) are parents of what the pump
makes: they are kept in a context variable of this module, not read back as
OpenTelemetry's current span, which outside them is whatever span the application had
open (the one around ``async with StreamPump(...)``, say, which every task the pump
starts would otherwise inherit). The pump's long-lived tasks also run in an empty
OpenTelemetry context (:meth:`Tracing.isolate`), so what runs in them (a node's stream
readers, instrumented clients) is not filed under that span either.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .exceptions import ConfigError, MessageError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext, Tracer, TracerProvider

    from ._delivery import Delivery, Message

__all__ = [
    "TRACEPARENT_CHARS",
    "Tracing",
    "traceparent_of",
    "tracing_for",
    "valid_traceparent",
    "worker_context",
    "worker_detach",
]

TRACEPARENT_CHARS = 55
"""The length of a W3C ``traceparent`` (version 00): ``00-<32 hex>-<16 hex>-<2 hex>``."""

# Lower-case hex only, as the W3C spec writes it; version ff is invalid. A later
# version may append fields: those are not accepted here (the only version so far is 00).
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_STATUS_CHARS = 200  # of a failure's reason, as the span's status description

SYSTEM = "xml_pipeline"

# The pump's span running now (a delivery's or an input's), None outside them.
_RUNNING: ContextVar[Span | None] = ContextVar("xml_pipeline span", default=None)


def valid_traceparent(text: str | None) -> str | None:
    """``text`` if it is a valid W3C ``traceparent``, else None (never raises).

    It is outside input: anything but exactly 55 characters of the right shape, with a
    trace id and a parent id that are not all zeros, is ignored rather than refused.
    """
    if text is None or len(text) != TRACEPARENT_CHARS:
        return None
    match = _TRACEPARENT.fullmatch(text)
    if match is None or match[1] == _ZERO_TRACE or match[2] == _ZERO_SPAN:
        return None
    return text


def traceparent_of(trace: SpanContext | str | None) -> str | None:
    """The W3C ``traceparent`` of a message's parent (``Message.trace``); None if it
    has none, or one from outside that is not valid."""
    if trace is None or isinstance(trace, str):
        return valid_traceparent(trace)
    return f"00-{trace.trace_id:032x}-{trace.span_id:016x}-{int(trace.trace_flags):02x}"


def tracing_for(setting: bool | TracerProvider | None) -> Tracing | None:
    """The pump's tracing, decided once at start (None: it does not trace).

    ``None`` (the default) traces only when the application has configured a global
    tracer provider by then (``opentelemetry-instrument``, or its own
    ``trace.set_tracer_provider``); OpenTelemetry not even imported means no. ``True``
    uses the global provider whatever it is; a provider is used as given; ``False``
    never traces.

    Raises:
        ConfigError: tracing asked for (True or a provider) without opentelemetry-api.
    """
    if setting is False:
        return None
    if setting is None:
        if "opentelemetry.trace" not in sys.modules:
            return None  # nobody set a provider up: not worth importing it
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        return Tracing(provider)
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigError(
            f"tracing needs OpenTelemetry: pip install 'xml-pipeline[otel]' ({exc})"
        ) from exc
    return Tracing(trace.get_tracer_provider() if setting is True else setting)


class Tracing:
    """Makes the pump's spans with one tracer."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
        )

        self.tracer: Tracer = provider.get_tracer("xml_pipeline", __version__)
        self._trace = trace
        self._context = context
        self._non_recording = NonRecordingSpan
        self._span_context = SpanContext
        self._flags = TraceFlags
        self._consumer = SpanKind.CONSUMER
        self._error = StatusCode.ERROR
        self._status = Status
        self._invalid = trace.INVALID_SPAN_CONTEXT
        # Deliveries whose function raised, by the delivery: their spans stay open
        # until the pump has said how they failed (see resumed()).
        self._raised: dict[Delivery, Span] = {}

    # -- contexts ----------------------------------------------------------------

    def isolate(self) -> tuple[Any, Any]:
        """Make the context of the running task empty (no span, no OpenTelemetry
        context): the pump's own tasks start from here, not from the context of the
        application's task that entered the pump. Returns what :meth:`restore` takes."""
        return self._context.attach(self._context.Context()), _RUNNING.set(None)

    def restore(self, tokens: tuple[Any, Any]) -> None:
        otel, mine = tokens
        _RUNNING.reset(mine)
        self._context.detach(otel)

    def current(self) -> SpanContext | None:
        """The span context of the pump's span running now (a delivery's or an
        input's); None outside them, whatever span the application has open."""
        span = _RUNNING.get()
        if span is None:
            return None
        ctx = span.get_span_context()
        return ctx if ctx.is_valid else None

    def _parent(self, trace: SpanContext | str | None) -> Any:
        """An OpenTelemetry ``Context`` whose span is ``trace`` (None: a new trace)."""
        if trace is None:
            return self._context.Context()  # not the caller's: a message's own parent only
        if isinstance(trace, str):
            text = valid_traceparent(trace)
            if text is None:
                return self._context.Context()
            trace = self._span_context(
                trace_id=int(text[3:35], 16),
                span_id=int(text[36:52], 16),
                is_remote=True,
                trace_flags=self._flags(int(text[53:55], 16)),
            )
        return self._trace.set_span_in_context(self._non_recording(trace))

    def traceparent_now(self) -> str | None:
        """The W3C ``traceparent`` of the span running now."""
        return self.traceparent(self.current())

    traceparent = staticmethod(traceparent_of)

    def stamp(self, msg: Message) -> None:
        """Give ``msg`` the pump's running span as its parent, unless it has one
        already. Outside the pump's spans it keeps None: its delivery starts a trace."""
        if msg.trace is None:
            msg.trace = self.current()

    # -- spans -------------------------------------------------------------------

    def receive(self, msg: Message, parent: str | None) -> tuple[Span, Any]:
        """Start the span of an input, a child of the caller's ``traceparent`` if any,
        and make it the current one: the span and the token that :meth:`end` takes."""
        span = self.tracer.start_span(
            "receive",
            # No traceparent: the caller's running span, if any (a pump.request()
            # made inside the application's own span, a handler feeding input).
            None if parent is None else self._parent(parent),
            kind=self._consumer,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "receive",
                "messaging.operation.name": "receive",
                "messaging.message.id": msg.id,
                "xml_pipeline.sender": msg.sender,
                "xml_pipeline.payload": msg.qname,
            },
        )
        msg.trace = span.get_span_context()
        return span, (
            self._context.attach(self._trace.set_span_in_context(span)),
            _RUNNING.set(span),
        )

    def end(self, span: Span, token: Any) -> None:
        otel, mine = token
        _RUNNING.reset(mine)
        self._context.detach(otel)
        span.end()

    def refused(self, span: Span, exc: MessageError) -> None:
        self._fail(span, exc.code, exc.reason)

    def wrap(
        self, deliver: Callable[[Delivery], Awaitable[None]]
    ) -> Callable[[Delivery], Awaitable[None]]:
        """``deliver`` run inside a span of its own, the current one meanwhile (so what
        the handler and the pump make meanwhile descends from it).

        When ``deliver`` raises an exception, its span is left open: the caller says
        how the delivery failed inside :meth:`resumed`, which ends it.
        """
        tracer = self.tracer
        trace = self._trace
        attach = self._context.attach
        detach = self._context.detach
        parent_of = self._parent
        kind = self._consumer
        raised = self._raised

        async def traced(d: Delivery) -> None:
            msg = d.message
            frame = d.frame
            name = d.runtime.name
            span = tracer.start_span(
                f"process {name}",
                parent_of(msg.trace),
                kind=kind,
                attributes={
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.destination.name": name,
                    "messaging.message.id": msg.id,
                    "messaging.message.conversation_id": frame.root,
                    "xml_pipeline.thread": frame.uuid,
                    "xml_pipeline.payload": msg.qname,
                    "xml_pipeline.sender": msg.sender,
                    "xml_pipeline.depth": frame.depth,
                },
            )
            token = attach(trace.set_span_in_context(span))
            mine = _RUNNING.set(span)
            ending: Span | None = span
            try:
                await deliver(d)
            except BaseException as exc:
                # Cancelled (the pump stops), a bug in the pump, the backend failing,
                # Redis unreachable (the delivery runs again, with a span of its own):
                # said on the span.
                self._fail(span, type(exc).__name__, str(exc) or type(exc).__name__)
                if isinstance(exc, Exception):
                    # The pump handles it after this returns (a Huh, a retry): the
                    # span stays open for that, until resumed() ends it.
                    raised[d] = span
                    ending = None
                raise
            finally:
                _RUNNING.reset(mine)
                detach(token)
                if ending is not None:
                    ending.end()

        return traced

    @contextlib.contextmanager
    def resumed(self, d: Delivery) -> Iterator[None]:
        """The span of ``d``, whose delivery function raised, current again while
        the pump handles what it raised (so the Huh descends from it and
        :meth:`failed` finds it); ended on leaving."""
        span = self._raised.pop(d, None)
        if span is None:
            yield
            return
        token = self._context.attach(self._trace.set_span_in_context(span))
        mine = _RUNNING.set(span)
        try:
            yield
        finally:
            _RUNNING.reset(mine)
            self._context.detach(token)
            span.end()

    def failed(self, exc: MessageError) -> None:
        """The running delivery failed: its span says how (status, the Huh's code)."""
        span = _RUNNING.get()
        if span is not None and span.is_recording():
            self._fail(span, exc.code, exc.reason)

    def _fail(self, span: Span, code: str, reason: str) -> None:
        span.set_attribute("error.type", code)
        span.set_attribute("xml_pipeline.huh", code)
        span.set_status(self._status(self._error, reason[:_STATUS_CHARS]))


def worker_context(traceparent: str) -> Any:
    """In a worker process: attach ``traceparent`` as the current span's context, so a
    handler's own spans are children of the pump's span around the task. Returns the
    token to detach, or None (OpenTelemetry not installed in the worker)."""
    text = valid_traceparent(traceparent)
    if text is None:
        return None
    try:
        from opentelemetry import context, trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    except ImportError:
        return None
    parent = SpanContext(
        trace_id=int(text[3:35], 16),
        span_id=int(text[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(text[53:55], 16)),
    )
    return context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))


def worker_detach(token: Any) -> None:
    from opentelemetry import context

    context.detach(token)
