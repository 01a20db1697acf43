"""The Redis backend: histories, registry and dead letters shared by several processes.

``redis://[[user]:[password]@]HOST:PORT/DB`` (also ``rediss://``, Redis over TLS, and
``unix:///PATH?db=DB``, Redis over a unix socket), on
``redis.asyncio`` with the hiredis parser. Only this module imports ``redis``.

Key layout (``P`` is the prefix, ``xml_pipeline`` by default; ids and chains are UTF-8)::

    P:hist:<thread>   LIST    the frame's kept slots, oldest first; each item is
                              exactly slot_to_bytes(slot) with its assigned index
    P:hidx:<thread>   HASH    "in:<message id>" / "out:<message id>" -> absolute index
                              "#<index>"   -> that slot's "in:/out:" field (for trimming)
                              "next"       -> the next index (next - LLEN were trimmed)
    P:chain:<chain>   STRING  the uuid of a chain      } a frame's registry entry: two
    P:uuid:<uuid>     STRING  the chain of a uuid      } keys, written together
    P:dl:ids          ZSET    dead-letter ids, scored by P:dl:seq (oldest first)
    P:dl:data         HASH    dead-letter id -> dead_letter_to_bytes(letter)
    P:dl:seq          STRING  the dead-letter sequence (INCR)
    P:stats           HASH    slots_trimmed, dead_letters_dropped

Everything stored is the documented JSON of :mod:`~xml_pipeline.backends.base` or plain
text: nothing is pickled. Appending (idempotency check, index, push, trimming past
``max_slots_per_thread``, TTL refresh of the frame's history *and* registry entry) is
one Lua script, run with EVALSHA (EVAL when the server does not know it yet);
``registry_set``/``registry_setdefault``/``registry_delete`` and the dead-letter writes
are scripts too, so each is atomic (``deadletter_add_many`` stores its whole batch with
one script call). Listing uses SCAN, never KEYS.

Limits: ``ttl_s`` (0 or less: never) is set on a frame's four keys when they are
written first, and the frame's writes refresh it once it has run down by a tenth (by a
minute at most), so an idle frame expires between ``0.9 * ttl_s`` (``ttl_s - 60`` for
long TTLs) and ``ttl_s`` after its last write. ``max_threads`` is enforced by that TTL
only (Redis keeps no LRU order of frames for us); an expired frame is not counted in
``info()``. Dead letters have no TTL: ``max_dead_letters`` bounds them. Scripts build
the keys of the other half of a registry entry themselves, so this backend needs one
Redis server or a primary, not Redis Cluster.

Round trips: commands issued from one event loop are queued and sent together — what
is ready in one loop tick goes out as one pipeline on one of a few connections, and
what arrives while those are busy goes in the next pipeline. A hundred concurrent
``buffer_append`` calls cost one or two round trips, not a hundred.

Failures: connect and socket timeouts are explicit. A command that never reached the
server (refused, reset while connecting) is retried; a command that may have run (the
reply was lost or late) is retried only if it is idempotent: every write here is
(appends by ``(message_id, direction)``, registry writes by value, dead letters by
their client-generated id), except the deletes and purge, whose answer (did it
exist?) could be wrong on a second try. Retries back off exponentially (0.1 s doubling
up to 2 s, jittered), at most ``retries`` times; then the caller gets
:class:`~xml_pipeline.exceptions.BackendUnavailable`. An outage and the recovery are
logged once each. A backend instance belongs to the event loop it is first used on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import os
import random
import socket
import uuid as _uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..exceptions import BackendError, BackendUnavailable
from .base import (
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_bytes,
    dead_letter_to_bytes,
    redact_url,
    slot_from_bytes,
    slot_to_bytes,
)
from .scheme import RedisOptions

__all__ = ["RedisBackend", "RedisStatistics"]

logger = logging.getLogger(__name__)

_OPTIONS = RedisOptions()  # the defaults of the organism file's redis: section
_LANES = 4
"""Connections (pipelines in flight at once)."""
_MAX_BATCH = 1024
"""Commands per pipeline at most."""
_BACKOFF_S = 0.1
_BACKOFF_CAP_S = 2.0
_SCAN_COUNT = 1000
_INDEX_0 = b'{"i":0,'
_REFRESH_SLACK_MS = 60_000
_MANY_BYTES = 64 << 20
"""deadletter_add_many sends a batch larger than this as several script calls."""


# -- Lua scripts -------------------------------------------------------------------


class _Script:
    """A Lua script shipped as a file in ``xml_pipeline/backends/lua/``, and its SHA-1."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()

    @classmethod
    def load(cls, name: str) -> _Script:
        return cls(resources.files(__package__).joinpath("lua", name).read_text("utf-8"))


# Each script's KEYS and ARGV are described at the top of its file.
_APPEND = _Script.load("append.lua")
_GET_SLOT = _Script.load("get_slot.lua")
_REGISTRY_SET = _Script.load("registry_set.lua")
_REGISTRY_DELETE = _Script.load("registry_delete.lua")
_DEAD_LETTER_ADD = _Script.load("deadletter_add.lua")
_DEAD_LETTER_LIST = _Script.load("deadletter_list.lua")
_DEAD_LETTER_DELETE = _Script.load("deadletter_delete.lua")
_DEAD_LETTER_PURGE = _Script.load("deadletter_purge.lua")


# -- the pipeline ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisStatistics:
    """What a :class:`RedisBackend` sent so far.

    Attributes:
        commands: commands sent (a retried command counts again).
        round_trips: pipelines sent (each is one write and its replies).
        retries: commands sent again after a connection failure.
        largest_batch: the most commands sent in one pipeline.
        connects: connections opened.
    """

    commands: int
    round_trips: int
    retries: int
    largest_batch: int
    connects: int


class _Failure(Exception):
    """Carries a redis exception to the caller's future (one per call)."""

    def __init__(self, exc: BaseException, *, maybe_applied: bool) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.maybe_applied = maybe_applied


class _Call:
    __slots__ = ("args", "attempt", "future", "idempotent", "retries", "script", "timer")

    def __init__(
        self,
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        idempotent: bool,
        retries: int,
        script: _Script | None,
    ) -> None:
        self.args = args
        self.future = future
        self.idempotent = idempotent
        self.retries = retries
        self.script = script
        self.attempt = 0
        self.timer: asyncio.TimerHandle | None = None


_RETRIABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_FATAL = (AuthenticationError, AuthorizationError)


def _reason(exc: BaseException) -> str:
    """One line saying why a connection failed (the OS's words when there are some)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.strerror:
            return seen.strerror  # "Name or service not known"
        if isinstance(seen, OSError) and seen.errno and seen.errno > 0:
            return os.strerror(seen.errno)  # without asyncio's "Connect call failed (...)"
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _pack(calls: list[_Call]) -> list[bytes]:
    """The RESP encoding of a pipeline of commands (arguments are bytes or int)."""
    out: list[bytes] = []
    append = out.append
    for call in calls:
        args = call.args
        append(b"*%d\r\n" % len(args))
        for arg in args:
            if type(arg) is int:
                arg = b"%d" % arg
            append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return [b"".join(out)]


def _glob_escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class RedisBackend:
    """Histories, registry and dead letters in Redis (see the module docstring).

    Build it with :meth:`from_url`. Nothing is connected until the first command
    (or :meth:`ping`).

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` and ``unix://`` also work).
        limits: trimming, TTL and dead-letter bounds.
        prefix: every key starts with ``prefix:``.
        connect_timeout_s: time allowed to open a connection (and for :meth:`ping`).
        socket_timeout_s: time allowed for a reply.
        retries: how many times a failed command may be sent again.

    Raises:
        BackendUnavailable: the URL cannot be parsed.
    """

    def __init__(
        self,
        url: str,
        limits: HistoryLimits | None = None,
        *,
        prefix: str = _OPTIONS.prefix,
        connect_timeout_s: float = _OPTIONS.connect_timeout_s,
        socket_timeout_s: float = _OPTIONS.socket_timeout_s,
        retries: int = _OPTIONS.retries,
    ) -> None:
        self.url = redact_url(url)
        self.limits = limits or HistoryLimits()
        self.prefix = prefix
        self._connect_timeout = connect_timeout_s
        self._socket_timeout = socket_timeout_s
        self._retries = max(0, retries)
        try:
            self._pool = ConnectionPool.from_url(
                url,
                socket_connect_timeout=connect_timeout_s,
                # Reads and writes are timed here, once per pipeline: redis-py would
                # start a timer (and, to write, a task) for every reply.
                socket_timeout=None,
                client_name="xml_pipeline",
                protocol=2,  # RESP2: the replies this module reads are the same everywhere
            )
        except (ValueError, TypeError) as exc:
            raise BackendUnavailable(f"invalid Redis URL {self.url!r}: {exc}") from exc
        ttl = self.limits.ttl_s
        self._ttl_ms = int(ttl * 1000) if ttl > 0 and math.isfinite(ttl) else 0
        if self._ttl_ms == 0 and ttl > 0 and math.isfinite(ttl):
            self._ttl_ms = 1
        # A write refreshes the TTL only once it has run down by a tenth (at most a
        # minute): four PEXPIREs cost as much as the rest of an append.
        self._refresh_below_ms = self._ttl_ms - min(self._ttl_ms // 10, _REFRESH_SLACK_MS)
        p = prefix.encode()
        self._hist = p + b":hist:"
        self._hidx = p + b":hidx:"
        self._chain = p + b":chain:"
        self._uuid = p + b":uuid:"
        self._dl_ids = p + b":dl:ids"
        self._dl_data = p + b":dl:data"
        self._dl_seq = p + b":dl:seq"
        self._stats = p + b":stats"
        # the pipeline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Call] = deque()
        self._flush_scheduled = False
        self._idle: list[AbstractConnection] = []
        self._connections: list[AbstractConnection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[_Call] = set()
        self._closed = False
        self._down_since: float | None = None
        self._n_commands = 0
        self._n_round_trips = 0
        self._n_retries = 0
        self._n_connects = 0
        self._largest_batch = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: HistoryLimits | None = None,
        *,
        prefix: str = _OPTIONS.prefix,
        connect_timeout_s: float = _OPTIONS.connect_timeout_s,
        socket_timeout_s: float = _OPTIONS.socket_timeout_s,
        retries: int = _OPTIONS.retries,
    ) -> RedisBackend:
        """The backend a ``redis://`` URL names, with the ``redis:`` section's options.

        Raises:
            BackendUnavailable: the URL cannot be parsed.
        """
        return cls(
            url,
            limits,
            prefix=prefix,
            connect_timeout_s=connect_timeout_s,
            socket_timeout_s=socket_timeout_s,
            retries=retries,
        )

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    def statistics(self) -> RedisStatistics:
        """Counters of what was sent so far."""
        return RedisStatistics(
            commands=self._n_commands,
            round_trips=self._n_round_trips,
            retries=self._n_retries,
            largest_batch=self._largest_batch,
            connects=self._n_connects,
        )

    # -- sending ---------------------------------------------------------------

    def _submit(
        self,
        args: tuple[Any, ...],
        *,
        idempotent: bool,
        retries: int | None = None,
        script: _Script | None = None,
    ) -> _Call:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(f"{self!r} is used from an event loop it does not belong to")
            self._rebind(loop)
        if self._closed:
            raise BackendUnavailable(f"{self.url}: the backend is closed")
        call = _Call(
            args,
            loop.create_future(),
            idempotent,
            self._retries if retries is None else retries,
            script,
        )
        self._queue.append(call)
        self._schedule_flush()
        return call

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop this backend was used on is closed: its sockets went with it.
        self._loop = loop
        self._connections.clear()
        self._idle.clear()
        self._tasks.clear()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue = self._queue
        while queue and not self._closed:
            if self._idle:
                conn = self._idle.pop()
            elif len(self._connections) < _LANES:
                conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
                self._connections.append(conn)
            else:
                return  # a lane that finishes flushes what waits
            n = min(len(queue), _MAX_BATCH)
            batch = [queue.popleft() for _ in range(n)]
            batch = [call for call in batch if not call.future.done()]
            if not batch:
                self._idle.append(conn)
                continue
            assert self._loop is not None
            task = self._loop.create_task(self._send(conn, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, conn: AbstractConnection, batch: list[_Call]) -> None:
        sent = False
        done = 0
        try:
            packed = _pack(batch)
            if not conn.is_connected:
                async with asyncio.timeout(self._connect_timeout):  # the handshake too
                    await conn.connect()  # type: ignore[no-untyped-call]
                self._n_connects += 1
            sent = True
            self._n_round_trips += 1
            self._n_commands += len(batch)
            if len(batch) > self._largest_batch:
                self._largest_batch = len(batch)
            async with asyncio.timeout(self._socket_timeout):
                await conn.send_packed_command(packed, check_health=False)
                for call in batch:
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:
                        reply = exc
                    done += 1
                    self._settle(call, reply)
        except asyncio.CancelledError:
            await self._drop(conn)
            self._fail(batch[done:], BackendUnavailable(f"{self.url}: the backend is closed"))
            raise
        except Exception as exc:
            await self._drop(conn)
            self._failed(batch[done:], exc, maybe_applied=sent)
            if isinstance(exc, _RETRIABLE):
                # The idle connections most likely went down with this one: reconnect
                # them before use rather than fail on each in turn.
                for idle in list(self._idle):
                    await self._drop(idle)
        else:
            if self._down_since is not None:
                assert self._loop is not None
                logger.warning(
                    "%s is reachable again after %.2f s",
                    self.url,
                    self._loop.time() - self._down_since,
                )
                self._down_since = None
        finally:
            if not self._closed:
                self._idle.append(conn)
                if self._queue:
                    self._schedule_flush()

    async def _drop(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
        except Exception:  # already broken: nothing more to release
            logger.debug("error closing a Redis connection", exc_info=True)

    def _settle(self, call: _Call, reply: Any) -> None:
        future = call.future
        if future.done():
            return
        if isinstance(reply, NoScriptError) and call.script is not None:
            # The server does not know the script (it restarted): it did not run.
            call.args = (b"EVAL", call.script.source, *call.args[2:])
            self._queue.appendleft(call)
            self._schedule_flush()
        elif isinstance(reply, ResponseError):
            future.set_exception(_Failure(reply, maybe_applied=False))
        else:
            future.set_result(reply)

    def _fail(self, calls: list[_Call], exc: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(_Failure(exc, maybe_applied=False))

    def _failed(self, calls: list[_Call], exc: Exception, *, maybe_applied: bool) -> None:
        retriable = isinstance(exc, _RETRIABLE) and not isinstance(exc, _FATAL)
        loop = self._loop
        assert loop is not None
        retried = 0
        for call in calls:
            if call.future.done():
                continue
            if (
                retriable
                and not self._closed
                and call.attempt < call.retries
                and (call.idempotent or not maybe_applied)
            ):
                call.attempt += 1
                retried += 1
                delay = min(_BACKOFF_CAP_S, _BACKOFF_S * 2 ** (call.attempt - 1))
                delay *= 0.5 + random.random() / 2  # jitter
                call.timer = loop.call_later(delay, self._retry, call)
                self._waiting.add(call)
            else:
                call.future.set_exception(_Failure(exc, maybe_applied=maybe_applied))
        self._n_retries += retried
        if retried and self._down_since is None:
            self._down_since = loop.time()
            logger.warning(
                "%s is unreachable (%s): retrying for up to %d attempts",
                self.url,
                _reason(exc),
                self._retries,
            )

    def _retry(self, call: _Call) -> None:
        self._waiting.discard(call)
        call.timer = None
        if call.future.done():
            return
        if self._closed:
            self._fail([call], BackendUnavailable(f"{self.url}: the backend is closed"))
            return
        self._queue.append(call)
        self._schedule_flush()

    async def _call(
        self,
        *args: Any,
        idempotent: bool = True,
        retries: int | None = None,
        script: _Script | None = None,
    ) -> Any:
        """Send one command and return its reply, translating redis's exceptions."""
        call = self._submit(args, idempotent=idempotent, retries=retries, script=script)
        try:
            return await call.future
        except _Failure as failure:
            exc = failure.exc
            if isinstance(exc, BackendError):
                raise BackendUnavailable(str(exc)) from None
            if isinstance(exc, _FATAL):
                raise BackendUnavailable(f"{self.url} refused us: {_reason(exc)}") from exc
            if isinstance(exc, _RETRIABLE):
                if failure.maybe_applied and not idempotent:
                    raise BackendUnavailable(
                        f"{self.url} is unreachable: {_reason(exc)}"
                        " (the command may or may not have been applied)"
                    ) from exc
                raise BackendUnavailable(f"{self.url} is unreachable: {_reason(exc)}") from exc
            if isinstance(exc, RedisError):
                raise BackendError(f"{self.url}: {_reason(exc)}") from exc
            raise BackendError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def _eval(
        self, script: _Script, keys: tuple[bytes, ...], *args: Any, idempotent: bool = True
    ) -> Any:
        return await self._call(
            b"EVALSHA", script.sha, len(keys), *keys, *args, idempotent=idempotent, script=script
        )

    async def _scan(self, prefix: bytes) -> list[bytes]:
        """Every key starting with ``prefix``, without it (SCAN, never KEYS)."""
        pattern = _glob_escape(prefix) + b"*"
        found: dict[bytes, None] = {}
        cursor: Any = b"0"
        while True:
            cursor, keys = await self._call(
                b"SCAN", cursor, b"MATCH", pattern, b"COUNT", _SCAN_COUNT
            )
            for key in keys:
                found[key[len(prefix) :]] = None
            if cursor in (b"0", 0):
                return list(found)

    async def _unlink_all(self, *prefixes: bytes) -> None:
        for prefix in prefixes:
            names = await self._scan(prefix)
            for i in range(0, len(names), 500):
                await self._call(b"UNLINK", *(prefix + name for name in names[i : i + 500]))

    # -- history ---------------------------------------------------------------

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        data = slot_to_bytes(slot._replace(index=0))
        if not data.startswith(_INDEX_0):  # pragma: no cover - base.py changed its format
            raise BackendError("slot_to_bytes no longer starts with the index")
        t = thread_id.encode()
        reply = await self._eval(
            _APPEND,
            (self._hist + t, self._hidx + t, self._uuid + t, self._stats),
            f"{slot.direction}:{slot.message_id}".encode(),
            data[len(_INDEX_0) :],
            self.limits.max_slots_per_thread,
            self._ttl_ms,
            self._chain,
            self._refresh_below_ms,
        )
        return int(reply)

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        field = f"{direction}:{message_id}".encode()
        return bool(await self._call(b"HEXISTS", self._hidx + thread_id.encode(), field))

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        items = await self._call(b"LRANGE", self._hist + thread_id.encode(), 0, -1)
        return [self._slot(item) for item in items]

    async def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        if index < 0:
            return None
        t = thread_id.encode()
        item = await self._eval(_GET_SLOT, (self._hist + t, self._hidx + t), index)
        return None if item is None else self._slot(item)

    def _slot(self, data: bytes) -> Slot:
        try:
            return slot_from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{self.url}: a stored slot is not valid: {exc}") from exc

    async def buffer_thread_len(self, thread_id: str) -> int:
        return int(await self._call(b"LLEN", self._hist + thread_id.encode()))

    async def buffer_thread_exists(self, thread_id: str) -> bool:
        return bool(await self._call(b"EXISTS", self._hist + thread_id.encode()))

    async def buffer_delete_thread(self, thread_id: str) -> bool:
        t = thread_id.encode()
        # Both keys are written together: either both exist or neither.
        n = await self._call(b"DEL", self._hist + t, self._hidx + t, idempotent=False)
        return bool(n)

    async def buffer_list_threads(self) -> list[str]:
        return [name.decode() for name in await self._scan(self._hist)]

    async def buffer_clear(self) -> None:
        await self._unlink_all(self._hist, self._hidx)

    # -- registry --------------------------------------------------------------

    async def _registry_set(self, chain: str, uuid: str, setdefault: bool) -> str:
        reply = await self._eval(
            _REGISTRY_SET,
            (self._chain + chain.encode(), self._uuid + uuid.encode()),
            chain.encode(),
            uuid.encode(),
            self._ttl_ms,
            self._chain,
            self._uuid,
            b"1" if setdefault else b"0",
        )
        return bytes(reply).decode()

    async def registry_set(self, chain: str, uuid: str) -> None:
        await self._registry_set(chain, uuid, False)

    async def registry_setdefault(self, chain: str, uuid: str) -> str:
        return await self._registry_set(chain, uuid, True)

    async def registry_get_uuid(self, chain: str) -> str | None:
        reply = await self._call(b"GET", self._chain + chain.encode())
        return None if reply is None else bytes(reply).decode()

    async def registry_get_chain(self, uuid: str) -> str | None:
        reply = await self._call(b"GET", self._uuid + uuid.encode())
        return None if reply is None else bytes(reply).decode()

    async def registry_delete(self, uuid: str) -> bool:
        reply = await self._eval(
            _REGISTRY_DELETE,
            (self._uuid + uuid.encode(),),
            self._chain,
            uuid.encode(),
            idempotent=False,
        )
        return bool(reply)

    async def registry_list_all(self) -> dict[str, str]:
        uuids = await self._scan(self._uuid)
        found: dict[str, str] = {}
        for i in range(0, len(uuids), 500):
            part = uuids[i : i + 500]
            chains = await self._call(b"MGET", *(self._uuid + u for u in part))
            for u, chain in zip(part, chains, strict=True):
                if chain is not None:  # expired between SCAN and MGET
                    found[u.decode()] = bytes(chain).decode()
        return found

    async def registry_clear(self) -> None:
        await self._unlink_all(self._uuid, self._chain)

    # -- dead letters ----------------------------------------------------------

    async def deadletter_add(self, letter: DeadLetter) -> str:
        [letter_id] = await self.deadletter_add_many((letter,))
        return letter_id

    async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Store the letters with one script call (one command, atomic), ids in order.

        A batch past 64 MiB goes as several calls, sent together in one pipeline.
        """
        if not letters:
            return []
        cap = self.limits.dead_letter_bytes
        ids: list[str] = []
        calls: list[list[bytes]] = [[]]
        size = 0
        for letter in letters:
            # The id is made here, so a retried add overwrites rather than duplicates.
            letter_id = letter.id or f"dl-{_uuid.uuid4().hex}"
            ids.append(letter_id)
            data = dead_letter_to_bytes(
                dataclasses.replace(letter, id=letter_id, data=letter.data[:cap])
            )
            if calls[-1] and size + len(data) > _MANY_BYTES:
                calls.append([])
                size = 0
            calls[-1] += (letter_id.encode(), data)
            size += len(data)
        keys = (self._dl_ids, self._dl_data, self._dl_seq, self._stats)
        replies = await asyncio.gather(
            *(self._eval(_DEAD_LETTER_ADD, keys, self.limits.max_dead_letters, *args)
              for args in calls)
        )  # fmt: skip
        for dropped, total in replies:
            if dropped and any(total - dropped < n <= total for n in (1, 100, 10_000)):
                logger.warning(
                    "dead-letter store full (%d): dropped %d oldest so far",
                    self.limits.max_dead_letters,
                    total,
                )
        return ids

    async def deadletter_list(self, limit: int | None = None) -> list[DeadLetter]:
        if limit == 0:
            return []
        last = limit - 1 if limit is not None and limit > 0 else -1
        items = await self._eval(_DEAD_LETTER_LIST, (self._dl_ids, self._dl_data), last)
        try:
            letters = [dead_letter_from_bytes(item) for item in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{self.url}: a stored dead letter is not valid: {exc}") from exc
        return letters[:limit] if limit is not None and limit < 0 else letters

    async def deadletter_delete(self, letter_id: str) -> bool:
        reply = await self._eval(
            _DEAD_LETTER_DELETE,
            (self._dl_ids, self._dl_data),
            letter_id.encode(),
            idempotent=False,
        )
        return bool(reply)

    async def deadletter_purge(self) -> int:
        reply = await self._eval(
            _DEAD_LETTER_PURGE, (self._dl_ids, self._dl_data), idempotent=False
        )
        return int(reply)

    # -- lifecycle -------------------------------------------------------------

    async def ping(self) -> None:
        """Check that Redis answers, once, within ``connect_timeout_s``.

        Raises:
            BackendUnavailable: ``<url> is unreachable: <reason>``.
        """
        try:
            async with asyncio.timeout(self._connect_timeout):
                reply = await self._call(b"PING", retries=0)
        except TimeoutError as exc:  # asyncio.timeout's
            raise BackendUnavailable(
                f"{self.url} is unreachable: no answer within {self._connect_timeout:g} s"
            ) from exc
        except BackendUnavailable:
            raise
        except BackendError as exc:  # it answered, but not as Redis does
            cause = exc.__cause__ or exc
            raise BackendUnavailable(f"{self.url} is unreachable: {_reason(cause)}") from cause
        if reply != b"PONG":
            raise BackendUnavailable(f"{self.url} is unreachable: PING answered {reply!r}")

    async def info(self) -> dict[str, int]:
        threads = await self._scan(self._hist)
        uuids = await self._scan(self._uuid)
        dead = await self._call(b"ZCARD", self._dl_ids)
        stats = await self._call(b"HMGET", self._stats, b"slots_trimmed", b"dead_letters_dropped")
        return {
            "buffer_threads": len(threads),
            "registry_entries": len(uuids),
            "dead_letters": int(dead),
            "slots_trimmed": int(stats[0] or 0),
            "dead_letters_dropped": int(stats[1] or 0),
        }

    async def aclose(self) -> None:
        """Fail what is still queued, stop what is in flight, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            # Its loop is gone or elsewhere: that loop's sockets cannot be closed from here.
            self._connections.clear()
            self._idle.clear()
            return
        closed = BackendUnavailable(f"{self.url}: the backend is closed")
        for call in self._waiting:
            if call.timer is not None:
                call.timer.cancel()
        self._fail(list(self._waiting), closed)
        self._waiting.clear()
        self._fail(list(self._queue), closed)
        self._queue.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self._connections:
            await self._drop(conn)
        self._connections.clear()
        self._idle.clear()

    async def close(self) -> None:
        """Alias of :meth:`aclose`."""
        await self.aclose()
