"""The manager backend: one :class:`~xml_pipeline.backends.store.Store`, served to
several processes on one machine.

A :class:`ManagerServer` keeps the reference ``Store`` behind a lock and serves it
over TCP; :class:`ManagerBackend` is the async client the pump uses. Either a pump
serves the store itself (``serve``: a thread in that process) or a standalone
server runs it::

    XML_PIPELINE_MANAGER_AUTHKEY=... python -m xml_pipeline manager --address 127.0.0.1:50555
    XML_PIPELINE_MANAGER_AUTHKEY=... python -m xml_pipeline organism.yaml \\
        --backend manager://127.0.0.1:50555

The URL is ``manager://HOST:PORT``; ``manager://HOST:PORT?serve=1`` (or the
``serve`` option) makes this process the server, and port 0 then picks a free port.
The authkey comes from the ``authkey`` option or the ``XML_PIPELINE_MANAGER_AUTHKEY``
environment variable (never from the URL); it is never logged or shown.

Wire format (protocol 1)
------------------------

Transport: one TCP connection per client, framed by :mod:`multiprocessing.connection`
(``Connection.send_bytes``/``recv_bytes``: a 4-byte big-endian length, then the
bytes; never ``send``/``recv``, which pickle). On connect both sides prove they hold
the authkey with its HMAC challenge (``deliver_challenge``/``answer_challenge``: the
server challenges first), every read bounded in time, so a silent peer cannot hold
either side. After that every frame is UTF-8 JSON; nothing is pickled.

A client has one request in flight at a time. A request is a JSON array of calls,
run in order under the store's lock (a batch: the calls made while the previous
request was in flight); the response has one ``[status, value]`` per call, in the
same order: ``[0, RESULT]`` or ``[1, "why it failed"]``::

    → [["buffer_append","9b2f…",SLOT],["registry_get_chain","9b2f…"]]
    ← [[0,7],[0,"[\\"console\\",\\"greeter\\"]"]]

``SLOT`` and ``LETTER`` are exactly the JSON objects of
:func:`~xml_pipeline.backends.base.slot_to_bytes` and
:func:`~xml_pipeline.backends.base.dead_letter_to_bytes`. The calls are the
``Store`` methods, each one server-side method call::

    call                   arguments                     result
    hello                  protocol (1)                  {"protocol": 1, "limits": {...}}
    ping                   -                             null
    buffer_append          thread, SLOT                  index
    buffer_contains        thread, message id, direction true | false
    buffer_get_thread      thread                        [SLOT, ...]
    buffer_get_slot        thread, index                 SLOT | null
    buffer_thread_len      thread                        count
    buffer_thread_exists   thread                        true | false
    buffer_delete_thread   thread                        true | false
    buffer_list_threads    -                             [thread, ...]
    buffer_clear           -                             null
    registry_set           chain, uuid                   null
    registry_setdefault    chain, uuid                   uuid
    registry_get_uuid      chain                         uuid | null
    registry_get_chain     uuid                          chain | null
    registry_delete        uuid                          true | false
    registry_list_all      -                             {uuid: chain, ...}
    registry_clear         -                             null
    deadletter_add         LETTER                        id
    deadletter_add_many    [LETTER, ...]                 [id, ...]
    deadletter_list        limit | null                  [LETTER, ...]
    deadletter_delete      id                            true | false
    deadletter_purge       -                             count
    info                   -                             {name: count, ...}

The client's first call on a connection is ``hello``. A frame that is not a JSON
array, or larger than :data:`MAX_REQUEST_BYTES`, ends the connection.

The handshake authenticates both ends but nothing is encrypted: serve on a loopback
address (the server warns otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from ..exceptions import BackendError, BackendUnavailable
from .base import (
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_obj,
    dead_letter_to_bytes,
    slot_from_obj,
    slot_to_bytes,
)
from .scheme import ManagerOptions, serves
from .store import Store

__all__ = [
    "AUTHKEY_ENV",
    "MAX_REQUEST_BYTES",
    "PROTOCOL",
    "ManagerBackend",
    "ManagerServer",
    "ManagerStatistics",
    "parse_address",
    "serve_forever",
]

logger = logging.getLogger(__name__)

AUTHKEY_ENV = "XML_PIPELINE_MANAGER_AUTHKEY"
"""The environment variable holding the authkey when no ``authkey`` option is given."""

PROTOCOL = 1
"""The wire protocol version, checked by ``hello``."""

MAX_REQUEST_BYTES = 512 * 1024 * 1024
"""The largest request frame a server reads (before authentication: 256 bytes)."""

_BATCH_BYTES = 1 << 20  # a client stops adding calls to a batch past this many bytes
_BATCH_CALLS = 1024
_MANY_BYTES = 64 << 20  # deadletter_add_many splits a batch into calls of this size
_DIRECT_BYTES = 16 * 1024  # a caller writes a frame this small itself when nothing is in flight
_IDLE_CHECK_S = 1.0
_JOIN_TIMEOUT_S = 5.0

_OPTIONS = ManagerOptions()  # the defaults of the organism file's manager: section
_T = TypeVar("_T")
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _encode(value: Any) -> bytes:
    return _dumps(value).encode()


def _reason(exc: BaseException) -> str:
    """A short, lower-case reason (``address already in use``)."""
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        text = os.strerror(exc.errno) if exc.errno else str(exc.strerror)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _display(address: tuple[str, int]) -> str:
    host, port = address
    return f"manager://[{host}]:{port}" if ":" in host else f"manager://{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a ``(host, port)`` pair.

    Raises:
        ValueError: not of that form, or the port is not 0-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port_text)


def _set_timeouts(sock: socket.socket, seconds: float | None) -> None:
    # multiprocessing's Connection reads and writes the fd with plain blocking
    # os.read/os.write, so a Python socket timeout cannot bound it: the kernel's
    # SO_RCVTIMEO/SO_SNDTIMEO can (a read past it fails with EAGAIN). 0 = no bound.
    if seconds is None:
        sec, usec = 0, 0
    else:
        seconds = max(seconds, 0.001)
        sec, usec = int(seconds), int((seconds % 1) * 1_000_000)
    timeval = struct.pack("ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


# -- the server ----------------------------------------------------------------------


def _arg_str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, not {type(value).__name__}")
    return value


def _arg_int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, not {type(value).__name__}")
    return value


def _arg_opt_int(value: Any) -> int | None:
    return None if value is None else _arg_int(value)


def _arg_slot(value: Any) -> Slot:
    if type(value) is not dict:
        raise TypeError("expected a slot object")
    return slot_from_obj(value)


def _arg_letter(value: Any) -> DeadLetter:
    if type(value) is not dict:
        raise TypeError("expected a dead-letter object")
    return dead_letter_from_obj(value)


def _arg_letters(value: Any) -> list[DeadLetter]:
    if type(value) is not list:
        raise TypeError("expected an array of dead-letter objects")
    return [_arg_letter(item) for item in value]


def _out_slot(value: Slot | None) -> bytes:
    return b"null" if value is None else slot_to_bytes(value)


def _out_slots(value: list[Slot]) -> bytes:
    return b"[" + b",".join(map(slot_to_bytes, value)) + b"]"


def _out_letters(value: list[DeadLetter]) -> bytes:
    return b"[" + b",".join(map(dead_letter_to_bytes, value)) + b"]"


_Arg = Callable[[Any], Any]
_S, _I = _arg_str, _arg_int

# name → (argument checks, result encoder); the names are Store's methods.
_CALLS: dict[str, tuple[tuple[_Arg, ...], Callable[[Any], bytes]]] = {
    "buffer_append": ((_S, _arg_slot), _encode),
    "buffer_contains": ((_S, _S, _S), _encode),
    "buffer_get_thread": ((_S,), _out_slots),
    "buffer_get_slot": ((_S, _I), _out_slot),
    "buffer_thread_len": ((_S,), _encode),
    "buffer_thread_exists": ((_S,), _encode),
    "buffer_delete_thread": ((_S,), _encode),
    "buffer_list_threads": ((), _encode),
    "buffer_clear": ((), _encode),
    "registry_set": ((_S, _S), _encode),
    "registry_setdefault": ((_S, _S), _encode),
    "registry_get_uuid": ((_S,), _encode),
    "registry_get_chain": ((_S,), _encode),
    "registry_delete": ((_S,), _encode),
    "registry_list_all": ((), _encode),
    "registry_clear": ((), _encode),
    "deadletter_add": ((_arg_letter,), _encode),
    "deadletter_add_many": ((_arg_letters,), _encode),
    "deadletter_list": ((_arg_opt_int,), _out_letters),
    "deadletter_delete": ((_S,), _encode),
    "deadletter_purge": ((), _encode),
    "info": ((), _encode),
    "hello": ((_I,), _encode),
    "ping": ((), _encode),
}


class ManagerServer:
    """Serves one :class:`~xml_pipeline.backends.store.Store` at a TCP address.

    One thread accepts connections and one thread per connection authenticates the
    client (within ``handshake_timeout_s``) and runs its requests: a request's calls
    under the store's lock, one ``Store`` method each. Use
    ``with ManagerServer(...) as s:`` or :meth:`start` / :meth:`close`.

    Args:
        address: ``(host, port)``; port 0 picks a free port (see :attr:`address`).
        authkey: the shared secret clients must prove they hold.
        limits: the store's trimming and eviction bounds.
        handshake_timeout_s: how long a new connection may take to authenticate.
    """

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        limits: HistoryLimits | None = None,
        *,
        handshake_timeout_s: float = 5.0,
    ) -> None:
        if not authkey:
            raise ValueError("the manager server needs a non-empty authkey")
        self.limits = limits or HistoryLimits()
        self._requested = address
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout_s
        self._store = Store(self.limits)
        self._lock = threading.Lock()
        own = {"hello": self._hello, "ping": self._ping}
        self._calls = {
            name: (own.get(name) or getattr(self._store, name), checks, encode)
            for name, (checks, encode) in _CALLS.items()
        }
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._clients_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ManagerServer {_display(self.address)}>"

    @property
    def address(self) -> tuple[str, int]:
        """The address served (with the actual port once started)."""
        return self._bound or self._requested

    def start(self) -> None:
        """Bind the address and start accepting connections.

        Raises:
            OSError: the address cannot be bound (in use, not local, ...).
        """
        if self._sock is not None or self._closed:
            raise RuntimeError("a ManagerServer starts once")
        host, _ = self._requested
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server(self._requested, family=family, backlog=128)
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._bound = (str(host), int(port))
        self._wake_r, self._wake_w = socket.socketpair()
        if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
            logger.warning(
                "manager: serving at %s: the traffic is authenticated, not encrypted; "
                "prefer a loopback address",
                _display(self.address),
            )
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"xml_pipeline manager {self.address}", daemon=True
        )
        self._acceptor.start()
        logger.info("manager: serving at %s", _display(self.address))

    def close(self) -> None:
        """Stop accepting, disconnect every client and wait for their threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._acceptor is not None and self._wake_w is not None:
            self._wake_w.send(b"\0")
            self._acceptor.join()
        for sock in (self._sock, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        with self._clients_lock:
            threads = list(self._clients.values())
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)  # wakes its thread's read
        for thread in threads:
            thread.join(_JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("manager: a connection thread did not stop in time")

    def __enter__(self) -> ManagerServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connections -----------------------------------------------------------

    def _accept_loop(self) -> None:
        listener, wake = self._sock, self._wake_r
        assert listener is not None
        assert wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                events = selector.select()
                if any(key.fileobj is wake for key, _ in events):
                    return
                try:
                    client, peer = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:  # out of file descriptors, ...
                    logger.error("manager: cannot accept a connection: %s", _reason(exc))
                    time.sleep(0.1)
                    continue
                thread = threading.Thread(
                    target=self._serve_client,
                    args=(client, peer),
                    name=f"xml_pipeline manager client {peer}",
                    daemon=True,
                )
                with self._clients_lock:
                    self._clients[client] = thread
                thread.start()

    def _serve_client(self, sock: socket.socket, peer: Any) -> None:
        conn: Connection[Any, Any] | None = None
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_timeouts(sock, self._handshake_timeout)
            conn = Connection(os.dup(sock.fileno()))
            try:
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
            except AuthenticationError:
                logger.warning("manager: a client from %s failed authentication", peer)
                return
            except Exception as exc:  # silent, closed, or not speaking the protocol
                logger.info("manager: handshake with %s failed: %s", peer, _reason(exc))
                return
            _set_timeouts(sock, None)  # an idle client may wait as long as it likes
            while True:
                try:
                    frame = conn.recv_bytes(MAX_REQUEST_BYTES)
                except (EOFError, OSError):
                    return
                try:
                    reply = self._run(frame)
                except (ValueError, RecursionError) as exc:
                    logger.warning("manager: bad request from %s, disconnecting: %s", peer, exc)
                    return
                conn.send_bytes(reply)
        except (EOFError, OSError):
            return
        except Exception:  # a bug: keep serving the others
            logger.exception("manager: connection from %s failed", peer)
        finally:
            with self._clients_lock:
                self._clients.pop(sock, None)
            if conn is not None:
                conn.close()
            sock.close()

    # -- requests --------------------------------------------------------------

    def _hello(self, protocol: int) -> dict[str, Any]:
        if protocol != PROTOCOL:
            raise ValueError(
                f"protocol {protocol} is not supported (this server speaks {PROTOCOL})"
            )
        return {"protocol": PROTOCOL, "limits": dataclasses.asdict(self.limits)}

    def _ping(self) -> None:
        return None

    def _run(self, frame: bytes) -> bytes:
        """Run one request frame; return the response frame. ValueError: not a request."""
        calls = json.loads(frame)
        if type(calls) is not list:
            raise ValueError("a request is a JSON array of calls")
        prepared: list[tuple[Any, list[Any], Callable[[Any], bytes], str] | str] = []
        for call in calls:
            name = call[0] if type(call) is list and call and type(call[0]) is str else None
            entry = self._calls.get(name) if name is not None else None
            if name is None or entry is None:
                prepared.append(f"unknown call {str(call)[:80]!r}")
                continue
            method, checks, encode = entry
            args = call[1:]
            if len(args) != len(checks):
                prepared.append(f"{name}: expected {len(checks)} argument(s), got {len(args)}")
                continue
            try:
                values = [check(arg) for check, arg in zip(checks, args, strict=True)]
            except (TypeError, ValueError, KeyError) as exc:
                prepared.append(f"{name}: bad argument: {type(exc).__name__}: {exc}")
            else:
                prepared.append((method, values, encode, name))
        outcomes: list[tuple[bool, Any]] = []
        with self._lock:
            for item in prepared:
                if isinstance(item, str):
                    outcomes.append((False, item))
                    continue
                method, args, _, name = item
                try:
                    outcomes.append((True, method(*args)))
                except Exception as exc:
                    outcomes.append((False, f"{name}: {type(exc).__name__}: {exc}"))
        parts = []
        for item, (ok, value) in zip(prepared, outcomes, strict=True):
            if ok and not isinstance(item, str):
                parts.append(b"[0," + item[2](value) + b"]")
            else:
                parts.append(b"[1," + _encode(value) + b"]")
        return b"[" + b",".join(parts) + b"]"


def serve_forever(
    address: tuple[str, int],
    authkey: bytes,
    limits: HistoryLimits | None = None,
    *,
    ready: Callable[[tuple[str, int]], object] | None = None,
) -> int:
    """Serve a store at ``address`` until SIGINT or SIGTERM. Call from the main thread.

    Args:
        address: ``(host, port)``; port 0 picks a free port.
        authkey: the shared secret.
        limits: the store's bounds.
        ready: called with the address served once clients can connect.

    Returns:
        The number of the signal that stopped the server.

    Raises:
        OSError: the address cannot be bound.
    """
    signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before any thread starts, so every thread inherits the mask and the
    # signal waits for sigwait below instead of interrupting anything.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        with ManagerServer(address, authkey, limits) as server:
            if ready is not None:
                ready(server.address)
            signum = int(signal.sigwait(signals))
            logger.info("manager: %s, stopping", signal.Signals(signum).name)
        while signals & signal.sigpending():  # a second signal during shutdown
            signal.sigwait(signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return signum


# -- the client ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManagerStatistics:
    """What a :class:`ManagerBackend` has sent.

    Attributes:
        calls: backend calls answered by the server.
        round_trips: request frames sent (several calls waiting share one).
        connects: connections made (reconnects after a lost connection count too).
    """

    calls: int
    round_trips: int
    connects: int


_Item = tuple[bytes, Callable[[Any], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
_Result = tuple[asyncio.Future[Any], BaseException | None, Any]


def _hand_back(results: list[_Result]) -> None:
    for future, exc, value in results:
        if future.done():  # cancelled while waiting
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)


def _as_bool(value: Any) -> bool:
    return bool(value)


def _as_int(value: Any) -> int:
    return int(value)


def _as_str(value: Any) -> str:
    return str(value)


def _as_opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_none(value: Any) -> None:
    return None


def _as_slot(value: Any) -> Slot | None:
    return None if value is None else slot_from_obj(value)


def _as_slots(value: Any) -> list[Slot]:
    return [slot_from_obj(obj) for obj in value]


def _as_letters(value: Any) -> list[DeadLetter]:
    return [dead_letter_from_obj(obj) for obj in value]


def _as_strs(value: Any) -> list[str]:
    return [str(x) for x in value]


def _as_str_dict(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()}


def _as_int_dict(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in value.items()}


def _request(*call: Any) -> bytes:
    return _encode(call)


class ManagerBackend:
    """The async client of a :class:`ManagerServer` (see the module docs).

    Calls never block the event loop. One request frame is in flight at a time: a
    call made while the connection is idle writes its (small) frame at once; calls
    made while a frame is in flight wait and go together as the next frame. A
    dedicated I/O thread per backend waits for the answers, hands them back with
    ``loop.call_soon_threadsafe``, sends the next batch, and connects (the
    connection is made on first use, see :meth:`ping`, and remade after it is
    lost; a call in flight when it is lost fails with BackendUnavailable). Calls
    made in order (from one thread) run on the server in that order.

    Prefer :meth:`from_url`. Args:
        address: ``(host, port)`` of the server.
        authkey: the shared secret.
        limits: the bounds of the store this process serves (``serve``); a server
            elsewhere applies its own, and a difference is logged.
        serve: start the server in this process (a thread), stopped by :meth:`aclose`.
        connect_timeout_s: bound on connecting and authenticating.
        request_timeout_s: bound on a silent server while a request is in flight.
    """

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        limits: HistoryLimits | None = None,
        *,
        serve: bool = _OPTIONS.serve,
        connect_timeout_s: float = _OPTIONS.connect_timeout_s,
        request_timeout_s: float = 30.0,
    ) -> None:
        if not authkey:
            raise BackendUnavailable(f"{_display(address)}: the authkey is empty")
        if connect_timeout_s <= 0 or request_timeout_s <= 0:
            raise BackendUnavailable(f"{_display(address)}: timeouts must be positive")
        if address[1] == 0 and not serve:
            raise BackendUnavailable(
                f"{_display(address)}: port 0 (a free port) needs serve: name the server's port"
            )
        self._explicit_limits = limits
        self.limits = limits or HistoryLimits()
        self._address = address
        self._authkey = authkey
        self._serve = serve
        self._connect_timeout = connect_timeout_s
        self._request_timeout = request_timeout_s
        # Shared by the callers and the I/O thread, under _lock: the connection is
        # used by a caller only to write a frame while nothing is in flight, and
        # closed only by the I/O thread.
        self._lock = threading.Lock()
        self._pending: list[_Item] = []
        self._inflight: list[_Item] | None = None
        self._sent_at = 0.0
        self._conn: Connection[Any, Any] | None = None
        self._broken: BaseException | None = None
        self._closed = False
        self._closers: list[tuple[asyncio.Future[None], asyncio.AbstractEventLoop]] = []
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # The I/O thread's own:
        self._server: ManagerServer | None = None
        self._sock: socket.socket | None = None
        self._poller: select.poll | None = None
        self._calls = 0
        self._round_trips = 0
        self._connects = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: HistoryLimits | None = None,
        *,
        authkey: str | bytes | None = _OPTIONS.authkey,
        serve: bool = _OPTIONS.serve,
        connect_timeout_s: float = _OPTIONS.connect_timeout_s,
        request_timeout_s: float = 30.0,
    ) -> ManagerBackend:
        """A backend for ``manager://HOST:PORT`` (``?serve=1`` overrides ``serve``).

        Nothing is connected yet. The authkey is ``authkey`` or else the
        ``XML_PIPELINE_MANAGER_AUTHKEY`` environment variable.

        Raises:
            BackendUnavailable: a malformed URL, or no authkey.
        """
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise BackendUnavailable(
                "manager:// URLs carry no credentials: set the authkey in "
                f"{AUTHKEY_ENV} or the organism's manager.authkey"
            )
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            host = port = None
        if parts.scheme != "manager" or not host or port is None or parts.path not in ("", "/"):
            raise BackendUnavailable(f"{url!r} is not a manager URL: expected manager://HOST:PORT")
        display = _display((host, port))
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key != "serve":
                raise BackendUnavailable(
                    f"{display}: unknown URL option {key}={value!r} (only serve=1 or serve=0)"
                )
        serve = serves(url, {"serve": serve})  # the URL's serve= wins
        key_text = authkey if authkey is not None else os.environ.get(AUTHKEY_ENV)
        if not key_text:
            raise BackendUnavailable(
                f"{display}: no authkey: set the {AUTHKEY_ENV} environment variable "
                "(the same secret for the server and every client) or manager.authkey "
                "in the organism file"
            )
        return cls(
            (host, port),
            key_text.encode() if isinstance(key_text, str) else bytes(key_text),
            limits,
            serve=serve,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
        )

    def __repr__(self) -> str:
        return f"<ManagerBackend {self.url}{' serving' if self._serve else ''}>"

    @property
    def url(self) -> str:
        """``manager://HOST:PORT`` (with the actual port once serving at port 0)."""
        return _display(self.address)

    @property
    def address(self) -> tuple[str, int]:
        """The server's address (with the actual port once serving at port 0)."""
        server = self._server
        return server.address if server is not None else self._address

    def statistics(self) -> ManagerStatistics:
        """Counters of calls, round trips and connections so far."""
        return ManagerStatistics(self._calls, self._round_trips, self._connects)

    # -- the event-loop side ---------------------------------------------------

    async def _call(self, request: bytes, decode: Callable[[Any], _T]) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        item: _Item = (request, decode, future, loop)
        with self._lock:
            if self._closed:
                raise BackendUnavailable(f"{self.url}: the backend is closed")
            conn = self._conn
            if (
                conn is not None
                and self._inflight is None
                and not self._pending
                and len(request) <= _DIRECT_BYTES
            ):
                # Idle: write the frame now. It is small and nothing else is in
                # flight, so the socket buffer takes it without waiting.
                self._inflight = [item]
                self._sent_at = time.monotonic()
                try:
                    conn.send_bytes(b"[" + request + b"]")
                except OSError as exc:
                    self._broken = exc
                    self._wake()
            else:
                self._pending.append(item)
                if self._thread is None:
                    self._start()
                if self._inflight is None:
                    self._wake()  # otherwise the I/O thread sends it after the answer
        return await future

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        request = b'["buffer_append",' + _encode(thread_id) + b"," + slot_to_bytes(slot) + b"]"
        return await self._call(request, _as_int)

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        request = _request("buffer_contains", thread_id, message_id, direction)
        return await self._call(request, _as_bool)

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        return await self._call(_request("buffer_get_thread", thread_id), _as_slots)

    async def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        return await self._call(_request("buffer_get_slot", thread_id, index), _as_slot)

    async def buffer_thread_len(self, thread_id: str) -> int:
        return await self._call(_request("buffer_thread_len", thread_id), _as_int)

    async def buffer_thread_exists(self, thread_id: str) -> bool:
        return await self._call(_request("buffer_thread_exists", thread_id), _as_bool)

    async def buffer_delete_thread(self, thread_id: str) -> bool:
        return await self._call(_request("buffer_delete_thread", thread_id), _as_bool)

    async def buffer_list_threads(self) -> list[str]:
        return await self._call(_request("buffer_list_threads"), _as_strs)

    async def buffer_clear(self) -> None:
        return await self._call(_request("buffer_clear"), _as_none)

    async def registry_set(self, chain: str, uuid: str) -> None:
        return await self._call(_request("registry_set", chain, uuid), _as_none)

    async def registry_setdefault(self, chain: str, uuid: str) -> str:
        return await self._call(_request("registry_setdefault", chain, uuid), _as_str)

    async def registry_get_uuid(self, chain: str) -> str | None:
        return await self._call(_request("registry_get_uuid", chain), _as_opt_str)

    async def registry_get_chain(self, uuid: str) -> str | None:
        return await self._call(_request("registry_get_chain", uuid), _as_opt_str)

    async def registry_delete(self, uuid: str) -> bool:
        return await self._call(_request("registry_delete", uuid), _as_bool)

    async def registry_list_all(self) -> dict[str, str]:
        return await self._call(_request("registry_list_all"), _as_str_dict)

    async def registry_clear(self) -> None:
        return await self._call(_request("registry_clear"), _as_none)

    async def deadletter_add(self, letter: DeadLetter) -> str:
        request = b'["deadletter_add",' + dead_letter_to_bytes(letter) + b"]"
        return await self._call(request, _as_str)

    async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Store the letters with one server-side call (one round trip), ids in order.

        A batch past 64 MiB of JSON goes as several calls, so that no request frame
        comes near :data:`MAX_REQUEST_BYTES`.
        """
        if not letters:
            return []
        requests: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        for letter in letters:
            data = dead_letter_to_bytes(letter)
            if chunk and size + len(data) > _MANY_BYTES:
                requests.append(b'["deadletter_add_many",[' + b",".join(chunk) + b"]]")
                chunk, size = [], 0
            chunk.append(data)
            size += len(data) + 1
        requests.append(b'["deadletter_add_many",[' + b",".join(chunk) + b"]]")
        if len(requests) == 1:
            return await self._call(requests[0], _as_strs)
        # Queued together, in order: they go out back to back.
        parts = await asyncio.gather(*(self._call(r, _as_strs) for r in requests))
        return [letter_id for part in parts for letter_id in part]

    async def deadletter_list(self, limit: int | None = None) -> list[DeadLetter]:
        return await self._call(_request("deadletter_list", limit), _as_letters)

    async def deadletter_delete(self, letter_id: str) -> bool:
        return await self._call(_request("deadletter_delete", letter_id), _as_bool)

    async def deadletter_purge(self) -> int:
        return await self._call(_request("deadletter_purge"), _as_int)

    async def info(self) -> dict[str, int]:
        return await self._call(_request("info"), _as_int_dict)

    async def ping(self) -> None:
        """Connect if needed (serving first if ``serve``) and make one round trip.

        Raises:
            BackendUnavailable: one line: refused, no answer within the timeout,
                wrong authkey, address in use (``serve``), ...
        """
        return await self._call(_request("ping"), _as_none)

    async def aclose(self) -> None:
        """Finish the calls already made, disconnect, and stop the server if this
        process serves it. Idempotent; later calls raise BackendUnavailable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is None:
                return
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            self._closers.append((done, loop))
            self._wake()
        await done
        thread.join()  # it has handed back its last result: at most a moment

    async def close(self) -> None:
        """Alias of :meth:`aclose`."""
        await self.aclose()

    # -- the I/O thread --------------------------------------------------------

    def _start(self) -> None:  # under _lock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._io_loop, name=f"xml_pipeline {self.url} client", daemon=True
        )
        self._thread.start()

    def _wake(self) -> None:  # under _lock
        assert self._wake_w is not None
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    def _io_loop(self) -> None:
        wake = self._wake_r
        assert wake is not None
        poller = self._poller = select.poll()
        poller.register(wake, select.POLLIN)
        answered: tuple[list[_Result], list[_Item]] | None = None
        try:
            while True:
                # A caller may have sent a frame without waking this thread: look at
                # the clock now and then, to notice a server that never answers.
                timeout = _IDLE_CHECK_S
                if self._inflight is not None and self._sock is not None:
                    timeout = max(0.0, self._sent_at + self._request_timeout - time.monotonic())
                if answered is not None:
                    # Last thing before blocking, so the woken loop finds the GIL free.
                    self._resolve(*answered)
                    answered = None
                ready = {fd for fd, _ in poller.poll(timeout * 1000)}
                if wake.fileno() in ready:
                    with contextlib.suppress(BlockingIOError):
                        while wake.recv(4096):
                            pass
                if self._sock is not None and self._sock.fileno() in ready:
                    answered = self._receive()
                elif (
                    self._inflight is not None
                    and self._sock is not None
                    and time.monotonic() - self._sent_at >= self._request_timeout
                ):
                    self._lose(f"no answer within {self._request_timeout:g}s", None)
                if self._broken is not None:
                    self._lose("connection lost", self._broken)
                with self._lock:
                    if self._inflight is not None:
                        continue
                    if not self._pending:
                        if self._closed:
                            break
                        continue
                    batch = self._take_batch()
                self._send(batch)
        except Exception:  # a bug: fail every call rather than leave one waiting
            logger.exception("%s: the client's I/O thread failed", self.url)
            with self._lock:
                self._closed = True
                leftovers, self._pending = self._pending, []
            if leftovers:
                self._fail(leftovers, BackendUnavailable(f"{self.url}: internal error"))
            self._lose("internal error", None)
        finally:
            try:
                if answered is not None:
                    self._resolve(*answered)
                self._lose("the backend is closed", None)
                if self._server is not None:
                    self._server.close()
                wake.close()
                if self._wake_w is not None:
                    self._wake_w.close()
            finally:
                with self._lock:
                    closers, self._closers = self._closers, []
                for future, loop in closers:
                    done: list[_Result] = [(future, None, None)]
                    with contextlib.suppress(RuntimeError):  # that loop is closed
                        loop.call_soon_threadsafe(_hand_back, done)

    def _take_batch(self) -> list[_Item]:  # under _lock
        pending = self._pending
        size = 0
        for n, item in enumerate(pending):
            size += len(item[0])
            if n + 1 >= _BATCH_CALLS or size >= _BATCH_BYTES:
                batch, self._pending = pending[: n + 1], pending[n + 1 :]
                break
        else:
            batch, self._pending = pending, []
        self._inflight = batch
        return batch

    def _send(self, batch: list[_Item]) -> None:
        if self._conn is None:
            try:
                conn, sock = self._connect()
            except BackendUnavailable as exc:
                self._fail(batch, exc)
                return
            assert self._poller is not None
            self._poller.register(sock, select.POLLIN)
            with self._lock:
                self._conn, self._sock = conn, sock
        assert self._conn is not None
        self._sent_at = time.monotonic()
        try:
            self._conn.send_bytes(b"[" + b",".join(item[0] for item in batch) + b"]")
        except OSError as exc:
            self._lose("connection lost", exc)

    def _receive(self) -> tuple[list[_Result], list[_Item]] | None:
        """Read the answer to the frame in flight: the results to hand back."""
        assert self._conn is not None
        try:
            frame = self._conn.recv_bytes()
        except BlockingIOError as exc:  # SO_RCVTIMEO: stalled in the middle of a frame
            self._lose(f"no answer within {self._request_timeout:g}s", exc)
            return None
        except (OSError, EOFError) as exc:
            self._lose("connection lost", exc)
            return None
        batch = self._inflight
        try:
            replies = json.loads(frame)
        except (ValueError, RecursionError):
            replies = None
        if batch is None or type(replies) is not list or len(replies) != len(batch):
            self._lose("the server's answer does not match the request", None)
            return None
        self._round_trips += 1
        self._calls += len(batch)
        results: list[_Result] = []
        for (_, decode, future, _), reply in zip(batch, replies, strict=True):
            try:
                status, value = reply
                if status == 0:
                    results.append((future, None, decode(value)))
                else:
                    results.append((future, BackendError(f"{self.url}: {value}"), None))
            except Exception as exc:
                error = BackendError(f"{self.url}: bad answer {str(reply)[:80]!r}: {exc}")
                results.append((future, error, None))
        with self._lock:
            self._inflight = None
        return results, batch

    def _lose(self, what: str, cause: BaseException | None) -> None:
        """The connection is unusable: drop it and fail what was in flight."""
        with self._lock:  # at once, so that no caller writes a frame in between
            batch, self._inflight, self._broken = self._inflight, None, None
            conn, sock, self._conn, self._sock = self._conn, self._sock, None, None
        self._close(conn, sock)
        if batch:
            reason = f" ({_reason(cause)})" if cause is not None and str(cause) else ""
            error = BackendUnavailable(f"{self.url}: {what}{reason}")
            error.__cause__ = cause
            self._fail(batch, error)

    def _fail(self, batch: list[_Item], error: BackendError) -> None:
        results: list[_Result] = []
        for item in batch:
            copy = type(error)(str(error))  # one exception object per waiting task
            copy.__cause__ = error.__cause__
            results.append((item[2], copy, None))
        with self._lock:
            if self._inflight is batch:
                self._inflight = None
        self._resolve(results, batch)

    @staticmethod
    def _resolve(results: list[_Result], batch: list[_Item]) -> None:
        """Resolve the batch's futures on their loops: one call_soon_threadsafe per loop."""
        loop = batch[0][3]
        if all(item[3] is loop for item in batch):
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_hand_back, results)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Result]] = {}
        for item, result in zip(batch, results, strict=True):
            by_loop.setdefault(item[3], []).append(result)
        for loop, loop_results in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_hand_back, loop_results)

    def _connect(self) -> tuple[Connection[Any, Any], socket.socket]:
        if self._serve and self._server is None:
            server = ManagerServer(self._address, self._authkey, self.limits)
            try:
                server.start()
            except OSError as exc:
                raise BackendUnavailable(
                    f"cannot serve {_display(self._address)}: {_reason(exc)}"
                ) from exc
            self._server = server
        url = self.url
        timeout = self._connect_timeout
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection(self.address, timeout=timeout)
        except ConnectionRefusedError as exc:
            raise BackendUnavailable(
                f"{url}: connection refused: no manager server there "
                "(start one: python -m xml_pipeline manager --address HOST:PORT)"
            ) from exc
        except TimeoutError as exc:
            raise BackendUnavailable(f"{url}: no connection within {timeout:g}s") from exc
        except OSError as exc:
            raise BackendUnavailable(f"{url}: cannot connect: {_reason(exc)}") from exc
        conn: Connection[Any, Any] | None = None
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_timeouts(sock, deadline - time.monotonic())
            conn = Connection(os.dup(sock.fileno()))
            try:
                answer_challenge(conn, self._authkey)
                deliver_challenge(conn, self._authkey)
                conn.send_bytes(_encode([["hello", PROTOCOL]]))
                [[status, hello]] = json.loads(conn.recv_bytes(1 << 16))
            except AuthenticationError as exc:
                raise BackendUnavailable(
                    f"{url}: authentication failed: the authkey differs from the server's"
                ) from exc
            except BlockingIOError as exc:
                raise BackendUnavailable(
                    f"{url}: no answer within {timeout:g}s: is a manager server listening there?"
                ) from exc
            except EOFError as exc:
                raise BackendUnavailable(f"{url}: the server closed the connection") from exc
            except Exception as exc:  # garbage from something else listening there
                raise BackendUnavailable(
                    f"{url}: not an xml_pipeline manager server ({_reason(exc)})"
                ) from exc
            if status != 0:
                raise BackendUnavailable(f"{url}: the server refused: {hello}")
            _set_timeouts(sock, self._request_timeout)
        except BaseException:
            if conn is not None:
                conn.close()
            sock.close()
            raise
        self._check_limits(hello.get("limits") if isinstance(hello, dict) else None)
        self._connects += 1
        return conn, sock

    def _check_limits(self, served: Any) -> None:
        wanted = self._explicit_limits
        if wanted is None or self._serve or not isinstance(served, dict):
            return
        differ = [
            f"{name} {served[name]} (not {value})"
            for name, value in dataclasses.asdict(wanted).items()
            if name in served and name != "ttl_s" and served[name] != value
        ]
        if differ:
            logger.warning("%s: the server's limits apply: %s", self.url, ", ".join(differ))

    def _close(self, conn: Connection[Any, Any] | None, sock: socket.socket | None) -> None:
        if sock is not None:
            assert self._poller is not None
            self._poller.unregister(sock)
            sock.close()
        if conn is not None:
            conn.close()
