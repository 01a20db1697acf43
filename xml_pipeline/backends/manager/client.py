"""The manager client: :class:`ManagerBackend`, on the caller's event loop.

``asyncio.open_connection`` and the handshake on its streams; then the connection's
transport is handed to a small ``asyncio.Protocol`` that cuts the answers out of what
``data_received`` gets and matches them, in order, to the frames in flight. The loop's
own timeouts, and natural pipelining: calls made in one loop tick go as one request
frame, behind the frames already in flight on the same connection. No thread.

No request frame is larger than the server's ``max_request_bytes`` (named in its
answer to ``hello``): batches are cut under it, and a single call larger than it
raises :class:`~xml_pipeline.exceptions.RequestTooLarge` without being sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from ...exceptions import BackendError, BackendUnavailable, RequestTooLarge
from ..base import (
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_obj,
    dead_letter_to_bytes,
    slot_from_obj,
    slot_to_bytes,
)
from ..scheme import ManagerOptions, serves
from .protocol import (
    AUTHKEY_ENV,
    HANDSHAKE_FRAME_BYTES,
    PROTOCOL,
    FrameBuffer,
    answer_challenge,
    decode_rows,
    decode_slots,
    deliver_challenge,
    display,
    dumps,
    encode_string,
    frame,
    loads,
    read_frame,
    reason,
)
from .server import ManagerServer

__all__ = ["ManagerBackend", "ManagerStatistics"]

logger = logging.getLogger(__name__)

_BATCH_BYTES = 1 << 20  # a client stops adding calls to a batch past this many bytes
_BATCH_CALLS = 1024  # at most this many calls a frame (a server takes MAX_REQUEST_CALLS)
_HELLO_BYTES = 1 << 16  # the largest answer to hello read
_ANSWER_BYTES = 512 << 20  # the largest answer read (a whole history of big slots)
_LEGACY_REQUEST_BYTES = 512 << 20  # the frame cap of a protocol-1 server, which does not say
_MANY = b'["deadletter_add_many",['
_FRAMING = 2  # the brackets around a frame's calls
TASK_NAME = "xml_pipeline manager connection"
"""The name of the one idle task a connection keeps (see :class:`_Connection`)."""


_OPTIONS = ManagerOptions()  # the defaults of the organism file's manager: section
_T = TypeVar("_T")


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


def _as_letters(value: Any) -> list[DeadLetter]:
    return [dead_letter_from_obj(obj) for obj in value]


def _as_strs(value: Any) -> list[str]:
    return [str(x) for x in value]


def _as_str_dict(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()}


def _as_int_dict(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in value.items()}


def _request(*call: Any) -> bytes:
    return dumps(call)


class _Connection(asyncio.Protocol):
    """One authenticated connection on one event loop, as the transport's protocol.

    Calls are written at once when nothing is in flight; calls made while frames are
    in flight are gathered until the end of the loop tick and written as one frame.
    Frames are answered in the order they were written (the server runs one
    connection's frames one after the other), so each answer is matched to the
    oldest frame in flight, in ``data_received``: no reader task, no future per
    read (measured: a round trip costs ~20 µs less client CPU than
    ``StreamReader.readexactly`` in a reader task, ~40 instead of ~60). A frame in
    flight with no answer for ``timeout`` seconds (the loop's own timer) loses the
    connection. One idle task (:data:`TASK_NAME`) ends with the connection.
    """

    def __init__(
        self,
        backend: ManagerBackend,
        writer: asyncio.StreamWriter,
        timeout: float,
        hello: dict[str, Any],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.lost: BackendUnavailable | None = None
        cap = hello.get("max_request_bytes")
        self.max_request_bytes = cap if type(cap) is int else _LEGACY_REQUEST_BYTES
        """The largest request frame the server reads."""
        limits = hello.get("limits")
        kept = limits.get("dead_letter_bytes") if isinstance(limits, dict) else None
        self.dead_letter_bytes: int | None = kept if type(kept) is int and kept >= 0 else None
        """How much of a dead letter's data the server keeps (None: unknown)."""
        self._backend = backend
        self._url = backend.url
        self._writer = writer
        self._transport = writer.transport
        self._timeout = timeout
        self._inflight: collections.deque[list[_Item]] = collections.deque()
        self._pending: list[_Item] = []
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0  # loop time of the last answer, or of a write from idle
        self._frames = FrameBuffer(_ANSWER_BYTES)
        self._ended = self.loop.create_future()  # set by connection_lost
        self._transport.set_protocol(self)
        # An idle task per connection, so that the end of its event loop (asyncio.run
        # cancels what is left) closes the connection too; it reads nothing.
        self._task = self.loop.create_task(self._watch(), name=TASK_NAME)

    # -- writing ---------------------------------------------------------------

    def enqueue(self, item: _Item) -> None:
        """Send one call: now if nothing is in flight, else at the end of this tick.

        Raises:
            RequestTooLarge: the call alone makes a frame over the server's cap.
        """
        if self.lost is not None:
            raise _copy(self.lost)
        if len(item[0]) + _FRAMING > self.max_request_bytes:
            raise self.too_large(len(item[0]) + _FRAMING)
        if self._flush_handle is None and not self._inflight:
            self._write([item])  # idle: no reason to wait for company
            return
        self._pending.append(item)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def too_large(self, size: int) -> RequestTooLarge:
        """The error for a call that makes a frame of ``size`` bytes on its own."""
        return RequestTooLarge(
            f"{self._url}: a request of {size} bytes is over the manager's cap of "
            f"{self.max_request_bytes} bytes; it was not sent (raise the server's "
            "max_request_bytes: python -m xml_pipeline manager --max-request-bytes N, "
            "or manager.max_request_bytes in the organism file that serves the store)"
        )

    def _flush(self) -> None:
        # Frames of at most _BATCH_CALLS calls, ending past _BATCH_BYTES, and never
        # over the server's cap (each call alone is under it: see enqueue).
        self._flush_handle = None
        pending, self._pending = self._pending, []
        room = self.max_request_bytes - _FRAMING
        start, count = 0, len(pending)
        while start < count:
            size = len(pending[start][0])
            end = start + 1
            while end < count and end - start < _BATCH_CALLS and size < _BATCH_BYTES:
                grown = size + 1 + len(pending[end][0])  # a comma between calls
                if grown > room:
                    break
                size, end = grown, end + 1
            self._write(pending[start:end])
            start = end

    def _write(self, batch: list[_Item]) -> None:
        if self.lost is not None:
            self._fail(batch, self.lost)
            return
        if len(batch) == 1:
            data = b"[" + batch[0][0] + b"]"
        else:
            data = b"[" + b",".join([item[0] for item in batch]) + b"]"
        self._inflight.append(batch)
        if len(self._inflight) == 1:
            self._progress = self.loop.time()
            if self._timer is None:
                self._timer = self.loop.call_at(self._progress + self._timeout, self._expire)
        self._transport.write(frame(data))

    def _expire(self) -> None:
        # One timer while frames are in flight, moved on lazily: an answer only
        # notes the time (an answer per timer reschedule would cost more than it).
        self._timer = None
        if not self._inflight or self.lost is not None:
            return
        due = self._progress + self._timeout
        if self.loop.time() >= due:
            self.lose(f"no answer within {self._timeout:g}s", None)
        else:
            self._timer = self.loop.call_at(due, self._expire)

    # -- reading (the protocol's callbacks) ------------------------------------

    def data_received(self, data: bytes) -> None:
        frames = self._frames
        frames.feed(data)
        try:
            while (answer := frames.next()) is not None:
                self._answer(answer)
        except ValueError as exc:
            self.lose("the server's answer does not match the request", exc)
        except Exception as exc:  # a bug: fail every call rather than leave one waiting
            logger.exception("%s: the client's reader failed", self._url)
            self.lose("internal error", exc)

    def eof_received(self) -> bool:
        self.lose("connection lost", None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose("connection lost", exc)
        if not self._ended.done():
            self._ended.set_result(None)

    async def _watch(self) -> None:
        try:
            await self._ended
        except asyncio.CancelledError:
            self.lose("the backend is closed", None)
            raise

    def _answer(self, data: bytes) -> None:
        if not self._inflight:
            raise ValueError("an answer to no request")
        try:
            replies = loads(data)
        except (ValueError, RecursionError):
            replies = None
        if type(replies) is not list or len(replies) != len(self._inflight[0]):
            raise ValueError("an answer of another length")  # lose() fails the batch
        batch = self._inflight.popleft()
        self._progress = self.loop.time()
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
            why = f" ({reason(cause)})" if cause is not None and str(cause) else ""
            self.lost = BackendUnavailable(f"{self._url}: {what}{why}")
            self.lost.__cause__ = cause
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = [item for batch in self._inflight for item in batch] + self._pending
        self._inflight.clear()
        self._pending = []
        self._fail(waiting, self.lost)
        # Every call is answered or failed by now: nothing is worth flushing, and a
        # graceful close would wait for a stalled server to read what is buffered.
        self._transport.abort()

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
                await asyncio.wait(futures)  # answered, or failed by lose()
        finally:  # cancelled meanwhile too: the connection ends
            self.lose("the backend is closed", None)
        await asyncio.wait([self._task])

    def abandon(self) -> None:
        """Drop a connection whose event loop is not the caller's (from any thread)."""
        self.lost = self.lost or BackendUnavailable(f"{self._url}: the backend is closed")
        if self.loop.is_closed():
            return  # the end of its loop cancelled _watch, which closed the connection
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
    go as one frame, pipelined behind the others on the same connection. The
    connection's protocol matches the answers to the frames in the order they were
    written, as they arrive; one idle task per connection (:data:`TASK_NAME`) ends
    with it (:meth:`aclose`, a lost connection, cancellation, the end of its loop).
    Calls made in order run on the server in that order.

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
        serve: start the server in this process (a thread running its event loop),
            stopped by :meth:`aclose` (which waits up to 5 s for that thread).
        connect_timeout_s: bound on connecting and authenticating.
        request_timeout_s: bound on a silent server while a request is in flight.
        max_request_bytes: the served store's request cap (``serve`` only; a client
            keeps under the cap its server names).
        max_connections: how many clients the served store keeps (``serve`` only).
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
        max_request_bytes: int = _OPTIONS.max_request_bytes,
        max_connections: int = _OPTIONS.max_connections,
    ) -> None:
        if not authkey:
            raise BackendUnavailable(f"{display(address)}: the authkey is empty")
        if connect_timeout_s <= 0 or request_timeout_s <= 0:
            raise BackendUnavailable(f"{display(address)}: timeouts must be positive")
        if max_request_bytes < HANDSHAKE_FRAME_BYTES or max_connections < 1:
            raise BackendUnavailable(
                f"{display(address)}: max_request_bytes must be at least "
                f"{HANDSHAKE_FRAME_BYTES} and max_connections at least 1"
            )
        if address[1] == 0 and not serve:
            raise BackendUnavailable(
                f"{display(address)}: port 0 (a free port) needs serve: name the server's port"
            )
        self._explicit_limits = limits
        self.limits = limits or HistoryLimits()
        self._address = address
        self._authkey = authkey
        self._serve = serve
        self._connect_timeout = connect_timeout_s
        self._request_timeout = request_timeout_s
        self._serve_caps = {
            "max_request_bytes": max_request_bytes,
            "max_connections": max_connections,
        }
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
        max_request_bytes: int = _OPTIONS.max_request_bytes,
        max_connections: int = _OPTIONS.max_connections,
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
        shown = display((host, port))
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key != "serve":
                raise BackendUnavailable(
                    f"{shown}: unknown URL option {key}={value!r} (only serve=1 or serve=0)"
                )
        serve = serves(url, {"serve": serve})  # the URL's serve= wins
        key_text = authkey if authkey is not None else os.environ.get(AUTHKEY_ENV)
        if not key_text:
            raise BackendUnavailable(
                f"{shown}: no authkey: set the {AUTHKEY_ENV} environment variable "
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
            max_request_bytes=max_request_bytes,
            max_connections=max_connections,
        )

    def __repr__(self) -> str:
        return f"<ManagerBackend {self.url}{' serving' if self._serve else ''}>"

    @property
    def url(self) -> str:
        """``manager://HOST:PORT`` (with the actual port once serving at port 0)."""
        return display(self.address)

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
            server = ManagerServer(self._address, self._authkey, self.limits, **self._serve_caps)
            try:
                server.start()
            except OSError as exc:
                raise BackendUnavailable(
                    f"cannot serve {display(self._address)}: {reason(exc)}"
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
                read = functools.partial(read_frame, reader, HANDSHAKE_FRAME_BYTES)
                write = functools.partial(_write_frame, writer)
                await answer_challenge(read, write, self._authkey)
                await deliver_challenge(read, write, self._authkey)
                writer.write(frame(dumps([["hello", PROTOCOL]])))
                [[status, hello]] = loads(await read_frame(reader, _HELLO_BYTES))
                if status != 0 and "is not supported" in str(hello):
                    # A server of protocol 1: it names no cap (its own was 512 MiB).
                    writer.write(frame(dumps([["hello", 1]])))
                    [[status, hello]] = loads(await read_frame(reader, _HELLO_BYTES))
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
                raise BackendUnavailable(f"{url}: cannot connect: {reason(exc)}") from exc
            raise BackendUnavailable(f"{url}: connection lost ({reason(exc)})") from exc
        except BaseException as exc:
            _close(writer)
            if not isinstance(exc, Exception):  # cancelled
                raise
            # garbage from something else listening there
            raise BackendUnavailable(
                f"{url}: not an xml_pipeline manager server ({reason(exc)})"
            ) from exc
        if status != 0:
            _close(writer)
            raise BackendUnavailable(f"{url}: the server refused: {hello}")
        if not isinstance(hello, dict):
            _close(writer)
            raise BackendUnavailable(f"{url}: not an xml_pipeline manager server (hello)")
        self._check_limits(hello.get("limits"))
        self._connects += 1
        return _Connection(self, writer, self._request_timeout, hello)

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
        thread = encode_string(thread_id).encode()
        request = b'["buffer_append",%s,%s]' % (thread, slot_to_bytes(slot))
        return await self._call(request, _as_int)

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        request = _request("buffer_contains", thread_id, message_id, direction)
        return await self._call(request, _as_bool)

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        if self._rows:
            try:
                request = b'["buffer_get_rows",%s]' % encode_string(thread_id).encode()
                return await self._call(request, decode_rows)
            except BackendError as exc:
                if "unknown call" not in str(exc) or isinstance(exc, BackendUnavailable):
                    raise
                self._rows = False  # a server from before buffer_get_rows: a read, asked again
        return await self._call(_request("buffer_get_thread", thread_id), decode_slots)

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
        conn = await self._connected()
        request = b'["deadletter_add",' + dead_letter_to_bytes(_kept(letter, conn)) + b"]"
        return await self._call(request, _as_str)

    async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Store the letters with one server-side call (one round trip), ids in order.

        A batch larger than one request frame of the server's (``max_request_bytes``)
        goes as several calls, pipelined back to back, each in a frame under the cap.
        Each letter's data is cut to what the server keeps before it is sent.

        Raises:
            RequestTooLarge: one letter alone is over the cap (nothing was sent).
        """
        if not letters:
            return []
        conn = await self._connected()
        encoded = [dead_letter_to_bytes(_kept(letter, conn)) for letter in letters]
        room = conn.max_request_bytes - _FRAMING - len(_MANY) - 2  # the call's "]]"
        largest = max(map(len, encoded))
        if largest > room:
            raise conn.too_large(largest + len(_MANY) + 2 + _FRAMING)
        requests: list[bytes] = []
        start, size = 0, 0
        for n, data in enumerate(encoded):
            if n > start and size + 1 + len(data) > room:
                requests.append(_MANY + b",".join(encoded[start:n]) + b"]]")
                start, size = n, 0
            size += len(data) + (1 if n > start else 0)
        requests.append(_MANY + b",".join(encoded[start:]) + b"]]")
        del encoded
        if len(requests) == 1:
            return await self._call(requests[0], _as_strs)
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


def _kept(letter: DeadLetter, conn: _Connection) -> DeadLetter:
    """``letter`` with its data cut to what the server keeps (it would cut it anyway)."""
    cap = conn.dead_letter_bytes
    if cap is None or len(letter.data) <= cap:
        return letter
    return dataclasses.replace(letter, data=letter.data[:cap])


def _write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(frame(data))


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
