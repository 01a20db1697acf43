"""Metrics in the Prometheus text format, and health probes, for a running pump.

``run --metrics HOST:PORT`` (or :func:`serve_metrics` around a pump of your own) serves
on one port:

- ``/metrics``: the pump's counters (see docs/operating.md for the list);
- ``/healthz``: 200 while the process serves (liveness);
- ``/readyz``: 200 when the backend and the transport answered their last ping, the
  worker pool is up and the pump runs and is not draining; 503 and the reasons
  otherwise (readiness).

Needs the ``metrics`` extra (``pip install 'xml-pipeline[metrics]'``: prometheus-client);
it is imported only when metrics are served.

How it stays off the hot path: a custom collector reads the pump's own counters
(:meth:`StreamPump.statistics`) when Prometheus scrapes, so a message pays nothing
for the counters. Three things are counted only while metrics are served: a latency
histogram per listener (a bisect into fixed buckets per delivery: cumulative counts
since start, as a Prometheus histogram means; the pump's sliding ring of samples
could not give them), backend calls (each operation of the backend protocol timed,
for the backends that do I/O), and what a probe task finds every
``probe_interval_s``: the backend's and the transport's pings, and the transport's
inbox streams. The scrape runs in the HTTP
server's thread and reads plain counters (copies made in C, atomic under the GIL),
so a scrape never waits for the event loop and the loop never waits for a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ._delivery import LATENCY_BUCKETS
from ._version import __version__
from .backends.base import Backend
from .backends.memory import MemoryBackend

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .pump import StreamPump

__all__ = [
    "BACKEND_BUCKETS",
    "INSTALL_HINT",
    "LATENCY_BUCKETS",
    "MetricsServer",
    "parse_address",
    "require_prometheus",
    "serve_metrics",
]

INSTALL_HINT = "pip install 'xml-pipeline[metrics]'"
# Upper bounds (seconds) of the backend call histogram: an in-memory call takes ~1 µs,
# a Redis or manager round trip 50 µs to a few ms.
BACKEND_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The operations of the backend protocol that are timed (what the pump calls).
_OPERATIONS = (
    "buffer_append", "buffer_contains", "buffer_get_thread", "buffer_get_slot",
    "buffer_thread_len", "buffer_thread_exists", "buffer_delete_thread",
    "buffer_list_threads", "buffer_clear", "registry_set", "registry_setdefault",
    "registry_get_uuid", "registry_get_chain", "registry_delete", "registry_list_all",
    "registry_clear", "deadletter_add", "deadletter_add_many", "deadletter_list",
    "deadletter_delete", "deadletter_purge", "ping", "info",
)  # fmt: skip
_PREFIX = "xml_pipeline_"


def require_prometheus() -> None:
    """Check that prometheus-client can be imported.

    Raises:
        ImportError: it is not installed; the message says how to install it.
    """
    try:
        import prometheus_client  # noqa: F401  (an optional dependency)
    except ImportError as exc:
        raise ImportError(f"metrics need prometheus-client: {INSTALL_HINT}") from exc


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` as (host, port); the host
    defaults to 127.0.0.1 (metrics are not exposed beyond the machine unless asked).

    Raises:
        ValueError: not an address, or a port outside 0 to 65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (a port from 0 to 65535), not {text!r}")
    return host, int(port)


# -- backend calls -----------------------------------------------------------------


class _Operation:
    """Calls, errors and a latency histogram of one backend operation."""

    __slots__ = ("buckets", "calls", "errors", "seconds")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.seconds = 0.0
        self.buckets = array("q", bytes(8 * (len(BACKEND_BUCKETS) + 1)))


def _metered(fn: Callable[..., Awaitable[Any]], op: _Operation) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except Exception:
            op.errors += 1
            raise
        finally:
            elapsed = time.perf_counter() - start
            op.calls += 1
            op.seconds += elapsed
            op.buckets[bisect_right(BACKEND_BUCKETS, elapsed)] += 1

    return call


def _meter_backend(backend: Backend) -> tuple[dict[str, _Operation], Callable[[], None]]:
    """Time every operation of ``backend`` (instance attributes in front of its
    methods, so every holder of the object, the frame registry and the transport
    included, goes through them); returns the counters and how to undo it.

    Only while metrics are served, and not for the in-memory backend: the wrapper
    costs an extra coroutine and two clock reads, ~1.5 µs per call measured here (about
    5 % of a hop with the few calls a hop makes to a backend that answers at once),
    while a manager or Redis call is a round trip of 50 µs or more."""
    operations: dict[str, _Operation] = {}
    if isinstance(backend, MemoryBackend):
        return operations, lambda: None
    for name in _OPERATIONS:
        fn = getattr(backend, name, None)
        if fn is None or name in vars(backend):
            continue
        operations[name] = op = _Operation()
        setattr(backend, name, _metered(fn, op))

    def undo() -> None:
        for name in operations:
            with contextlib.suppress(AttributeError):
                delattr(backend, name)

    return operations, undo


# -- health ------------------------------------------------------------------------


class _Probe:
    """What the probe task found last: pings and the transport's inboxes."""

    def __init__(self, pump: StreamPump, draining: Callable[[], bool] | None) -> None:
        self.pump = pump
        self.draining = draining
        self.backend_up: bool | None = None  # None: not pinged yet
        self.backend_ping_s: float | None = None
        self.transport_up: bool | None = None
        self.inboxes: dict[str, dict[str, Any]] = {}

    async def run(self, interval: float) -> None:
        while True:
            await self.probe(interval)
            await asyncio.sleep(interval)

    async def probe(self, timeout: float) -> None:
        pump = self.pump
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await pump.backend.ping()
        except Exception:  # whatever the reason, it did not answer
            self.backend_up = False
        else:
            self.backend_up = True
            self.backend_ping_s = time.perf_counter() - start
        streams = pump._transport_streams()
        if streams is None:
            return
        try:
            async with asyncio.timeout(timeout):
                inboxes = {}
                for listener in pump.organism.listeners:
                    inboxes[listener.name] = await streams.inbox_status(
                        listener.name, listener.shards
                    )
        except Exception:
            self.transport_up = False
        else:
            self.transport_up = True
            self.inboxes = inboxes

    def problems(self) -> list[str]:
        """Why the pump is not ready (empty: it is)."""
        found = self.pump._unready()
        if self.draining is not None and self.draining() and "draining" not in found:
            found.append("draining")
        if not self.backend_up:
            found.append("backend not answering" if self.backend_up is False else "starting")
        if self.pump.transport is not None and not self.transport_up:
            found.append("transport not answering")
        return found


# -- the collector -------------------------------------------------------------------


class _PumpCollector:
    """Reads the pump's counters when Prometheus scrapes (nothing per message)."""

    def __init__(self, pump: StreamPump, probe: _Probe, operations: dict[str, _Operation]) -> None:
        self.pump = pump
        self.probe = probe
        self.operations = operations

    def describe(self) -> Iterable[Any]:
        return ()  # unchecked collector: the families depend on the organism

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # an optional dependency
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
            return CounterMetricFamily(_PREFIX + name, doc, labels=list(labels))

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Any:
            return GaugeMetricFamily(_PREFIX + name, doc, labels=list(labels))

        pump = self.pump
        stats = pump.statistics()
        info = gauge("info", "The organism this process runs (always 1).",
                     ("organism", "node", "version"))  # fmt: skip
        info.add_metric([pump.organism.name, pump.node, __version__], 1)
        yield info

        # -- per listener
        received = counter("listener_received", "Deliveries to the listener.", ["listener"])
        handled = counter("listener_handled", "Deliveries its handler completed.", ["listener"])
        failed = counter("listener_failed", "Deliveries that failed, by Huh code.",
                         ["listener", "code"])  # fmt: skip
        in_flight = gauge("listener_in_flight", "Deliveries being handled now.", ["listener"])
        queued = gauge("listener_queued", "Deliveries waiting in its inbox.", ["listener"])
        blocked = counter(
            "listener_blocked",
            "Steps of its async handler that held the event loop for pump.blocked_loop_s or "
            "longer.",
            ["listener"],
        )
        for name, s in stats.listeners.items():
            received.add_metric([name], s.received)
            handled.add_metric([name], s.handled)
            for code, n in sorted(s.failures.items()):
                failed.add_metric([name, code], n)
            in_flight.add_metric([name], s.in_flight)
            queued.add_metric([name], s.queued)
            blocked.add_metric([name], s.blocked)
        yield from (received, handled, failed, in_flight, queued, blocked)
        latency = HistogramMetricFamily(
            _PREFIX + "listener_latency_seconds",
            "From entering the listener's inbox to done (queue wait and handler), as "
            "statistics() p50/p99 measure it.",
            labels=["listener"],
        )
        for name, (counts, total) in pump._latency_histograms().items():
            latency.add_metric([name], _cumulative(LATENCY_BUCKETS, counts), total)
        yield latency

        # -- pump-wide
        pump_counters: tuple[tuple[str, float, str], ...] = (
            ("ingress", stats.ingress, "Messages offered to ingress."),
            ("duplicates", stats.duplicates, "Ingress messages ignored as retries."),
            ("egress", stats.egress, "Replies that reached external senders."),
            ("dead_letters", stats.dead_letters, "Dead letters made."),
            ("abandoned", stats.abandoned, "Messages dead-lettered at shutdown."),
            ("blocked_loop", stats.blocked_loop, "Times the event loop was held for "
             "pump.blocked_loop_s or longer."),
            ("dead_letters_dropped", stats.spill_dropped, "Dead letters lost (spill full)."),
        )  # fmt: skip
        for name, value, doc in pump_counters:
            family = counter(name, doc)
            family.add_metric([], value)
            yield family
        rejected = counter("rejected", "Ingress messages refused, by Huh code.", ["code"])
        for code, n in sorted(stats.rejections.items()):
            rejected.add_metric([code], n)
        yield rejected
        yield GaugeMetricFamily(
            _PREFIX + "in_pump", "Messages queued or being handled now.", value=stats.in_pump
        )
        yield GaugeMetricFamily(
            _PREFIX + "dead_letters_spilled",
            "Dead letters kept in memory until the backend takes them.",
            value=stats.spilled,
        )

        # -- the worker pool
        pool = stats.pool
        if pool is not None:
            yield GaugeMetricFamily(_PREFIX + "pool_workers", "Worker processes per "
                                    "executor.", value=pool.workers)  # fmt: skip
            yield GaugeMetricFamily(_PREFIX + "pool_queued", "Tasks waiting to be "
                                    "submitted.", value=pool.queued)  # fmt: skip
            yield GaugeMetricFamily(_PREFIX + "pool_in_flight", "Tasks submitted, not yet "
                                    "answered.", value=pool.in_flight)  # fmt: skip
            pool_counters: tuple[tuple[str, float, str], ...] = (
                ("pool_tasks", pool.tasks, "Tasks completed by workers."),
                ("pool_batches", pool.batches, "Submissions to workers."),
                ("pool_crashes", pool.crashes, "Times the executor broke."),
                ("pool_timeouts", pool.timeouts, "Workers killed for a timeout."),
                ("pool_recycles", pool.recycles, "Executors replaced after recycle_after."),
                ("pool_worker_cpu_seconds", pool.worker_cpu_s, "CPU seconds of the workers."),
            )
            for name, value, doc in pool_counters:
                family = counter(name, doc)
                family.add_metric([], value)
                yield family

        # -- the backend
        calls = counter("backend_calls", "Backend calls, by operation.", ["operation"])
        errors = counter("backend_errors", "Backend calls that failed, by operation.",
                         ["operation"])  # fmt: skip
        seconds = HistogramMetricFamily(
            _PREFIX + "backend_call_seconds", "Backend call latency, by operation.",
            labels=["operation"],
        )  # fmt: skip
        for name, op in self.operations.items():
            counts = list(op.buckets)
            if not sum(counts):
                continue
            calls.add_metric([name], op.calls)
            errors.add_metric([name], op.errors)
            seconds.add_metric([name], _cumulative(BACKEND_BUCKETS, counts), op.seconds)
        yield from (calls, errors, seconds)
        probe = self.probe
        yield GaugeMetricFamily(_PREFIX + "backend_up", "1 if the backend answered its "
                                "last ping.", value=1 if probe.backend_up else 0)  # fmt: skip
        if probe.backend_ping_s is not None:
            yield GaugeMetricFamily(_PREFIX + "backend_ping_seconds", "How long the last "
                                    "answered ping took.", value=probe.backend_ping_s)  # fmt: skip

        # -- the transport (Redis Streams)
        if pump.transport is not None:
            yield GaugeMetricFamily(_PREFIX + "transport_up", "1 if the transport "
                                    "answered its last probe.",
                                    value=1 if probe.transport_up else 0)  # fmt: skip
            length = gauge("transport_stream_length", "Entries of the listener's inbox "
                           "streams not yet done.", ["listener"])  # fmt: skip
            pending = gauge("transport_pending", "Entries delivered to a node, not yet "
                            "committed.", ["listener"])  # fmt: skip
            lag = gauge("transport_lag", "Entries not yet delivered to any node.", ["listener"])
            oldest = gauge("transport_oldest_pending_seconds", "Age of the oldest pending "
                           "entry (0: none).", ["listener"])  # fmt: skip
            for name, status in probe.inboxes.items():
                length.add_metric([name], status["length"])
                pending.add_metric([name], status["pending"])
                lag.add_metric([name], status["lag"])
                oldest.add_metric([name], (status["oldest_ms"] or 0) / 1000)
            yield from (length, pending, lag, oldest)


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, ``+Inf`` last) from per-bucket counts."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out


# -- the HTTP server -----------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    # Each request in a thread of its own; server_close() joins them (nothing is left
    # behind), and a client gets _REQUEST_TIMEOUT_S to send its request.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True


_REQUEST_TIMEOUT_S = 5.0


class _Handler(WSGIRequestHandler):
    timeout = _REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a scrape every few seconds is not worth a line on stderr


def _app(metrics_app: Callable[..., Any], probe: _Probe) -> Callable[..., Any]:
    """Route /healthz and /readyz; /metrics goes to prometheus-client's own app."""

    def text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
        data = body.encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            return text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            problems = probe.problems()
            if problems:
                return text(start_response, "503 Service Unavailable",
                            "not ready: " + "; ".join(problems) + "\n")  # fmt: skip
            return text(start_response, "200 OK", "ready\n")
        return text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")

    return app


class MetricsServer:
    """The HTTP server of :func:`serve_metrics` (``address``: where it listens)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        host, port = server.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))


@contextlib.asynccontextmanager
async def serve_metrics(
    pump: StreamPump,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    draining: Callable[[], bool] | None = None,
    probe_interval_s: float = 2.0,
) -> AsyncIterator[MetricsServer]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` of ``pump`` for the ``async with``
    block. Enter it before the pump starts (its histograms count from then on).

    The server runs in a thread of its own and the probe in a task; both are stopped
    and waited for when the block is left, and the port is closed.

    Args:
        pump: the pump to report on.
        host: the address to listen on (127.0.0.1 by default: not beyond the machine).
        port: the port (0: any free one; see ``MetricsServer.address``).
        draining: returns True once the application drains the pump (``/readyz``
            then answers 503).
        probe_interval_s: how often the backend and the transport are pinged and the
            transport's inboxes measured.

    Raises:
        ImportError: prometheus-client is not installed.
        OSError: the address cannot be listened on.
    """
    require_prometheus()
    from prometheus_client import CollectorRegistry, make_wsgi_app  # an optional dependency
    from prometheus_client.process_collector import ProcessCollector

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, lambda e, s: [], server_class=Server, handler_class=_Handler)
    try:
        operations, unmeter = _meter_backend(pump.backend)
        pump._count_latencies()
        probe = _Probe(pump, draining)
        registry = CollectorRegistry(auto_describe=False)
        collector: Collector = _PumpCollector(pump, probe, operations)
        registry.register(collector)
        ProcessCollector(registry=registry)
        server.set_app(_app(make_wsgi_app(registry), probe))
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name="xml_pipeline metrics", daemon=True,
        )  # fmt: skip
        thread.start()
        prober = asyncio.ensure_future(probe.run(probe_interval_s))
        try:
            yield MetricsServer(server)
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            # shutdown() waits for serve_forever to notice, within its poll interval
            # (0.1 s): done on the loop, so that a cancellation cannot interrupt it and
            # leave the thread serving.
            server.shutdown()
            thread.join()
            unmeter()
    finally:
        server.server_close()
