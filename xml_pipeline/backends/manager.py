"""The manager backend: one :class:`~xml_pipeline.backends.store.Store`, served to
several processes on one machine.

A :class:`ManagerServer` keeps the reference ``Store`` behind a lock and serves it
over TCP (threads: one accepting, one per connection); :class:`ManagerBackend` is
the async client the pump and its workers use, on the caller's event loop with
asyncio streams (pipelined calls, one reader task per connection, the loop's own
timeouts). Either a pump serves the store itself (``serve``: threads in that
process) or a standalone server runs it::

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
server challenges first; the client speaks the same exchange on asyncio streams),
every read bounded in time, so a silent peer cannot hold either side. After that
every frame is UTF-8 JSON; nothing is pickled.

A request is a JSON array of calls, run in order under the store's lock (a batch:
the calls a client made in one event-loop tick); the response has one
``[status, value]`` per call, in the same order: ``[0, RESULT]`` or
``[1, "why it failed"]``. A client may send further requests before the first is
answered (pipelining): the server runs a connection's requests one after the
other and answers them in the order they came::

    → [["buffer_append","9b2f…",SLOT],["registry_get_chain","9b2f…"]]
    ← [[0,7],[0,"[\\"console\\",\\"greeter\\"]"]]

``SLOT`` and ``LETTER`` are exactly the JSON objects of
:func:`~xml_pipeline.backends.base.slot_to_bytes` and
:func:`~xml_pipeline.backends.base.dead_letter_to_bytes`; a ``ROW`` is a slot as
an array of the same values in :class:`~xml_pipeline.backends.base.Slot`'s order,
``[i, d, f, t, p, m, ts, x]``, which a client parses about twice as fast (the
client reads histories with ``buffer_get_rows``, and with ``buffer_get_thread``
from a server that does not know it). The calls are the ``Store`` methods, each
one server-side method call::

    call                   arguments                     result
    hello                  protocol (1)                  {"protocol": 1, "limits": {...}}
    ping                   -                             null
    buffer_append          thread, SLOT                  index
    buffer_contains        thread, message id, direction true | false
    buffer_get_thread      thread                        [SLOT, ...]
    buffer_get_rows        thread                        [ROW, ...]
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
import base64
import binascii
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import operator
import os
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

import pydantic_core

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
_JOIN_TIMEOUT_S = 5.0

_OPTIONS = ManagerOptions()  # the defaults of the organism file's manager: section
_T = TypeVar("_T")
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_str = json.encoder.encode_basestring_ascii  # what _dumps does to one string
_SLOT_KEYS = ("i", "d", "f", "t", "p", "m", "ts", "x")  # slot_to_bytes's, in Slot's order
_slot_fields = operator.itemgetter(*_SLOT_KEYS)
_new_slot = tuple.__new__
_a2b = binascii.a2b_base64


def _encode(value: Any) -> bytes:
    return _dumps(value).encode()


def _encode_result(value: Any) -> bytes:
    # Most results are integers, booleans or None: ~0.2 µs here, ~2.5 µs through
    # the JSON encoder, per call of a batch.
    kind = type(value)
    if kind is int:
        return b"%d" % value
    if kind is bool:
        return b"true" if value else b"false"
    if value is None:
        return b"null"
    return _encode(value)


def _loads(frame: bytes) -> Any:
    # pydantic-core's parser (a dependency already) is about twice as fast as the json
    # module on frames of slots, keys cached; json covers what it refuses (lone
    # surrogates that json.dumps escaped).
    try:
        return pydantic_core.from_json(frame, cache_strings="keys")
    except ValueError:
        return json.loads(frame)


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
    # What clients send (slot_to_bytes) takes this path, ~4 times cheaper than
    # slot_from_obj, which checks and converts anything else.
    try:
        i, d, f, t, p, m, ts, x = _slot_fields(value)
    except KeyError:
        return slot_from_obj(value)
    if (
        type(i) is int
        and (d == "in" or d == "out")
        and type(f) is str
        and (t is None or type(t) is str)
        and type(p) is str
        and type(m) is str
        and type(ts) is float
        and type(x) is str
    ):
        return _new_slot(Slot, (i, d, f, t, p, m, ts, _a2b(x)))
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


def _out_rows(value: list[Slot]) -> bytes:
    # [index, direction, sender, to, payload, message id, timestamp, base64 of the
    # XML]: a client parses arrays about twice as fast as the objects of slot_to_bytes.
    return _encode([(*slot[:7], base64.b64encode(slot.xml).decode("ascii")) for slot in value])


def _out_letters(value: list[DeadLetter]) -> bytes:
    return b"[" + b",".join(map(dead_letter_to_bytes, value)) + b"]"


_Arg = Callable[[Any], Any]
_S, _I = _arg_str, _arg_int

# name → (argument checks, result encoder); the names are Store's methods.
_CALLS: dict[str, tuple[tuple[_Arg, ...], Callable[[Any], bytes]]] = {
    "buffer_append": ((_S, _arg_slot), _encode_result),
    "buffer_contains": ((_S, _S, _S), _encode_result),
    "buffer_get_thread": ((_S,), _out_slots),
    "buffer_get_rows": ((_S,), _out_rows),
    "buffer_get_slot": ((_S, _I), _out_slot),
    "buffer_thread_len": ((_S,), _encode_result),
    "buffer_thread_exists": ((_S,), _encode_result),
    "buffer_delete_thread": ((_S,), _encode_result),
    "buffer_list_threads": ((), _encode_result),
    "buffer_clear": ((), _encode_result),
    "registry_set": ((_S, _S), _encode_result),
    "registry_setdefault": ((_S, _S), _encode_result),
    "registry_get_uuid": ((_S,), _encode_result),
    "registry_get_chain": ((_S,), _encode_result),
    "registry_delete": ((_S,), _encode_result),
    "registry_list_all": ((), _encode_result),
    "registry_clear": ((), _encode_result),
    "deadletter_add": ((_arg_letter,), _encode_result),
    "deadletter_add_many": ((_arg_letters,), _encode_result),
    "deadletter_list": ((_arg_opt_int,), _out_letters),
    "deadletter_delete": ((_S,), _encode_result),
    "deadletter_purge": ((), _encode_result),
    "info": ((), _encode_result),
    "hello": ((_I,), _encode_result),
    "ping": ((), _encode_result),
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
        own = {
            "hello": self._hello,
            "ping": self._ping,
            "buffer_get_rows": self._store.buffer_get_thread,
        }
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
        calls = _loads(frame)
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
        round_trips: request frames answered (calls made in one loop tick share one).
        connects: connections made (reconnects after a lost connection count too).
    """

    calls: int
    round_trips: int
    connects: int


# multiprocessing.connection's framing: a signed 4-byte big-endian length, or -1
# and then an unsigned 8-byte length for frames past 2 GiB.
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
_CHALLENGE = b"#CHALLENGE#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"
_DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})
_MD5_LEN = 16


def _frame(data: bytes) -> bytes:
    size = len(data)
    if size > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(size) + data
    return _HEADER.pack(size) + data


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One frame. ValueError: larger than ``limit``; IncompleteReadError: EOF."""
    (size,) = _HEADER.unpack(await reader.readexactly(4))
    if size == -1:
        (size,) = _LONG_HEADER.unpack(await reader.readexactly(8))
    if size < 0 or size > limit:
        raise ValueError(f"a frame of {size} bytes")
    return await reader.readexactly(size)


def _digest_name(data: bytes) -> str | None:
    """The digest a ``{name}...`` challenge or answer names; None: legacy HMAC-MD5."""
    if data.startswith(b"{"):
        end = data.find(b"}", 1, 22)
        if end > 0:
            name = data[1:end].decode("ascii", "replace")
            if name in _DIGESTS:
                return name
    return None


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authkey: bytes
) -> None:
    """The client's half of multiprocessing.connection's mutual HMAC challenge
    (``answer_challenge``, then ``deliver_challenge``), as the server's Python speaks
    it: a ``{digest}`` prefix (3.12+) or the bare HMAC-MD5 of earlier versions.

    Raises:
        AuthenticationError: a wrong authkey on either side.
        ValueError: the peer does not speak the handshake.
    """
    message = await _read_frame(reader, 256)
    if not message.startswith(_CHALLENGE):
        raise ValueError("the server did not send a challenge")
    message = message[len(_CHALLENGE) :]
    name = _digest_name(message)
    mac = hmac.new(authkey, message, name or "md5").digest()
    writer.write(_frame(b"{%s}%s" % (name.encode(), mac) if name else mac))
    if await _read_frame(reader, 256) != _WELCOME:
        raise AuthenticationError("digest sent was rejected")
    challenge = b"{sha256}" + os.urandom(40)
    writer.write(_frame(_CHALLENGE + challenge))
    answer = await _read_frame(reader, 256)
    name = "md5" if len(answer) == _MD5_LEN else _digest_name(answer)
    if name is not None and name != "md5":
        answer = answer[len(name) + 2 :]
    expected = hmac.new(authkey, challenge, name or "md5").digest()
    if name is None or not hmac.compare_digest(expected, answer):
        writer.write(_frame(_FAILURE))
        raise AuthenticationError("digest received was wrong")
    writer.write(_frame(_WELCOME))


# A call waiting for its answer: (request bytes, decoder, future).
_Item = tuple[bytes, Callable[[Any], Any], asyncio.Future[Any]]


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
    # The hot read of a worker's history: ~0.6 µs a slot where slot_from_obj takes
    # ~1.2 µs. What the server writes (slot_to_bytes) takes the fast path; anything
    # else goes through slot_from_obj, which checks and converts every field.
    slots: list[Slot] = []
    append = slots.append
    for obj in value:
        try:
            i, d, f, t, p, m, ts, x = _slot_fields(obj)
            if type(i) is int and type(ts) is float and (d == "in" or d == "out"):
                append(_new_slot(Slot, (i, d, f, t, p, m, ts, _a2b(x))))
                continue
        except (KeyError, TypeError, ValueError):
            pass
        append(slot_from_obj(obj))
    return slots


def _as_rows(value: Any) -> list[Slot]:
    # A worker's read of its history: one tuple.__new__ and one base64 decoding a
    # slot for what the server writes (_out_rows); slot_from_obj checks anything else.
    slots: list[Slot] = []
    append = slots.append
    for row in value:
        try:
            i, d, f, t, p, m, ts, x = row
            if type(i) is int and type(ts) is float and (d == "in" or d == "out"):
                append(_new_slot(Slot, (i, d, f, t, p, m, ts, _a2b(x))))
                continue
        except (TypeError, ValueError):
            pass
        if type(row) is not list or len(row) != 8:
            raise ValueError(f"not a slot row: {str(row)[:80]!r}")
        append(slot_from_obj(dict(zip(_SLOT_KEYS, row, strict=True))))
    return slots


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


class _Connection:
    """One authenticated connection on one event loop: one writer, one reader task.

    Calls are written at once when nothing is in flight; calls made while frames are
    in flight are gathered until the end of the loop tick and written as one frame.
    Frames are answered in the order they were written (the server runs one
    connection's frames one after the other), so the reader task matches each answer
    to the oldest frame in flight. A frame in flight with no answer for
    ``timeout`` seconds (the loop's own timer) loses the connection.
    """

    def __init__(
        self,
        backend: ManagerBackend,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.lost: BackendUnavailable | None = None
        self._backend = backend
        self._url = backend.url
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._timeout = timeout
        self._inflight: collections.deque[list[_Item]] = collections.deque()
        self._pending: list[_Item] = []
        self._flush_handle: asyncio.Handle | None = None
        self._deadline: asyncio.Timeout | None = None
        self._task = self.loop.create_task(self._read_loop(), name="xml_pipeline manager reader")

    # -- writing ---------------------------------------------------------------

    def enqueue(self, item: _Item) -> None:
        """Send one call: now if nothing is in flight, else at the end of this tick."""
        if self.lost is not None:
            raise _copy(self.lost)
        if self._flush_handle is None and not self._inflight:
            self._write([item])  # idle: no reason to wait for company
            return
        self._pending.append(item)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, []
        while pending:
            size = 0
            for n, item in enumerate(pending):
                size += len(item[0])
                if n + 1 >= _BATCH_CALLS or size >= _BATCH_BYTES:
                    break
            batch, pending = pending[: n + 1], pending[n + 1 :]
            self._write(batch)

    def _write(self, batch: list[_Item]) -> None:
        if self.lost is not None:
            self._fail(batch, self.lost)
            return
        if len(batch) == 1:
            frame = b"[" + batch[0][0] + b"]"
        else:
            frame = b"[" + b",".join([item[0] for item in batch]) + b"]"
        self._inflight.append(batch)
        if len(self._inflight) == 1:
            self._arm()
        self._transport.write(_frame(frame))

    def _arm(self) -> None:
        deadline = self._deadline
        if deadline is not None and not deadline.expired():
            if self._inflight:
                deadline.reschedule(self.loop.time() + self._timeout)
            else:
                deadline.reschedule(None)

    # -- reading ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        reader = self._reader
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                self._arm()
                while True:
                    self._answer(await _read_frame(reader, MAX_REQUEST_BYTES))
        except TimeoutError as exc:
            self.lose(f"no answer within {self._timeout:g}s", exc)
        except (asyncio.IncompleteReadError, OSError) as exc:
            self.lose("connection lost", None if isinstance(exc, EOFError) else exc)
        except ValueError as exc:
            self.lose("the server's answer does not match the request", exc)
        except asyncio.CancelledError:
            self.lose("the backend is closed", None)
            raise
        except Exception as exc:  # a bug: fail every call rather than leave one waiting
            logger.exception("%s: the client's reader failed", self._url)
            self.lose("internal error", exc)

    def _answer(self, frame: bytes) -> None:
        if not self._inflight:
            raise ValueError("an answer to no request")
        batch = self._inflight.popleft()
        self._arm()
        try:
            replies = _loads(frame)
        except (ValueError, RecursionError):
            replies = None
        if type(replies) is not list or len(replies) != len(batch):
            raise ValueError("an answer of another length")
        backend = self._backend
        backend._round_trips += 1
        backend._calls += len(batch)
        for (_, decode, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            try:
                status, value = reply
                if status == 0:
                    future.set_result(decode(value))
                else:
                    future.set_exception(BackendError(f"{self._url}: {value}"))
            except Exception as exc:
                error = BackendError(f"{self._url}: bad answer {str(reply)[:80]!r}: {exc}")
                future.set_exception(error)

    # -- ending ----------------------------------------------------------------

    def lose(self, what: str, cause: BaseException | None) -> None:
        """The connection is unusable: close it and fail every call not answered."""
        if self.lost is None:
            reason = f" ({_reason(cause)})" if cause is not None and str(cause) else ""
            self.lost = BackendUnavailable(f"{self._url}: {what}{reason}")
            self.lost.__cause__ = cause
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        waiting = [item for batch in self._inflight for item in batch] + self._pending
        self._inflight.clear()
        self._pending = []
        self._fail(waiting, self.lost)
        self._transport.close()

    @staticmethod
    def _fail(items: list[_Item], error: BackendUnavailable) -> None:
        for _, _, future in items:
            if not future.done():
                future.set_exception(_copy(error))

    async def aclose(self) -> None:
        """Finish the calls already made (each within the timeout), then disconnect."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        futures = [item[2] for batch in self._inflight for item in batch]
        try:
            if futures and self.lost is None:
                await asyncio.wait(futures)  # the reader answers or fails each
        finally:  # cancelled meanwhile too: the reader task ends
            self._task.cancel()
            self._transport.close()
        await asyncio.wait([self._task])
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    def abandon(self) -> None:
        """Drop a connection whose event loop is not the caller's (from any thread)."""
        self.lost = self.lost or BackendUnavailable(f"{self._url}: the backend is closed")
        if self.loop.is_closed():
            return  # its loop closed its transport
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            self.loop.call_soon_threadsafe(self._task.cancel)


def _copy(error: BackendUnavailable) -> BackendUnavailable:
    """One exception object per waiting task, so that tracebacks do not pile up."""
    copy = BackendUnavailable(str(error))
    copy.__cause__ = error.__cause__
    return copy


class ManagerBackend:
    """The async client of a :class:`ManagerServer` (see the module docs).

    The client runs on the caller's event loop (asyncio's or uvloop's), with
    ``asyncio.open_connection`` and no thread of its own: calls never block the
    loop. A call made while nothing is in flight writes its frame at once; calls
    made while frames are in flight are gathered until the end of the loop tick and
    go as one frame, pipelined behind the others on the same connection. One reader
    task per connection (``xml_pipeline manager reader``) matches the answers to the
    frames in the order they were written, and ends with the connection
    (:meth:`aclose`, a lost connection, cancellation). Calls made in order run on the
    server in that order.

    The connection is made on first use (see :meth:`ping`) and remade by the next
    call after it is lost; a call in flight when it is lost fails with
    BackendUnavailable and is not sent again (no call is retried: the caller's policy
    decides). The connection belongs to the event loop that made it: a backend used
    later from another loop (a new ``asyncio.run``) connects again there; calls from
    two loops at once are refused. A synchronous caller in a worker process uses
    the worker's own loop (``loop.run_until_complete``), and a handler thread of
    the pump goes through the pump's loop (``run_coroutine_threadsafe``).

    Prefer :meth:`from_url`. Args:
        address: ``(host, port)`` of the server.
        authkey: the shared secret.
        limits: the bounds of the store this process serves (``serve``); a server
            elsewhere applies its own, and a difference is logged.
        serve: start the server in this process (threads), stopped by :meth:`aclose`.
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
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._connecting_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._rows = True  # the server knows buffer_get_rows (until it says otherwise)
        self._server: ManagerServer | None = None
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

    # -- calls -------------------------------------------------------------------

    async def _call(self, request: bytes, decode: Callable[[Any], _T]) -> _T:
        conn = self._conn
        if conn is None or conn.lost is not None or conn.loop is not asyncio.get_running_loop():
            conn = await self._connected()
        future: asyncio.Future[_T] = conn.loop.create_future()
        conn.enqueue((request, decode, future))
        return await future

    async def _connected(self) -> _Connection:
        """The connection on the running loop: made now if there is none."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise BackendUnavailable(f"{self.url}: the backend is closed")
        if self._connecting is None or self._connecting_loop is not loop:
            self._connecting, self._connecting_loop = asyncio.Lock(), loop
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.loop is not loop and conn.lost is None:
                if not conn.loop.is_closed() and conn.loop.is_running():
                    raise BackendUnavailable(
                        f"{self.url}: in use from another event loop; open one backend per loop"
                    )
                conn.abandon()
            if conn is None or conn.lost is not None or conn.loop is not loop:
                self._conn = None
                conn = await self._connect()
                if self._closed:  # aclose() ran meanwhile
                    await conn.aclose()
                    raise BackendUnavailable(f"{self.url}: the backend is closed")
                self._conn = conn
            return conn

    async def _connect(self) -> _Connection:
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
        host, port = self.address
        writer: asyncio.StreamWriter | None = None
        stage = "connect"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
                stage = "handshake"
                await _handshake(reader, writer, self._authkey)
                writer.write(_frame(_encode([["hello", PROTOCOL]])))
                [[status, hello]] = _loads(await _read_frame(reader, 1 << 16))
        except ConnectionRefusedError as exc:
            raise BackendUnavailable(
                f"{url}: connection refused: no manager server there "
                "(start one: python -m xml_pipeline manager --address HOST:PORT)"
            ) from exc
        except TimeoutError as exc:
            _close(writer)
            if stage == "connect":
                raise BackendUnavailable(f"{url}: no connection within {timeout:g}s") from exc
            raise BackendUnavailable(
                f"{url}: no answer within {timeout:g}s: is a manager server listening there?"
            ) from exc
        except AuthenticationError as exc:
            _close(writer)
            raise BackendUnavailable(
                f"{url}: authentication failed: the authkey differs from the server's"
            ) from exc
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            _close(writer)
            raise BackendUnavailable(f"{url}: the server closed the connection") from exc
        except OSError as exc:
            _close(writer)
            if stage == "connect":
                raise BackendUnavailable(f"{url}: cannot connect: {_reason(exc)}") from exc
            raise BackendUnavailable(f"{url}: connection lost ({_reason(exc)})") from exc
        except BaseException as exc:
            _close(writer)
            if not isinstance(exc, Exception):  # cancelled
                raise
            # garbage from something else listening there
            raise BackendUnavailable(
                f"{url}: not an xml_pipeline manager server ({_reason(exc)})"
            ) from exc
        if status != 0:
            _close(writer)
            raise BackendUnavailable(f"{url}: the server refused: {hello}")
        self._check_limits(hello.get("limits") if isinstance(hello, dict) else None)
        self._connects += 1
        return _Connection(self, reader, writer, self._request_timeout)

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

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        request = b'["buffer_append",%s,%s]' % (_str(thread_id).encode(), slot_to_bytes(slot))
        return await self._call(request, _as_int)

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        request = _request("buffer_contains", thread_id, message_id, direction)
        return await self._call(request, _as_bool)

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        if self._rows:
            try:
                request = b'["buffer_get_rows",%s]' % _str(thread_id).encode()
                return await self._call(request, _as_rows)
            except BackendError as exc:
                if "unknown call" not in str(exc) or isinstance(exc, BackendUnavailable):
                    raise
                self._rows = False  # a server from before buffer_get_rows: a read, asked again
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
        conn = await self._connected()
        futures: list[asyncio.Future[list[str]]] = []
        for request in requests:  # enqueued together, in order: pipelined back to back
            futures.append(conn.loop.create_future())
            conn.enqueue((request, _as_strs, futures[-1]))
        parts = [await future for future in futures]
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
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                if conn.loop is asyncio.get_running_loop():
                    await conn.aclose()
                else:
                    conn.abandon()
        finally:
            server, self._server = self._server, None
            if server is not None:
                server.close()

    async def close(self) -> None:
        """Alias of :meth:`aclose`."""
        await self.aclose()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
