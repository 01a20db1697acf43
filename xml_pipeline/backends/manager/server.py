"""The manager server: one :class:`~xml_pipeline.backends.store.Store` served over TCP.

The server runs an event loop of its own in one thread (uvloop where installed), and
no other: connections are protocols of that loop, not threads. Each connection is a
protocol (:class:`_Session`): a task authenticates the client within
``handshake_timeout_s`` (the loop's own timeout, no socket options), then each
request runs in ``data_received`` as its frame completes. A request's calls run in
order, one ``Store`` method each, with nothing in between: the loop is the only
thread touching the store, so it needs no lock.

The server defends that thread: a request frame is at most ``max_request_bytes``
(refused from its length header, never gathered) and holds at most
:data:`~.protocol.MAX_REQUEST_CALLS` calls, and at most ``max_connections`` clients are
kept (a connection past that is closed at once). :func:`serve_forever` is the
``python -m xml_pipeline manager`` command's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from types import TracebackType
from typing import Any, cast

from ..base import (
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_obj,
    dead_letter_to_bytes,
    slot_from_obj,
    slot_to_bytes,
)
from ..store import Store
from .protocol import (
    HANDSHAKE_FRAME_BYTES,
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_CALLS,
    PROTOCOL,
    FrameBuffer,
    FrameTooLarge,
    answer_challenge,
    deliver_challenge,
    display,
    dumps,
    encode_rows,
    fast_slot,
    frame,
    loads,
    reason,
)

_new_loop: Callable[[], asyncio.AbstractEventLoop]
try:  # a faster loop for the server's own thread; nothing process-wide is changed
    from uvloop import new_event_loop as _new_loop
except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
    _new_loop = asyncio.new_event_loop

__all__ = ["ManagerServer", "serve_forever"]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0  # close(): how long the server's thread may take to stop
_PRE_AUTH_BYTES = 64 << 10  # unread input of a client not yet authenticated: reading pauses
_REFUSED_LOG_S = 10.0  # refused connections are logged at most this often


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
    return dumps(value)


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
    # What clients send (slot_to_bytes) takes the fast path, ~4 times cheaper than
    # slot_from_obj, which checks and converts anything else.
    return fast_slot(value) or slot_from_obj(value)


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

_Entry = tuple[Callable[..., Any], tuple[_Arg, ...], Callable[[Any], bytes]]

# name → (argument checks, result encoder); the names are Store's methods.
_CALLS: dict[str, tuple[tuple[_Arg, ...], Callable[[Any], bytes]]] = {
    "buffer_append": ((_S, _arg_slot), _encode_result),
    "buffer_contains": ((_S, _S, _S), _encode_result),
    "buffer_get_thread": ((_S,), _out_slots),
    "buffer_get_rows": ((_S,), encode_rows),
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

    :meth:`start` binds the address in the caller's thread (so that an address in
    use raises there) and starts one thread running the server's event loop; each
    connection is a protocol of that loop that authenticates the client (within
    ``handshake_timeout_s``) and then runs its requests. Use
    ``with ManagerServer(...) as s:`` or :meth:`start` / :meth:`close`.

    Args:
        address: ``(host, port)``; port 0 picks a free port (see :attr:`address`).
        authkey: the shared secret clients must prove they hold.
        limits: the store's trimming and eviction bounds.
        handshake_timeout_s: how long a new connection may take to authenticate.
        max_request_bytes: the largest request frame read; a client announcing a larger
            one is answered why and disconnected as soon as its length header arrives
            (the others are served on). Clients learn it from ``hello``.
        max_connections: how many clients are kept at once (authenticated or not); a
            connection past that is closed at once, the others unaffected.
    """

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        limits: HistoryLimits | None = None,
        *,
        handshake_timeout_s: float = 5.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not authkey:
            raise ValueError("the manager server needs a non-empty authkey")
        if max_request_bytes < HANDSHAKE_FRAME_BYTES or max_connections < 1:
            raise ValueError(
                f"max_request_bytes must be at least {HANDSHAKE_FRAME_BYTES} and "
                "max_connections at least 1"
            )
        self.limits = limits or HistoryLimits()
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self._requested = address
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout_s
        self._store = Store(self.limits)
        own: dict[str, Callable[..., Any]] = {
            "hello": self._hello,
            "ping": self._ping,
            "buffer_get_rows": self._store.buffer_get_thread,
        }
        self._calls: dict[str, _Entry] = {
            name: (own.get(name) or getattr(self._store, name), checks, encode)
            for name, (checks, encode) in _CALLS.items()
        }
        self._bound: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._sessions: set[_Session] = set()  # the connections (the server's thread only)
        self._refused = 0  # connections refused past max_connections, not yet logged
        self._refused_logged = -_REFUSED_LOG_S  # monotonic time of that last log line
        self._closed = False

    def __repr__(self) -> str:
        return f"<ManagerServer {display(self.address)}>"

    @property
    def address(self) -> tuple[str, int]:
        """The address served (with the actual port once started)."""
        return self._bound or self._requested

    def start(self) -> None:
        """Bind the address and start serving it (returns once clients can connect).

        Raises:
            OSError: the address cannot be bound (in use, not local, ...).
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("a ManagerServer starts once")
        host, _ = self._requested
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server(self._requested, family=family, backlog=128)
        host, port = sock.getsockname()[:2]
        self._bound = (str(host), int(port))
        if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
            logger.warning(
                "manager: serving at %s: the traffic is authenticated, not encrypted; "
                "prefer a loopback address",
                display(self.address),
            )
        self._thread = threading.Thread(
            target=self._run_loop,
            args=(sock,),
            name=f"xml_pipeline manager {display(self.address)}",
            daemon=True,
        )
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            raise OSError(f"the manager server did not start: {reason(self._failure)}")
        logger.info("manager: serving at %s", display(self.address))

    def close(self) -> None:
        """Stop accepting, disconnect every client and wait for the server's thread.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is None or stop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop has ended already
            loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("manager: the server's thread did not stop in time")

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

    # -- the server's thread ---------------------------------------------------------

    def _run_loop(self, sock: socket.socket) -> None:
        try:
            with asyncio.Runner(loop_factory=_new_loop) as runner:
                runner.run(self._serve(sock))
        except BaseException as exc:  # reported by start(), or logged once running
            if not self._started.is_set():
                self._failure = exc
            else:
                logger.exception("manager: the server failed")
        finally:
            sock.close()
            self._started.set()

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = stop = asyncio.Event()
        self._sessions = sessions = set[_Session]()
        server = await loop.create_server(lambda: _Session(self, sessions), sock=sock)
        self._started.set()
        try:
            await stop.wait()
        finally:
            server.close()
            for session in list(sessions):
                session.abort()
            ended = [session.ended for session in sessions]
            if ended:
                await asyncio.wait(ended, timeout=_STOP_TIMEOUT_S)
            await server.wait_closed()

    # -- requests --------------------------------------------------------------------

    def _hello(self, protocol: int) -> dict[str, Any]:
        if not 1 <= protocol <= PROTOCOL:
            raise ValueError(
                f"protocol {protocol} is not supported (this server speaks 1 to {PROTOCOL})"
            )
        return {
            "protocol": PROTOCOL,
            "limits": dataclasses.asdict(self.limits),
            "max_request_bytes": self.max_request_bytes,
        }

    def _admit(self, peer: Any) -> bool:
        """Whether a new connection may be kept (its session is not counted yet)."""
        if len(self._sessions) < self.max_connections:
            return True
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= _REFUSED_LOG_S:
            logger.warning(
                "manager: %d connection(s) refused (the last from %s): the server already "
                "holds %d clients, its cap (max_connections)",
                self._refused,
                peer,
                self.max_connections,
            )
            self._refused, self._refused_logged = 0, now
        return False

    def _ping(self) -> None:
        return None

    def _run(self, data: bytes) -> bytes:
        """Run one request frame; return the response frame. ValueError: not a request."""
        calls = loads(data)
        if type(calls) is not list:
            raise ValueError("a request is a JSON array of calls")
        if len(calls) > MAX_REQUEST_CALLS:
            raise ValueError(
                f"a request of {len(calls)} calls is over the manager's cap of "
                f"{MAX_REQUEST_CALLS} calls"
            )
        parts: list[bytes] = []
        for call in calls:
            name = call[0] if type(call) is list and call and type(call[0]) is str else None
            entry = self._calls.get(name) if name is not None else None
            if name is None or entry is None:
                parts.append(b"[1," + dumps(f"unknown call {str(call)[:80]!r}") + b"]")
                continue
            method, checks, encode = entry
            args = call[1:]
            if len(args) != len(checks):
                why = f"{name}: expected {len(checks)} argument(s), got {len(args)}"
                parts.append(b"[1," + dumps(why) + b"]")
                continue
            try:
                values = [check(arg) for check, arg in zip(checks, args, strict=True)]
            except (TypeError, ValueError, KeyError) as exc:
                why = f"{name}: bad argument: {type(exc).__name__}: {exc}"
                parts.append(b"[1," + dumps(why) + b"]")
                continue
            try:
                parts.append(b"[0," + encode(method(*values)) + b"]")
            except Exception as exc:
                parts.append(b"[1," + dumps(f"{name}: {type(exc).__name__}: {exc}") + b"]")
        return b"[" + b",".join(parts) + b"]"


class _Session(asyncio.Protocol):
    """One client connection: the handshake (a task, within the server's handshake
    timeout), then its requests, each run in ``data_received`` as its frame completes
    and answered in order: no task, no future and no copy of the stream per request.

    Before the client is authenticated, frames are at most
    :data:`~.protocol.HANDSHAKE_FRAME_BYTES` and reading pauses past
    :data:`_PRE_AUTH_BYTES` of unread input; afterwards, frames are at most the
    server's ``max_request_bytes`` (refused from the header), and reading pauses while
    the client does not read its answers (the transport's write buffer is full). A
    connection past the server's ``max_connections`` is closed in ``connection_made``.
    """

    def __init__(self, server: ManagerServer, sessions: set[_Session]) -> None:
        self._server = server
        self._sessions = sessions
        self._loop = asyncio.get_running_loop()
        self._frames = FrameBuffer(HANDSHAKE_FRAME_BYTES)
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None
        self._serving = False
        self._paused = False
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._handshake: asyncio.Task[None] | None = None
        self.ended: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._peer = transport.get_extra_info("peername")
        if not self._server._admit(self._peer):
            self._eof = True  # nothing it sends is read
            self._transport.abort()
            return
        self._sessions.add(self)
        self._handshake = self._loop.create_task(self._authenticate())

    def data_received(self, data: bytes) -> None:
        if self._eof:
            return
        self._frames.feed(data)
        if self._serving:
            self._serve()
            return
        if len(self._frames) > _PRE_AUTH_BYTES and not self._paused:
            self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self._serving:
            self._serve()  # what the client sent before it half-closed
            self._finish()
        return True  # closed by _finish, once what was sent is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        self._sessions.discard(self)
        if self._handshake is not None and not self._handshake.done():
            self._handshake.cancel()
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:  # the client does not read its answers
        self._pause()

    def resume_writing(self) -> None:
        self._resume()
        if self._serving:
            self._serve()  # the requests that waited while the client did not read
            self._finish()

    # -- the handshake ---------------------------------------------------------------

    async def _authenticate(self) -> None:
        server, peer = self._server, self._peer
        try:
            async with asyncio.timeout(server._handshake_timeout):
                await deliver_challenge(self._read, self._write, server._authkey)
                await answer_challenge(self._read, self._write, server._authkey)
        except AuthenticationError:
            logger.warning("manager: a client from %s failed authentication", peer)
            self.abort()
            return
        except (TimeoutError, ValueError, EOFError, OSError) as exc:
            # silent, closed, or not speaking the protocol
            logger.info("manager: handshake with %s failed: %s", peer, reason(exc) or "eof")
            self.abort()
            return
        except asyncio.CancelledError:
            self.abort()  # the connection is gone, or the server is stopping
            return
        self._frames.limit = server.max_request_bytes
        self._serving = True
        self._resume()
        self._serve()  # what came with the end of the handshake
        self._finish()

    async def _read(self) -> bytes:
        while True:
            data = self._frames.next()
            if data is not None:
                return data
            if self._eof:
                raise EOFError("the client hung up")
            self._resume()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(frame(data))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- requests ------------------------------------------------------------------

    def _serve(self) -> None:
        transport, run = self._transport, self._server._run
        assert transport is not None
        # Paused: the client does not read its answers, so no more are made until it
        # does (resume_writing), however many requests are buffered.
        while not self._paused and not transport.is_closing():
            try:
                data = self._frames.next()
                if data is None:
                    return
                reply = run(data)
            except FrameTooLarge as exc:
                self._refuse(
                    f"request of {exc.size} bytes is over the manager's cap of {exc.limit} "
                    "bytes (max_request_bytes)"
                )
                return
            except (ValueError, RecursionError) as exc:
                logger.warning("manager: bad request from %s, disconnecting: %s", self._peer, exc)
                self.abort()
                return
            except Exception:  # a bug: keep serving the others
                logger.exception("manager: connection from %s failed", self._peer)
                self.abort()
                return
            transport.write(frame(reply))

    # -- flow control and the end ----------------------------------------------------

    def _finish(self) -> None:
        """Close once the client has half-closed and every request it sent is answered
        (what is left in the buffer then is a frame that can no longer complete)."""
        transport = self._transport
        if self._eof and not self._paused and transport is not None:
            transport.close()  # after the answers are flushed

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()

    def _refuse(self, why: str) -> None:
        """Answer a request that will not be read with ``why``, then disconnect."""
        logger.warning("manager: %s from %s, disconnecting", why, self._peer)
        self._eof = True  # what keeps arriving is dropped, not gathered
        self._frames = FrameBuffer(0)
        if self._transport is not None:
            # Best effort: the answer leaves now if the socket takes it; the client may
            # see the connection reset first (it is still sending the frame).
            self._transport.write(frame(dumps([[1, why]])))
        self.abort()

    def abort(self) -> None:
        """Close the connection now (what was not sent is dropped)."""
        if self._transport is not None:
            self._transport.abort()


def serve_forever(
    address: tuple[str, int],
    authkey: bytes,
    limits: HistoryLimits | None = None,
    *,
    ready: Callable[[tuple[str, int]], object] | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_connections: int = MAX_CONNECTIONS,
) -> int:
    """Serve a store at ``address`` until SIGINT or SIGTERM. Call from the main thread.

    Args:
        address: ``(host, port)``; port 0 picks a free port.
        authkey: the shared secret.
        limits: the store's bounds.
        ready: called with the address served once clients can connect.
        max_request_bytes: the largest request frame read (see :class:`ManagerServer`).
        max_connections: how many clients are kept at once.

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
        server = ManagerServer(
            address,
            authkey,
            limits,
            max_request_bytes=max_request_bytes,
            max_connections=max_connections,
        )
        with server:
            if ready is not None:
                ready(server.address)
            signum = int(signal.sigwait(signals))
            logger.info("manager: %s, stopping", signal.Signals(signum).name)
        while signals & signal.sigpending():  # a second signal during shutdown
            signal.sigwait(signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return signum
