"""OpenTelemetry tracing: one span per delivery, parented by the delivery that made its
message, continued from and written to ``<traceparent>``, across worker processes.

Each test passes its own SDK ``TracerProvider`` (with an in-memory exporter) to the
pump: nothing here sets OpenTelemetry's global provider, which a process can set once.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import worker_handlers as wh
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from support import Ping, Pong, boom, ping_xml

from xml_pipeline import (
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
    Organism,
    ProcessPoolSettings,
    Reply,
    StreamPump,
    load_organism,
)
from xml_pipeline.backends.base import Slot
from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.envelope import ENVELOPE_NAMESPACE, build_envelope, parse_envelope
from xml_pipeline.exceptions import BackendUnavailable

ORGANISMS = Path(__file__).resolve().parent.parent / "organisms"
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
GREETING = b'<Greeting xmlns="https://example.org/hello"><name>Ada</name></Greeting>'


class Spans:
    """A tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]


@pytest.fixture
def spans() -> Iterator[Spans]:
    kept = Spans()
    yield kept
    kept.provider.shutdown()


def span_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    if ctx is None:
        raise AssertionError(f"span {span.name} has no context")
    return ctx.span_id


def trace_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    if ctx is None:
        raise AssertionError(f"span {span.name} has no context")
    return ctx.trace_id


def traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    if ctx is None:
        raise AssertionError(f"span {span.name} has no context")
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def tree(spans: list[ReadableSpan]) -> list[tuple[int, str, str]]:
    """The spans as (depth, name, payload local name), depth-first by start time."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {span_id(s) for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None else None
        by_parent.setdefault(parent if parent in ids else None, []).append(s)
    out: list[tuple[int, str, str]] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0):
            payload = str((s.attributes or {}).get("xml_pipeline.payload", ""))
            out.append((depth, s.name, payload.rpartition("}")[2]))
            walk(span_id(s), depth + 1)

    walk(None, 0)
    return out


def hello(tmp_path: Path, *, cpu_bound: bool = False) -> Organism:
    """organisms/hello.yaml, its shouter in worker processes if ``cpu_bound``."""
    if not cpu_bound:
        return load_organism(ORGANISMS / "hello.yaml")
    text = (ORGANISMS / "hello.yaml").read_text()
    marker = "    concurrency: 4\n"
    if marker not in text:
        raise AssertionError("hello.yaml changed: its shouter cannot be made cpu_bound")
    (tmp_path / "hello.yaml").write_text(text.replace(marker, marker + "    cpu_bound: true\n"))
    shutil.copy(ORGANISMS / "hello.py", tmp_path / "hello.py")
    return load_organism(tmp_path / "hello.yaml")


def envelope(payload: bytes, *, to: str, traceparent: str | None = None) -> bytes:
    meta = f"<from>client</from><to>{to}</to>"
    if traceparent is not None:
        meta += f"<traceparent>{traceparent}</traceparent>"
    return f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta>{meta}</meta>'.encode() + (
        payload + b"</message>"
    )


def expect_hello_tree(spans: list[ReadableSpan]) -> None:
    assert tree(spans) == [
        (0, "receive", "Greeting"),
        (1, "process greeter", "Greeting"),
        (2, "process shouter", "Shout"),
        (3, "process greeter", "Shouted"),
    ]
    assert len({trace_id(s) for s in spans}) == 1


# -- one conversation, one trace --------------------------------------------------------


async def test_one_conversation_through_hello_is_one_trace(tmp_path: Path, spans: Spans) -> None:
    async with StreamPump(hello(tmp_path), tracing=spans.provider) as pump:
        reply = (await pump.request(GREETING, to="greeter", sender="client")).raise_for_huh()
        await pump.wait_idle()
    finished = spans.finished()
    expect_hello_tree(finished)
    receive = spans.named("receive")[0]
    assert receive.parent is None and receive.kind is SpanKind.CONSUMER
    deliveries = spans.named("process greeter") + spans.named("process shouter")
    for s in deliveries:
        attrs = s.attributes or {}
        assert s.kind is SpanKind.CONSUMER
        assert s.status.status_code is StatusCode.UNSET
        assert attrs["messaging.system"] == "xml_pipeline"
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["messaging.destination.name"] == s.name.split()[1]
        assert attrs["messaging.message.conversation_id"] == reply.thread_id
        assert attrs["messaging.message.id"]
    # The reply carries the context of the delivery that made it (greeter's second).
    last = max(spans.named("process greeter"), key=lambda s: s.start_time or 0)
    assert reply.traceparent == traceparent(last)
    assert parse_envelope(reply.to_xml()).traceparent == reply.traceparent


async def test_a_cpu_bound_hop_is_in_the_same_trace(tmp_path: Path, spans: Spans) -> None:
    async with StreamPump(hello(tmp_path, cpu_bound=True), tracing=spans.provider) as pump:
        stats = pump.statistics().pool
        assert stats is not None and stats.pids  # real worker processes
        (await pump.request(GREETING, to="greeter")).raise_for_huh()
        await pump.wait_idle()
        assert pump.statistics().pool.tasks == 1  # type: ignore[union-attr]
    expect_hello_tree(spans.finished())


async def test_a_cpu_bound_handler_runs_under_its_delivery_span(spans: Spans) -> None:
    """The context goes with the task: what the handler sees in its worker process is
    the pump's span around that task (so the handler's own spans are its children)."""
    listener = Listener(name="cpu", payloads=(Ping,), handler=wh.traced, cpu_bound=True)
    organism = Organism(
        name="t", listeners=(listener,), process_pool=ProcessPoolSettings(workers=1)
    )
    async with StreamPump(organism, tracing=spans.provider) as pump:
        reply = await pump.request(ping_xml(1), to="cpu")
    assert isinstance(reply.payload, Pong)
    (hop,) = spans.named("process cpu")
    assert reply.payload.text == f"{trace_id(hop):032x}-{span_id(hop):016x}"


async def test_inline_and_thread_handlers_spans_are_children(spans: Spans) -> None:
    tracer = spans.provider.get_tracer("handlers")

    async def inline(payload: Ping | Pong, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Pong):
            return HandlerResponse.respond(payload)
        with tracer.start_as_current_span("inline work"):
            return HandlerResponse(Ping(n=payload.n), to="threaded")

    def threaded(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
        with tracer.start_as_current_span("thread work"):
            return HandlerResponse.respond(Pong(n=payload.n))

    organism = Organism(
        name="t",
        listeners=(
            Listener(name="inline", payloads=(Ping, Pong), handler=inline),
            Listener(name="threaded", payloads=(Ping,), handler=threaded),
        ),
    )
    async with StreamPump(organism, tracing=spans.provider) as pump:
        (await pump.request(ping_xml(1), to="inline")).raise_for_huh()
    assert tree(spans.finished()) == [
        (0, "receive", "Ping"),
        (1, "process inline", "Ping"),
        (2, "inline work", ""),
        (2, "process threaded", "Ping"),
        (3, "thread work", ""),
        (3, "process inline", "Pong"),
    ]


# -- <traceparent> in and out -----------------------------------------------------------


async def test_a_caller_traceparent_is_continued(tmp_path: Path, spans: Spans) -> None:
    async with StreamPump(hello(tmp_path), tracing=spans.provider) as pump:
        reply = await pump.request(envelope(GREETING, to="greeter", traceparent=CALLER))
        await pump.wait_idle()
    (receive,) = spans.named("receive")
    assert receive.parent is not None and receive.parent.is_remote
    assert f"{receive.parent.span_id:016x}" == CALLER_SPAN
    assert {f"{trace_id(s):032x}" for s in spans.finished()} == {CALLER_TRACE}
    assert reply.traceparent is not None and reply.traceparent.startswith(f"00-{CALLER_TRACE}-")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        CALLER.upper(),  # the spec's hex is lower case
        CALLER + "-00",  # a longer (later version) form is not taken
        f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{CALLER_SPAN}-01",  # all-zero trace id
        f"00-{CALLER_TRACE}-{'0' * 16}-01",  # all-zero parent id
        "00-" + "a" * 100_000,  # hostile: long (never refused for that)
    ],
)
async def test_an_invalid_traceparent_is_ignored(bad: str, spans: Spans) -> None:
    doc = envelope(ping_xml(1), to="pong", traceparent=bad)
    assert parse_envelope(doc, _big_limits()).traceparent is None
    organism = Organism(
        name="t",
        listeners=(Listener(name="pong", payloads=(Ping,), handler=_pong),),
        settings=_big_settings(),
    )
    async with StreamPump(organism, tracing=spans.provider) as pump:
        reply = await pump.request(doc)
    assert isinstance(reply.payload, Pong)
    (receive,) = spans.named("receive")
    assert receive.parent is None  # a trace of its own


async def test_a_refused_input_span_and_huh_carry_the_trace(spans: Spans) -> None:
    organism = Organism(
        name="t", listeners=(Listener(name="pong", payloads=(Ping,), handler=_pong),)
    )
    async with StreamPump(organism, tracing=spans.provider) as pump:
        reply = await pump.request(envelope(ping_xml(1), to="nobody", traceparent=CALLER))
    assert isinstance(reply.payload, Huh) and reply.payload.code == "no-route"
    (receive,) = spans.named("receive")
    assert receive.status.status_code is StatusCode.ERROR
    assert (receive.attributes or {})["xml_pipeline.huh"] == "no-route"
    assert reply.traceparent == traceparent(receive)
    assert reply.traceparent.startswith(f"00-{CALLER_TRACE}-")


async def test_a_failed_delivery_says_so_and_its_huh_descends_from_it(spans: Spans) -> None:
    organism = Organism(name="t", listeners=(Listener(name="b", payloads=(Ping,), handler=boom),))
    async with StreamPump(organism, tracing=spans.provider) as pump:
        reply = await pump.request(ping_xml(1, "boom"), to="b")
    assert isinstance(reply.payload, Huh) and reply.payload.code == "handler-error"
    (hop,) = spans.named("process b")
    assert hop.status.status_code is StatusCode.ERROR
    assert "kaboom" in (hop.status.description or "")
    attrs = hop.attributes or {}
    assert attrs["xml_pipeline.huh"] == attrs["error.type"] == "handler-error"
    assert reply.traceparent == traceparent(hop)


class FailingShouts(MemoryBackend):
    """A memory backend that raises ``error`` when a Shout is recorded as delivered:
    the pump's delivery function raises it, after the handler-facing part would start
    (the failure the pump handles itself, outside what the handler did)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        if slot.direction == "in" and slot.payload.endswith("}Shout"):
            raise self.error
        return await super().buffer_append(thread_id, slot)


def outside(spans: list[ReadableSpan], ambient: ReadableSpan) -> None:
    """None of ``spans`` is in the trace of ``ambient`` (the application's span that
    was current where the pump was entered)."""
    assert ambient not in spans
    assert all(trace_id(s) != trace_id(ambient) for s in spans), tree([*spans, ambient])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BackendUnavailable("the backend is down (injected)"), "backend-unavailable"),
        (RuntimeError("a bug (injected)"), "handler-error"),
    ],
    ids=["backend-error", "internal-error"],
)
async def test_a_failure_the_pump_handles_is_on_its_delivery_span(
    tmp_path: Path, spans: Spans, error: Exception, code: str
) -> None:
    """The pump entered inside an application's span; a delivery function raises
    (not the handler): the Huh it sends descends from that delivery's span, which says
    the Huh's code; nothing is filed under the application's span."""
    tracer = spans.provider.get_tracer("app")
    async with contextlib.AsyncExitStack() as stack:
        with tracer.start_as_current_span("app startup"):
            pump = await stack.enter_async_context(
                StreamPump(hello(tmp_path), backend=FailingShouts(error), tracing=spans.provider)
            )
        reply = await pump.request(GREETING, to="greeter")
        await pump.wait_idle()
    assert isinstance(reply.payload, Huh) and reply.payload.code == code
    (ambient,) = spans.named("app startup")
    ours = [s for s in spans.finished() if s.name != "app startup"]
    outside(ours, ambient)
    assert tree(ours) == [
        (0, "receive", "Greeting"),
        (1, "process greeter", "Greeting"),
        (2, "process shouter", "Shout"),
    ]
    (hop,) = spans.named("process shouter")
    assert hop.status.status_code is StatusCode.ERROR
    attrs = hop.attributes or {}
    assert attrs["xml_pipeline.huh"] == attrs["error.type"] == code
    assert reply.traceparent == traceparent(hop)


async def test_a_message_fed_outside_a_delivery_starts_a_trace(spans: Spans) -> None:
    """A conversation fed again by the application, inside a span of its own: its
    delivery is not filed under that span (the pump's spans only are parents)."""

    async def silent(payload: Ping, meta: HandlerMetadata) -> None:
        return None  # no answer: the conversation stays unanswered

    organism = Organism(name="t", listeners=(Listener(name="s", payloads=(Ping,), handler=silent),))
    tracer = spans.provider.get_tracer("app")
    async with StreamPump(organism, tracing=spans.provider) as pump:
        thread = await pump.inject(ping_xml(1), to="s")
        await pump.wait_idle()
        with tracer.start_as_current_span("app work"):
            assert await pump.replay_conversation(thread)
        await pump.wait_idle()
    (ambient,) = spans.named("app work")
    first, again = sorted(spans.named("process s"), key=lambda s: s.start_time or 0)
    assert first.parent is not None  # the receive span
    assert again.parent is None  # a trace of its own
    outside([again], ambient)


async def test_a_node_parents_nothing_under_the_span_it_was_started_in(
    tmp_path: Path, spans: Spans, redis_server: Any
) -> None:
    """A stream entry without ``tp`` (from a node that does not trace), taken by a
    node started inside an application's span: a trace of its own, not that span's."""
    shutil.copy(ORGANISMS / "hello.py", tmp_path / "hello.py")
    text = (ORGANISMS / "hello_nodes.yaml").read_text()
    text = text.replace("redis://127.0.0.1:6379/0", redis_server.url)
    text = text.replace("prefix: hello-nodes", f"prefix: tr{uuid.uuid4().hex[:10]}")
    (tmp_path / "nodes.yaml").write_text(text)
    organism = load_organism(tmp_path / "nodes.yaml")
    tracer = spans.provider.get_tracer("app")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            StreamPump(organism, node="a", serve=["greeter"], tracing=False)
        )
        with tracer.start_as_current_span("app startup"):
            await stack.enter_async_context(
                StreamPump(organism, node="b", serve=["shouter"], tracing=spans.provider)
            )
        (await a.request(GREETING, to="greeter")).raise_for_huh()
    (ambient,) = spans.named("app startup")
    (hop,) = spans.named("process shouter")
    assert hop.parent is None
    outside([hop], ambient)


def test_replies_write_a_traceparent_the_xsd_accepts() -> None:
    from lxml import etree

    from xml_pipeline.schema import envelope_xsd

    schema = etree.XMLSchema(etree.fromstring(envelope_xsd()))
    reply = Reply("t", "s", "c", "m-1", Pong(n=1), "r", CALLER)
    doc = reply.to_xml()
    assert f"<traceparent>{CALLER}</traceparent>".encode() in doc
    assert schema.validate(etree.fromstring(doc)), schema.error_log
    payload = etree.fromstring(ping_xml(1))
    bad = build_envelope(sender="s", payload=payload, traceparent="nope")
    assert not schema.validate(etree.fromstring(bad))
    assert parse_envelope(bad).traceparent is None


# -- off: no spans, no cost ---------------------------------------------------------------


async def test_no_spans_when_tracing_is_off(tmp_path: Path, spans: Spans) -> None:
    async with StreamPump(hello(tmp_path), tracing=False) as pump:
        assert pump._tracing is None
        reply = await pump.request(envelope(GREETING, to="greeter", traceparent=CALLER))
    assert reply.traceparent is None
    async with StreamPump(hello(tmp_path)) as pump:
        # No global tracer provider set in this process: off.
        assert pump._tracing is None


def test_the_global_provider_turns_tracing_on_and_nothing_imports_otel_otherwise() -> None:
    """In a process of its own: the global provider can be set once per process."""
    code = textwrap.dedent(
        """
        import asyncio, sys
        from xml_pipeline import StreamPump, load_organism
        assert "opentelemetry" not in sys.modules, "imported with the package"
        org = load_organism(sys.argv[1])

        async def run():
            async with StreamPump(org) as pump:
                assert pump._tracing is None
            assert "opentelemetry" not in sys.modules, "imported by a pump"
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            async with StreamPump(org) as pump:
                await pump.request(sys.argv[2].encode(), to="greeter")
                await pump.wait_idle()
            print(sorted(s.name for s in exporter.get_finished_spans()))

        asyncio.run(run())
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, str(ORGANISMS / "hello.yaml"), GREETING],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(
        ["process greeter", "process greeter", "process shouter", "receive"]
    )


# -- helpers ------------------------------------------------------------------------------


async def _pong(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(n=payload.n))


def _big_settings() -> Any:
    from xml_pipeline import PumpSettings
    from xml_pipeline.parser import ParseLimits

    return PumpSettings(limits=ParseLimits(max_bytes=1_000_000))


def _big_limits() -> Any:
    return _big_settings().limits
