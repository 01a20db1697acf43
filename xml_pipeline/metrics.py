"""Metrics in the Prometheus text format, and health probes, for a running pump.

``run --metrics HOST:PORT`` (or :func:`serve_metrics` around a pump of your own) serves
on one port:

- ``/metrics``: the pump's counters (see docs/operating.md for the list);
- ``/healthz``: 200 while the process serves and its event loop runs (liveness): 503
  once the probe task has not run for 10 probe intervals;
- ``/readyz``: 200 when the backend and the transport answered their last ping, the
  worker pool is up, the pump runs and is not draining, and the probe task ran within
  3 probe intervals; 503 and the reasons otherwise (readiness).

Needs the ``metrics`` extra (``pip install 'xml-pipeline[metrics]'``: prometheus-client);
it is imported only when metrics are served.

How it stays off the hot path: a custom collector serves the pump's own counters
(:meth:`StreamPump.statistics`), so a message pays nothing for the counters. Three
things are counted only while metrics are served: a latency histogram per listener (a
bisect into fixed buckets per delivery: cumulative counts since start, as a Prometheus
histogram means; the pump's sliding ring of samples could not give them), backend
calls (each operation of the backend protocol timed, for the backends that do I/O),
and what a probe task finds: the backend's and the transport's pings, and the
transport's inbox streams.

Threads: the HTTP server runs in a thread of its own and a thread per request, which
must not run code over the pump's structures while the loop changes them. So the
probe task, on the event loop, makes an immutable snapshot of everything a scrape
serves every ``probe_interval_s`` (values are at most that old) and swaps it in with
one assignment; a scrape reads that snapshot, never waits for the loop, and the loop
never waits for a scrape. The snapshot's age is also how the probes see that the loop
runs. Leaving :func:`serve_metrics` waits for no client: requests are bounded in
number and in time, and their sockets are shut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ._delivery import LATENCY_BUCKETS
from ._version import __version__
from .backends.base import Backend
from .backends.memory import MemoryBackend

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .dashboard import Dashboard
    from .pump import StreamPump
    from .reply import PumpStatistics

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
# /readyz fails once the probe task has not run for this many probe intervals (the event
# loop is held: nothing sent to the pump would be handled), /healthz once it has not
# for _LIVENESS_INTERVALS (the loop is wedged: restarting the process is the remedy).
_READINESS_INTERVALS = 3
_LIVENESS_INTERVALS = 10

logger = logging.getLogger("xml_pipeline.metrics")


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


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a scrape and the probes read: made on the event loop by the probe task,
    replaced whole (one reference swap), never changed, so the HTTP thread runs no
    code over structures the loop mutates."""

    taken: float  # time.monotonic() when the loop made it: how the loop is seen to run
    stats: PumpStatistics
    latency: Mapping[str, tuple[list[int], float]]
    # operation -> (calls, errors, seconds, per-bucket counts)
    operations: Mapping[str, tuple[int, int, float, list[int]]]
    backend_up: bool | None  # None: not pinged yet
    backend_ping_s: float | None
    transport: bool  # the pump is a node of a distributed transport
    transport_up: bool | None
    inboxes: Mapping[str, Mapping[str, Any]]
    # The nodes alive (whose heartbeat has not expired), with what each says of itself.
    nodes: Mapping[str, Mapping[str, Any]]


class _Probe:
    """The probe task: pings the backend and the transport, and every ``interval``
    makes the :class:`_Snapshot` the HTTP thread reads."""

    def __init__(
        self,
        pump: StreamPump,
        draining: Callable[[], bool] | None,
        operations: dict[str, _Operation],
        interval: float,
    ) -> None:
        self.pump = pump
        self.draining = draining
        self.operations = operations
        self.interval = interval
        self.backend_up: bool | None = None
        self.backend_ping_s: float | None = None
        self.transport_up: bool | None = None
        self.inboxes: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.snapshot = self._take()

    def _take(self) -> _Snapshot:
        pump = self.pump
        return _Snapshot(
            taken=time.monotonic(),
            stats=pump.statistics(),
            latency=pump._latency_histograms(),
            operations={
                name: (op.calls, op.errors, op.seconds, list(op.buckets))
                for name, op in self.operations.items()
            },
            backend_up=self.backend_up,
            backend_ping_s=self.backend_ping_s,
            transport=pump._transport_streams() is not None,
            transport_up=self.transport_up,
            inboxes=self.inboxes,
            nodes=self.nodes,
        )

    def refresh(self) -> None:
        """Make a new snapshot (on the event loop only)."""
        self.snapshot = self._take()

    async def run(self) -> None:
        # The pings run in a task of their own: a backend that takes its whole deadline
        # to answer must not make the loop look stuck, nor the counters older.
        pinger: asyncio.Future[None] | None = None
        try:
            while True:
                if pinger is None or pinger.done():
                    pinger = asyncio.ensure_future(self.probe(self.interval))
                self.refresh()
                await asyncio.sleep(self.interval)
        finally:
            if pinger is not None:
                pinger.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pinger

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
        if streams is not None:
            try:
                async with asyncio.timeout(timeout):
                    inboxes = {}
                    for listener in pump.organism.listeners:
                        inboxes[listener.name] = await streams.inbox_status(
                            listener.name, listener.shards
                        )
                    nodes = await streams.nodes()
            except Exception:
                self.transport_up = False
            else:
                self.transport_up = True
                self.inboxes = inboxes
                self.nodes = nodes
        self.refresh()

    def stalled_s(self) -> float:
        """Seconds since the event loop last ran the probe task (any thread)."""
        return time.monotonic() - self.snapshot.taken

    def unresponsive(self, intervals: int) -> str | None:
        """Why the loop counts as stuck, if the probe task has not run for
        ``intervals`` probe intervals (any thread)."""
        stalled = self.stalled_s()
        if stalled <= intervals * self.interval:
            return None
        return f"event loop not responding for {stalled:.1f} s"

    def problems(self) -> list[str]:
        """Why the pump is not ready (empty: it is). Runs in the HTTP thread: the
        pump's state and the draining flag are single attributes, read as they are
        now (a drain shows at once); the pings come from the snapshot."""
        found = self.pump._unready()
        if self.draining is not None and self.draining() and "draining" not in found:
            found.append("draining")
        snapshot = self.snapshot
        if not snapshot.backend_up:
            found.append("backend not answering" if snapshot.backend_up is False else "starting")
        if self.pump.transport is not None and not snapshot.transport_up:
            found.append("transport not answering")
        stuck = self.unresponsive(_READINESS_INTERVALS)
        if stuck is not None:
            found.append(stuck)
        return found


# -- the collector -------------------------------------------------------------------


class _PumpCollector:
    """Turns the probe task's latest snapshot into metric families when Prometheus
    scrapes (in the HTTP thread: it reads the snapshot, nothing the loop changes)."""

    def __init__(self, pump: StreamPump, probe: _Probe) -> None:
        self.pump = pump
        self.probe = probe

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
        snapshot = self.probe.snapshot  # one read: every family from the same moment
        stats = snapshot.stats
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
        for name, (counts, total) in snapshot.latency.items():
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
        for name, (n, failures, total, counts) in snapshot.operations.items():
            if not sum(counts):
                continue
            calls.add_metric([name], n)
            errors.add_metric([name], failures)
            seconds.add_metric([name], _cumulative(BACKEND_BUCKETS, counts), total)
        yield from (calls, errors, seconds)
        yield GaugeMetricFamily(_PREFIX + "backend_up", "1 if the backend answered its "
                                "last ping.", value=1 if snapshot.backend_up else 0)  # fmt: skip
        if snapshot.backend_ping_s is not None:
            yield GaugeMetricFamily(_PREFIX + "backend_ping_seconds", "How long the last "
                                    "answered ping took.",
                                    value=snapshot.backend_ping_s)  # fmt: skip

        # -- the transport (Redis Streams)
        if pump.transport is not None:
            yield GaugeMetricFamily(_PREFIX + "transport_up", "1 if the transport "
                                    "answered its last probe.",
                                    value=1 if snapshot.transport_up else 0)  # fmt: skip
            length = gauge("transport_stream_length", "Entries of the listener's inbox "
                           "streams not yet done.", ["listener"])  # fmt: skip
            pending = gauge("transport_pending", "Entries delivered to a node, not yet "
                            "committed.", ["listener"])  # fmt: skip
            lag = gauge("transport_lag", "Entries not yet delivered to any node.", ["listener"])
            oldest = gauge("transport_oldest_pending_seconds", "Age of the oldest pending "
                           "entry (0: none).", ["listener"])  # fmt: skip
            for name, status in snapshot.inboxes.items():
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

# A request (reading it and answering) gets this long in all, however slowly its client
# sends or reads: then its socket is shut and its thread ends.
_REQUEST_TIMEOUT_S = 5.0
# Requests served at once; a connection past them is closed at once (a thread each:
# a flood of idle connections must not make threads without limit).
_MAX_REQUESTS = 16
# Leaving serve_metrics: how long the loop waits for the server's thread to stop (it
# polls every 0.1 s; the requests are not waited for, their sockets are shut).
_STOP_TIMEOUT_S = 2.0


def _one_line(exc: BaseException | None) -> str:
    return "?" if exc is None else f"{type(exc).__name__}: {exc}".splitlines()[0]


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request, daemon threads that only read the snapshot; at most
    _MAX_REQUESTS at once, each bounded to _REQUEST_TIMEOUT_S in all; errors logged
    in one line, never printed."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # The listen backlog (socketserver's is 5): connections that come in a burst wait
    # to be accepted instead of having their SYN dropped and retried a second later.
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.Semaphore(_MAX_REQUESTS)
        self._open: dict[Any, float] = {}  # request socket -> its deadline (monotonic)
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed, not queued
            return
        with self._open_lock:
            self._open[request] = time.monotonic() + _REQUEST_TIMEOUT_S
        try:
            threading.Thread(
                target=self.process_request_thread, args=(request, client_address),
                name="xml_pipeline metrics request", daemon=True,
            ).start()  # fmt: skip
        except BaseException:
            self._slots.release()
            raise  # serve_forever logs it (handle_error) and closes the request

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        # Forgotten before it is closed, under the lock abort_requests holds: a socket
        # is never shut after its descriptor was closed (and maybe reused).
        with self._open_lock:
            self._open.pop(request, None)
            super().shutdown_request(request)

    def extend(self, request: Any, seconds: float) -> None:
        """Give ``request`` ``seconds`` from now instead (the dashboard's event streams)."""
        with self._open_lock:
            if request in self._open:
                self._open[request] = time.monotonic() + seconds

    def service_actions(self) -> None:
        # In serve_forever's thread, at every poll (0.1 s).
        self.abort_requests(time.monotonic())

    def abort_requests(self, now: float | None = None) -> None:
        """Shut the sockets of the requests past their deadline (every one, with
        ``now`` None): their thread's read or write returns at once and it ends."""
        with self._open_lock:
            for request, deadline in self._open.items():
                if now is None or deadline <= now:
                    with contextlib.suppress(OSError):
                        request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr: a client that times out or hangs
        # up is not worth one, and a raw one would break --log-format json.
        logger.debug(
            "metrics request from %s failed: %s", client_address, _one_line(sys.exc_info()[1])
        )


class _ErrorLog:
    """The ``wsgi.errors`` stream: what wsgiref would print to stderr (an exception in
    the application, with its traceback) is logged as one line instead."""

    def __init__(self) -> None:
        self._text: list[str] = []

    def write(self, text: str) -> int:
        self._text.append(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        self._text.extend(lines)

    def flush(self) -> None:
        lines = [line for line in "".join(self._text).splitlines() if line.strip()]
        self._text.clear()
        if lines:
            logger.warning("metrics request failed: %s", lines[-1].strip())


class _Handler(WSGIRequestHandler):
    timeout = _REQUEST_TIMEOUT_S  # per read or write; _Server bounds the whole request

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a scrape every few seconds is not worth a line on stderr

    def get_stderr(self) -> Any:
        return _ErrorLog()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        server, request = self.server, self.request
        if isinstance(server, _Server):
            environ["xml_pipeline.extend_deadline"] = lambda s: server.extend(request, s)
        return environ


def _app(
    metrics_app: Callable[..., Any], probe: _Probe, dashboard: Callable[..., Any] | None = None
) -> Callable[..., Any]:
    """Route /healthz and /readyz; /metrics goes to prometheus-client's own app, any
    other path to the dashboard when it is served."""

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
            stuck = probe.unresponsive(_LIVENESS_INTERVALS)
            if stuck is not None:
                return text(start_response, "503 Service Unavailable", stuck + "\n")
            return text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            problems = probe.problems()
            if problems:
                return text(start_response, "503 Service Unavailable",
                            "not ready: " + "; ".join(problems) + "\n")  # fmt: skip
            return text(start_response, "200 OK", "ready\n")
        if dashboard is not None:
            return dashboard(environ, start_response)
        return text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")

    return app


class MetricsServer:
    """The HTTP server of :func:`serve_metrics` (``address``: where it listens)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        host, port = server.server_address[:2]
        self.address: tuple[str, int] = (str(host), int(port))


def _stop(server: _Server, thread: threading.Thread) -> None:
    """Stop serving and close the port (in a thread of the loop's executor)."""
    server.shutdown()  # serve_forever notices within its poll interval (0.1 s)
    thread.join()
    server.abort_requests()  # requests under way end now, not at their deadline
    server.server_close()


@contextlib.asynccontextmanager
async def serve_metrics(
    pump: StreamPump,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    draining: Callable[[], bool] | None = None,
    probe_interval_s: float = 2.0,
    dashboard: Dashboard | None = None,
) -> AsyncIterator[MetricsServer]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` of ``pump`` for the ``async with``
    block. Enter it before the pump starts (its histograms count from then on).

    The server runs in a thread of its own and the probe in a task. The probe task
    makes a snapshot of the counters every ``probe_interval_s`` (what ``/metrics``
    serves: at most that old) and is how the probes see the event loop run:
    ``/readyz`` fails once it has not run for 3 intervals, ``/healthz`` for 10.
    Leaving the block stops both without waiting for requests under way (their
    sockets are shut), within about 2 s at most, and closes the port.

    Args:
        pump: the pump to report on.
        host: the address to listen on (127.0.0.1 by default: not beyond the machine).
        port: the port (0: any free one; see ``MetricsServer.address``).
        draining: returns True once the application drains the pump (``/readyz``
            then answers 503).
        probe_interval_s: how often the counters are read, the backend and the
            transport pinged and the transport's inboxes measured.
        dashboard: also serve this web dashboard (:mod:`xml_pipeline.dashboard`) on
            every other path; it reads the same snapshots.

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
    unmeter: Callable[[], None] = lambda: None  # noqa: E731
    thread: threading.Thread | None = None
    try:
        operations, unmeter = _meter_backend(pump.backend)
        pump._count_latencies()
        probe = _Probe(pump, draining, operations, probe_interval_s)
        registry = CollectorRegistry(auto_describe=False)
        collector: Collector = _PumpCollector(pump, probe)
        registry.register(collector)
        ProcessCollector(registry=registry)
        if dashboard is not None:
            address = (str(server.server_address[0]), int(server.server_address[1]))
            dashboard.bind(pump, asyncio.get_running_loop(), lambda: probe.snapshot, address)
        server.set_app(_app(make_wsgi_app(registry), probe, dashboard))
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name="xml_pipeline metrics", daemon=True,
        )  # fmt: skip
        thread.start()
        prober = asyncio.ensure_future(probe.run())
        try:
            yield MetricsServer(server)
        finally:
            if dashboard is not None:
                dashboard.close()
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            # Off the loop, and bounded: the loop never waits for a client. If this
            # wait is cancelled or times out, the thread still stops the server.
            stopping = asyncio.ensure_future(asyncio.to_thread(_stop, server, thread))
            done, _ = await asyncio.wait({stopping}, timeout=_STOP_TIMEOUT_S)
            if not done:
                logger.warning("the metrics server did not stop within %g s", _STOP_TIMEOUT_S)
    finally:
        unmeter()  # whatever failed above: the backend is not left metered
        if thread is None:
            server.server_close()  # not served: nothing else closes the port
