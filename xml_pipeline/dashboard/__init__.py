"""The live web dashboard of a running organism: ``run --metrics HOST:PORT --web``.

Pages (``/``, ``/conversations``, ``/deadletters``, ``/nodes``) are static files shipped in the
package (``static/``); their script fetches JSON from ``/api/...`` and follows the
counters by server-sent events (``/api/events``, at most one event a second).

Why it is a WSGI app on the metrics server, not an ASGI app on the event loop: the
metrics server (:mod:`xml_pipeline.metrics`) runs in a thread of its own, with a
thread per request, and reads a frozen snapshot the probe task makes on the loop. A
dashboard served by that server keeps its properties: ``/healthz`` still answers
while the loop is stuck (and says so), a page that is open costs the loop nothing
(the live view reads the same snapshot: no task, no callback per client), and there
is no second server, port or dependency. An ASGI server (uvicorn, aiohttp) on the
pump's loop would put every request and every open event stream on the loop that
carries the messages, and would stop answering with it. The only loop work the
dashboard asks for is what must read the backend through the pump's own backend
object (conversations, dead letters, replay): one coroutine per request, submitted to
the loop with :func:`asyncio.run_coroutine_threadsafe` and waited for with a
deadline; a stuck loop makes those requests answer 503, never hang.

Safety: read-only unless a token is given (``XML_PIPELINE_WEB_TOKEN``, ``--web-token-file``
or ``--web-token``), of at least 16 characters; 5 wrong ones in a minute lock the
actions out for 10 s.
Every request must name an allowed ``Host`` (the bound ``host:port``, ``localhost``,
``127.0.0.1`` or ``[::1]`` with the port, or a name given with ``--web-host``), else it
is refused with 421: after a DNS rebinding a hostile page's requests name its own host,
so it can read nothing. ``/api/`` requests a browser marks ``Sec-Fetch-Site:
cross-site`` are refused too. Actions (replay, purge) are POSTs that carry the token in
the ``X-Dashboard-Token`` header (never a query string, no cookies) and an ``Origin``
of ``http://`` and an allowed host: a page of another site can send neither (a custom
header makes the browser ask first, and nothing here allows it). Every response carries a strict
Content-Security-Policy (``default-src 'self'``, no inline script, ``frame-ancestors
'none'``) and ``X-Content-Type-Options: nosniff``. Values from messages reach the page
only as JSON, whose ``<``, ``>`` and ``&`` are escaped, and the script sets them as
text (``textContent``), never as markup.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ..backends.base import Backend, DeadLetter, Slot
from ..cli.deadletters import replay_letter
from ..cli.graph import RoutingGraph, routing_graph
from ..cli.thread import AmbiguousId, Conversation, FrameTree, find_conversation
from ..exceptions import BackendError, MessageError, PumpClosed
from ..frame import decode_frame
from ..parser import parse_bytes

if TYPE_CHECKING:
    from ..pump import StreamPump

__all__ = [
    "EVENT_INTERVAL_S",
    "INSTALL_HINT",
    "MIN_TOKEN",
    "TOKEN_ENV",
    "TOKEN_HEADER",
    "Dashboard",
    "allowed_hosts",
    "conversation_json",
    "conversations_overview",
    "graph_layout",
    "live_view",
]

INSTALL_HINT = "pip install 'xml-pipeline[web]'"
TOKEN_ENV = "XML_PIPELINE_WEB_TOKEN"
TOKEN_HEADER = "X-Dashboard-Token"
MIN_TOKEN = 16  # characters of a token, at least
# Guessing the token: after this many wrong ones within _GUESS_WINDOW_S, every action
# is answered 429 for _LOCKOUT_S (per process).
_GUESSES = 5
_GUESS_WINDOW_S = 60.0
_LOCKOUT_S = 10.0
EVENT_INTERVAL_S = 1.0  # the live view gets at most one event a second

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_PAGES = {
    "/": "organism.html",
    "/conversations": "conversations.html",
    "/deadletters": "deadletters.html",
    "/nodes": "nodes.html",
}
_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Event streams open at once: each holds one of the metrics server's request threads
# (16 in all) for _STREAM_S; the probes must keep threads to answer with.
_MAX_STREAMS = 4
# An event stream ends after this long and the browser reconnects (EventSource does,
# after the `retry` the stream names): no request holds a thread for ever.
_STREAM_S = 60.0
# How long a request waits for the event loop to answer a backend read or an action
# (the metrics server ends every request after 5 s).
_LOOP_TIMEOUT_S = 4.0
# Conversations the overview reads: the last ones the registry lists (one history
# read each), of which it shows the most recent and the slowest.
_SCAN_CONVERSATIONS = 500
_SHOWN = 25
_DEAD_LETTERS = 200  # dead letters listed
# The reads that grow with the store (a registry listing, every dead letter) run one at
# a time: a second one meanwhile is answered 429. The overview and the dead letters are
# answered from a copy at most this old, so open pages that poll cost one read a second.
_CACHE_S = 1.0
# A search by message id reads one history per conversation: refused (400) beyond this
# many registry entries; a thread id is one lookup whatever the size.
_SEARCH_CAP = 20_000
_DATA_CAP = 4096  # bytes of a letter's original message shown
_BODY_CAP = 4096  # bytes of a POST body read


_IN_PROGRESS: Any = object()  # an action still running when its request answers


class _HttpError(Exception):
    def __init__(self, status: str, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.headers = headers


def allowed_hosts(address: tuple[str, int], names: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` values the dashboard bound to ``address`` answers (lower case):
    ``host:port`` as bound, the loopback names with the port, and each of ``names``
    (from ``--web-host``) as given and with the port."""
    host, port = address
    bound = f"[{host}]" if ":" in host else host
    allowed = {f"{bound}:{port}", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    for name in names:
        allowed |= {name, f"{name}:{port}"}
    return frozenset(h.lower() for h in allowed)


def _json_bytes(value: Any) -> bytes:
    """JSON with ``<``, ``>`` and ``&`` escaped: inert even if a browser sniffed it."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").encode()


# -- the routing graph, laid out -----------------------------------------------------

_NODE_W, _NODE_H, _COL_W, _ROW_H, _MARGIN = 200, 96, 280, 124, 20


def graph_layout(graph: RoutingGraph) -> dict[str, Any]:
    """Boxes and arrows of ``graph`` for the page to draw (it draws no other layout).

    Columns by distance along the peers edges from the listeners no other listener
    names (column 1; the outside is column 0); "any listener" (when some listener
    may forward to any) in a column after the last. Needs no Graphviz.
    """
    by_id = {node.id: node for node in graph.listeners}
    named = {p for node in graph.listeners for p in node.peers or ()}
    depth: dict[str, int] = {}
    todo = [node.id for node in graph.listeners if node.id not in named]
    for node_id in todo:
        depth[node_id] = 1
    while todo:
        following = []
        for node_id in todo:
            for peer in by_id[node_id].peers or ():
                if peer not in depth:
                    depth[peer] = depth[node_id] + 1
                    following.append(peer)
        todo = following
    for node in graph.listeners:
        depth.setdefault(node.id, 1)  # only reached in a cycle
    last = max(depth.values(), default=1)
    rows: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []

    def place(node_id: str, name: str, kind: str, column: int, **extra: Any) -> None:
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({
            "id": node_id, "name": name, "kind": kind,
            "x": _MARGIN + column * _COL_W, "y": _MARGIN + row * _ROW_H,
            "w": _NODE_W, "h": _NODE_H, **extra,
        })  # fmt: skip

    place("outside", "outside", "outside", 0)
    for node in graph.listeners:
        place(node.id, node.name, "listener", depth[node.id],
              cpu_bound=node.cpu_bound, payloads=list(node.payloads))  # fmt: skip
    edges = [{"from": "outside", "to": n.id, "dashed": True}
             for n in graph.listeners if depth[n.id] == 1]  # fmt: skip
    for node in graph.listeners:
        if node.peers is None:
            edges.append({"from": node.id, "to": "any", "dashed": False})
        else:
            edges.extend({"from": node.id, "to": p, "dashed": False} for p in node.peers)
    if graph.unrestricted:
        place("any", "any listener", "any", last + 1)
    width = _MARGIN * 2 + (max(n["x"] for n in nodes) - _MARGIN) + _NODE_W
    height = _MARGIN * 2 + (max(n["y"] for n in nodes) - _MARGIN) + _NODE_H
    return {"organism": graph.name, "width": width, "height": height,
            "nodes": nodes, "edges": edges}  # fmt: skip


# -- what the live view sends ----------------------------------------------------------


def _rate(now: int, before: int | None, seconds: float) -> float | None:
    if before is None or seconds <= 0:
        return None
    return round(max(now - before, 0) / seconds, 2)


_NODE_FIELDS = ("pid", "host", "listeners", "held", "shards", "taken_over", "draining",
                "started", "version")  # fmt: skip
_INBOX_FIELDS = ("length", "pending", "lag", "oldest_ms", "pending_by_node", "shards_by_node")


def _transport_view(snapshot: Any) -> dict[str, Any] | None:
    """The distributed transport as the nodes page shows it (None: in-process inboxes):
    the nodes alive with what their heartbeats say, each listener's inbox streams, and
    the entries taken over from nodes that stopped ("reclaimed")."""
    if not snapshot.transport:
        return None
    nodes = {
        str(name): {key: info.get(key) for key in _NODE_FIELDS}
        for name, info in snapshot.nodes.items()
        if isinstance(info, Mapping)
    }
    reclaimed = sum(n["taken_over"] for n in nodes.values() if isinstance(n["taken_over"], int))
    return {
        "up": snapshot.transport_up,
        "nodes": nodes,
        "reclaimed": reclaimed,
        "inboxes": {
            name: {key: status.get(key) for key in _INBOX_FIELDS}
            for name, status in snapshot.inboxes.items()
        },
    }


def live_view(snapshot: Any, previous: Any | None, now: float) -> dict[str, Any]:
    """The event the live view sends: every listener's counters and rates per second
    (between ``previous`` and ``snapshot``, two probe snapshots), the pool, the
    distributed transport's nodes and inboxes (``transport``, None without one), and
    how old the snapshot is (the page says the loop is stuck when it grows)."""
    stats = snapshot.stats
    before = previous.stats.listeners if previous is not None else {}
    seconds = snapshot.taken - previous.taken if previous is not None else 0.0
    listeners = {}
    for name, s in stats.listeners.items():
        b = before.get(name)
        listeners[name] = {
            "received": s.received, "handled": s.handled, "failed": s.failed,
            "received_s": _rate(s.received, b and b.received, seconds),
            "handled_s": _rate(s.handled, b and b.handled, seconds),
            "failed_s": _rate(s.failed, b and b.failed, seconds),
            "in_flight": s.in_flight, "queued": s.queued,
            "p50_ms": s.latency_p50_ms, "p99_ms": s.latency_p99_ms,
            "failures": dict(s.failures),
        }  # fmt: skip
    pool = stats.pool
    return {
        "age_s": round(max(now - snapshot.taken, 0.0), 3),
        "ingress": stats.ingress, "rejected": stats.rejected, "egress": stats.egress,
        "dead_letters": stats.dead_letters, "in_pump": stats.in_pump,
        "backend_up": snapshot.backend_up,
        "pool": None if pool is None else {
            "workers": pool.workers, "queued": pool.queued, "in_flight": pool.in_flight,
            "tasks": pool.tasks, "crashes": pool.crashes, "timeouts": pool.timeouts,
            "recycles": pool.recycles,
        },
        "listeners": listeners,
        "transport": _transport_view(snapshot),
    }  # fmt: skip


# -- backend reads -------------------------------------------------------------------


def _pretty(xml: bytes) -> str:
    """A payload pretty-printed (through the hardened parser), or as it is."""
    from lxml import etree

    try:
        root = parse_bytes(xml)
    except MessageError:
        return xml.decode("utf-8", "replace")
    text: str = etree.tostring(root, pretty_print=True, encoding="unicode")
    return text.rstrip("\n")


def _slot(s: Slot) -> dict[str, Any]:
    return {
        "index": s.index, "direction": s.direction, "from": s.sender, "to": s.to,
        "payload": s.payload, "message": s.message_id, "time": s.timestamp,
        "xml": _pretty(s.xml),
    }  # fmt: skip


def _frame(node: FrameTree) -> dict[str, Any]:
    return {
        "thread": node.uuid,
        "listener": node.hops[-1] if node.hops else None,
        "hops": list(node.hops),
        "slots": [_slot(s) for s in node.slots],
        "children": [_frame(child) for child in node.children],
    }


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    """One conversation as the page draws it: its frames as a tree, every slot in
    order with its payload pretty-printed."""
    return {
        "conversation": conversation.id,
        "origin": conversation.origin,
        "frame": _frame(conversation.root),
    }


async def conversations_overview(backend: Backend) -> dict[str, Any]:
    """The most recent and the slowest of the last conversations the registry lists.

    Bounded: one registry listing, then one history read (the root frame's) for each
    of the last ``_SCAN_CONVERSATIONS`` conversations. A conversation's time is from
    its input to its last answer (or to now while none came: "open").
    """
    chains = await backend.registry_list_all()
    roots = []
    for uuid, chain in chains.items():
        frame = decode_frame(uuid, chain) if chain.startswith("[") else None
        if frame is not None and not frame.hops and frame.root == uuid:
            roots.append(frame)
    roots = roots[-_SCAN_CONVERSATIONS:]
    histories = await asyncio.gather(*(backend.buffer_get_thread(f.uuid) for f in roots))
    now = time.time()
    found: list[dict[str, Any]] = []
    for frame, slots in zip(roots, histories, strict=True):
        if not slots:
            continue
        first = slots[0]
        answers = [s for s in slots if s.direction == "in"]
        end = answers[-1].timestamp if answers else now
        found.append({
            "conversation": frame.uuid, "origin": frame.origin, "to": first.to,
            "message": first.message_id, "payload": first.payload, "time": first.timestamp,
            "duration_s": round(max(end - first.timestamp, 0.0), 6),
            "answered": bool(answers), "slots": len(slots),
        })  # fmt: skip
    recent = sorted(found, key=lambda c: c["time"], reverse=True)[:_SHOWN]
    slowest = sorted(found, key=lambda c: c["duration_s"], reverse=True)[:_SHOWN]
    return {"scanned": len(roots), "total": len(found), "recent": recent, "slowest": slowest}


def _letter(letter: DeadLetter) -> dict[str, Any]:
    data = letter.data[:_DATA_CAP]
    return {
        "id": letter.id, "time": letter.timestamp, "code": letter.code,
        "reason": letter.reason, "listener": letter.listener, "thread": letter.thread_id,
        "message": letter.message_id, "stage": letter.stage, "sender": letter.sender,
        "to": letter.to, "attempts": letter.attempts, "last_error": letter.last_error,
        "data": data.decode("utf-8", "replace"), "data_bytes": len(letter.data),
        "data_capped": len(letter.data) > _DATA_CAP,
    }  # fmt: skip


# -- the app --------------------------------------------------------------------------


class Dashboard:
    """The dashboard's WSGI application, served by the metrics server
    (:func:`xml_pipeline.metrics.serve_metrics` with ``dashboard=``).

    Args:
        token: the token actions need (None: read-only), at least ``MIN_TOKEN``
            characters.
        hosts: more names requests may give as ``Host`` (``--web-host``: the name a
            reverse proxy passes on), besides the bound address and the loopback.

    Raises:
        ValueError: the token is shorter than ``MIN_TOKEN``.
    """

    def __init__(self, token: str | None = None, hosts: Iterable[str] = ()) -> None:
        self.token = token or None
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise ValueError(f"a dashboard token needs at least {MIN_TOKEN} characters")
        self._failures: list[float] = []  # when wrong tokens came (monotonic)
        self._locked_until = 0.0
        self._failures_lock = threading.Lock()
        self._names = tuple(hosts)
        self._hosts: frozenset[str] = frozenset()
        self._pump: StreamPump | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snapshot: Callable[[], Any] = lambda: None
        self._layout: dict[str, Any] = {}
        self._cpu_bound: dict[str, bool] = {}
        self._streams = threading.Semaphore(_MAX_STREAMS)
        self._actions: set[asyncio.Future[Any]] = set()  # running on the loop (its own)
        self._expensive = threading.Semaphore(1)
        self._cache: dict[str, tuple[float, Any]] = {}
        self._cache_lock = threading.Lock()
        self._closing = threading.Event()

    def bind(
        self,
        pump: StreamPump,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[], Any],
        address: tuple[str, int],
    ) -> None:
        """Attach to ``pump`` running on ``loop``, served on ``address`` (host, port as
        bound); ``snapshot()`` returns the probe's latest snapshot (called in request
        threads)."""
        self._pump, self._loop, self._snapshot = pump, loop, snapshot
        self._hosts = allowed_hosts(address, self._names)
        graph = routing_graph(pump.organism)
        self._layout = graph_layout(graph)
        self._cpu_bound = {node.name: node.cpu_bound for node in graph.listeners}
        self._closing.clear()

    def close(self) -> None:
        """End the event streams (at their next tick)."""
        self._closing.set()

    # -- plumbing

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``make()`` on the pump's loop and wait for it (from a request thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise _HttpError("503 Service Unavailable", "the organism is not running")
        try:
            future = asyncio.run_coroutine_threadsafe(make(), loop)
        except RuntimeError as exc:
            raise _HttpError("503 Service Unavailable", "the organism is not running") from exc
        try:
            return future.result(_LOOP_TIMEOUT_S)
        except FutureTimeout as exc:
            future.cancel()
            raise _HttpError(
                "503 Service Unavailable",
                f"the event loop did not answer within {_LOOP_TIMEOUT_S:g} s",
            ) from exc

    def _act_on_loop(
        self, make: Callable[[], Coroutine[Any, Any, Any]], *, expensive: bool = False
    ) -> Any:
        """Run the action ``make()`` as a task the loop owns, and wait for its result
        up to the deadline; ``_IN_PROGRESS`` once it passed.

        An action is never cancelled on the HTTP deadline: a cancel can land after the
        message was fed, and the letter would then be written back and fed twice. A
        slow answer is back-pressure (the pump's queues full), not a stuck loop; the
        task finishes on its own. ``expensive``: hold the one-at-a-time bound of the
        reads that grow with the store until the task ends (429 when it is taken).
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            raise _HttpError("503 Service Unavailable", "the organism is not running")
        if expensive and not self._expensive.acquire(blocking=False):
            raise _HttpError("429 Too Many Requests", "another read is under way: retry",
                             (("Retry-After", "1"),))  # fmt: skip

        def release() -> None:
            if expensive:
                self._expensive.release()

        async def start() -> Any:
            try:
                task = asyncio.ensure_future(make())
            except BaseException:
                release()
                raise
            self._actions.add(task)
            task.add_done_callback(self._actions.discard)
            task.add_done_callback(lambda _: release())
            return await asyncio.shield(task)

        coroutine = start()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError as exc:
            coroutine.close()
            release()
            raise _HttpError("503 Service Unavailable", "the organism is not running") from exc
        try:
            return future.result(_LOOP_TIMEOUT_S)
        except FutureTimeout:
            return _IN_PROGRESS

    def _read_on_loop(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """:meth:`_on_loop` for a read that grows with the store: one at a time."""
        if not self._expensive.acquire(blocking=False):
            raise _HttpError("429 Too Many Requests", "another read is under way: retry",
                             (("Retry-After", "1"),))  # fmt: skip
        try:
            return self._on_loop(make)
        finally:
            self._expensive.release()

    def _cached(self, key: str, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """The answer of :meth:`_read_on_loop` for ``key``, read again once older than
        ``_CACHE_S``."""
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_S:
            return hit[1]
        value = self._read_on_loop(make)
        with self._cache_lock:
            self._cache[key] = (time.monotonic(), value)
        return value

    @staticmethod
    def _respond(
        start_response: Callable[..., Any], status: str, body: bytes, content_type: str,
        extra: Iterable[tuple[str, str]] = (),
    ) -> list[bytes]:  # fmt: skip
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(status, [*headers, *extra, *_SECURITY_HEADERS])
        return [body]

    def _json(self, start_response: Callable[..., Any], value: Any, status: str = "200 OK",
              extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:  # fmt: skip
        return self._respond(start_response, status, _json_bytes(value),
                             "application/json; charset=utf-8", extra)  # fmt: skip

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        head = environ.get("REQUEST_METHOD") == "HEAD"
        try:
            self._check_host(environ)
            if head:
                # Not served: a HEAD of /api/events would hold a stream slot, of the
                # API a backend read, for headers only.
                raise _HttpError("405 Method Not Allowed", "GET or POST only",
                                 (("Allow", "GET, POST"),))  # fmt: skip
            return self._route(environ, start_response)
        except _HttpError as exc:
            answer = self._json(start_response, {"error": str(exc)}, exc.status, exc.headers)
        except PumpClosed as exc:
            answer = self._json(start_response, {"error": f"the pump is stopping: {exc}"},
                                "503 Service Unavailable")  # fmt: skip
        except BackendError as exc:
            answer = self._json(start_response, {"error": f"the backend failed: {exc}"},
                                "503 Service Unavailable")  # fmt: skip
        return [] if head else answer  # a HEAD answer has its headers only

    def _check_host(self, environ: dict[str, Any]) -> None:
        """Refuse a request that names another host (a DNS rebinding) or that a
        browser says comes from another site."""
        if environ.get("HTTP_HOST", "").lower() not in self._hosts:
            raise _HttpError(
                "421 Misdirected Request",
                "this dashboard does not serve that host name "
                "(a proxy must pass Host on, or be named with --web-host)",
            )
        path = environ.get("PATH_INFO", "")
        if path.startswith("/api/") and environ.get("HTTP_SEC_FETCH_SITE") == "cross-site":
            raise _HttpError("403 Forbidden", "cross-site request refused")

    def _route(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        try:
            query = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=8)
        except ValueError as exc:  # more than 8 fields
            raise _HttpError("400 Bad Request", "too many query fields (8 at most)") from exc
        if method == "POST":
            return self._action(environ, start_response, path)
        if method != "GET":
            raise _HttpError("405 Method Not Allowed", "GET or POST only",
                             (("Allow", "GET, POST"),))  # fmt: skip
        if path in _PAGES:
            body = files(__package__).joinpath("static", _PAGES[path]).read_bytes()
            return self._respond(start_response, "200 OK", body, "text/html; charset=utf-8")
        if path.startswith("/static/") and path[8:] in _STATIC:
            body = files(__package__).joinpath("static", path[8:]).read_bytes()
            return self._respond(start_response, "200 OK", body, _STATIC[path[8:]])
        if path == "/api/graph":
            return self._json(start_response, {
                **self._layout, "actions": self.token is not None, "cpu_bound": self._cpu_bound,
                "node": self._pump.node if self._pump is not None else None,
                "transport": self._snapshot().transport,
            })  # fmt: skip
        if path == "/api/stats":
            return self._json(start_response, live_view(self._snapshot(), None, time.monotonic()))
        if path == "/api/events":
            return self._events(environ, start_response)
        if path == "/api/conversations":
            return self._json(start_response, self._cached(
                "conversations", lambda: conversations_overview(self._backend())))  # fmt: skip
        if path == "/api/conversation":
            return self._conversation(start_response, (query.get("id") or [""])[0].strip())
        if path == "/api/deadletters":
            return self._dead_letters(start_response, query)
        raise _HttpError("404 Not Found", "no such page")

    def _backend(self) -> Backend:
        if self._pump is None:
            raise _HttpError("503 Service Unavailable", "the organism is not running")
        return self._pump.backend

    # -- the live view

    def _events(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self._streams.acquire(blocking=False):
            raise _HttpError("503 Service Unavailable", "too many event streams open")
        extend = environ.get("xml_pipeline.extend_deadline")
        if extend is not None:
            extend(_STREAM_S + 5)
        start_response("200 OK", [("Content-Type", "text/event-stream; charset=utf-8"),
                                  *_SECURITY_HEADERS])  # fmt: skip
        return self._stream()

    def _stream(self) -> Iterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            end = time.monotonic() + _STREAM_S
            sent: Any = None
            while time.monotonic() < end and not self._closing.is_set():
                snapshot = self._snapshot()
                now = time.monotonic()
                if snapshot is not sent:
                    # One event per new snapshot, rates against the one sent before it.
                    yield b"data: " + _json_bytes(live_view(snapshot, sent, now)) + b"\n\n"
                    sent = snapshot
                else:
                    # The loop made no snapshot: say how old the last is (stuck?).
                    yield b'event: age\ndata: {"age_s":%.3f}\n\n' % max(now - snapshot.taken, 0)
                self._closing.wait(EVENT_INTERVAL_S)
        finally:
            self._streams.release()

    # -- conversations and dead letters

    def _conversation(self, start_response: Callable[..., Any], wanted: str) -> Any:
        if not wanted or len(wanted) > 200:
            raise _HttpError("400 Bad Request", "give ?id= a thread id or a message id")

        async def read() -> Any:
            backend = self._backend()
            if await backend.registry_get_chain(wanted) is None:
                # Not a frame's id: finding it by message id reads every conversation.
                entries = (await backend.info()).get("registry_entries", 0)
                if entries > _SEARCH_CAP:
                    raise _HttpError("400 Bad Request", "search by thread id; the registry "
                                     f"holds {entries} frames, too many to scan")  # fmt: skip
            return await find_conversation(backend, wanted)

        try:
            found = self._read_on_loop(read)
        except AmbiguousId as exc:
            raise _HttpError("409 Conflict", str(exc)) from exc
        if found is None:
            raise _HttpError("404 Not Found", "no conversation has that id")
        return self._json(start_response, conversation_json(found))

    def _dead_letters(self, start_response: Callable[..., Any],
                      query: Mapping[str, list[str]]) -> Any:  # fmt: skip
        code = (query.get("code") or [""])[0]
        listener = (query.get("listener") or [""])[0]

        async def read() -> list[DeadLetter]:
            return await self._backend().deadletter_list(None)

        letters: list[DeadLetter] = self._cached("deadletters", read)
        codes = sorted({letter.code for letter in letters})
        listeners = sorted({letter.listener for letter in letters if letter.listener})
        chosen = [
            letter for letter in letters
            if (not code or letter.code == code) and (not listener or letter.listener == listener)
        ]  # fmt: skip
        chosen.sort(key=lambda letter: letter.timestamp, reverse=True)
        return self._json(start_response, {
            "total": len(letters), "matching": len(chosen), "codes": codes,
            "listeners": listeners, "actions": self.token is not None,
            "letters": [_letter(letter) for letter in chosen[:_DEAD_LETTERS]],
        })  # fmt: skip

    # -- actions

    def _check_action(self, environ: dict[str, Any]) -> None:
        """Raise unless a POST carries the token in its header and comes from a page
        of this server (``Origin``: ``http://`` and an allowed host)."""
        if self.token is None:
            raise _HttpError("403 Forbidden", "read-only: start run with --web-token-file "
                             f"(or {TOKEN_ENV}) to allow actions")  # fmt: skip
        origin = urlsplit(environ.get("HTTP_ORIGIN", ""))
        if origin.scheme != "http" or origin.netloc.lower() not in self._hosts or origin.path:
            raise _HttpError("403 Forbidden", "cross-origin request refused")
        with self._failures_lock:
            now = time.monotonic()
            if now < self._locked_until:
                wait = str(int(self._locked_until - now) + 1)
                raise _HttpError("429 Too Many Requests", "too many wrong tokens: retry later",
                                 (("Retry-After", wait),))  # fmt: skip
            given = environ.get("HTTP_" + TOKEN_HEADER.upper().replace("-", "_"), "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                self._failures = [t for t in self._failures if now - t < _GUESS_WINDOW_S]
                self._failures.append(now)
                if len(self._failures) >= _GUESSES:
                    self._failures.clear()
                    self._locked_until = now + _LOCKOUT_S
                raise _HttpError("401 Unauthorized", f"a valid {TOKEN_HEADER} header is needed")
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip() != "application/json":
            raise _HttpError("415 Unsupported Media Type", "send application/json")

    def _action(self, environ: dict[str, Any], start_response: Callable[..., Any],
                path: str) -> Any:  # fmt: skip
        if path not in ("/api/deadletters/replay", "/api/deadletters/purge"):
            raise _HttpError("404 Not Found", "no such action")
        self._check_action(environ)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= _BODY_CAP:
            raise _HttpError("400 Bad Request", "a JSON body of at most 4 KiB is needed")
        try:
            body = json.loads(environ["wsgi.input"].read(length))
            letter_id = body["id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise _HttpError("400 Bad Request", 'expected {"id": "..."}') from exc
        if not isinstance(letter_id, str) or not letter_id:
            raise _HttpError("400 Bad Request", "id must be a string")
        try:
            if path.endswith("/purge"):
                deleted = self._act_on_loop(lambda: self._backend().deadletter_delete(letter_id))
                result = deleted if deleted is _IN_PROGRESS else {"purged": bool(deleted)}
            else:
                # Replay lists every dead letter (the backends have no lookup by id).
                result = self._act_on_loop(lambda: self._replay(letter_id), expensive=True)
        finally:
            with self._cache_lock:
                self._cache.clear()  # the page reads the letters again after an action
        if result is _IN_PROGRESS:
            return self._json(start_response, {"id": letter_id, "status": "in progress"},
                              "202 Accepted")  # fmt: skip
        return self._json(start_response, {"id": letter_id, **result})

    async def _replay(self, letter_id: str) -> dict[str, Any]:
        pump = self._pump
        if pump is None:
            raise _HttpError("503 Service Unavailable", "the organism is not running")
        letters = await pump.backend.deadletter_list(None)
        letter = next((item for item in letters if item.id == letter_id), None)
        fed = None if letter is None else await replay_letter(pump, letter)
        result = {None: "gone", True: "replayed", False: "refused"}[fed]
        return {"result": result}
