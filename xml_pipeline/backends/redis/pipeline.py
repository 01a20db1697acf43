"""The pipelining connection layer: every Redis command of this package goes through it.

A :class:`Pipeline` owns the connection pool, the queue of calls, a few connections
("lanes") and the retry policy. :meth:`Pipeline.call` sends any command and
:meth:`Pipeline.eval` a :class:`~xml_pipeline.backends.redis.scripts.Script`; each
returns the reply (RESP2, as redis-py's hiredis parser gives it: bytes, int, None,
lists) or raises :class:`~xml_pipeline.exceptions.BackendUnavailable` /
:class:`~xml_pipeline.exceptions.BackendError`. Calls made in one loop tick go out
together, as one pipeline on one lane; see the package docstring for batching,
retries and the outage log lines. :meth:`Pipeline.batch` folds the items of a script
issued in one loop tick (or while every lane is busy) into one call of that script.
This is the only module that imports ``redis``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoScriptError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...exceptions import BackendCorrupted, BackendError, BackendUnavailable
from ..base import redact_url
from .scripts import Script

__all__ = ["Pipeline", "RedisStatistics", "ScriptBatch", "pack_args"]

# The package's logger, as when the backend was one module: log lines keep their name.
logger = logging.getLogger("xml_pipeline.backends.redis")

_LANES = 4
"""Connections (pipelines in flight at once), unless the owner asks for other."""
_MAX_BATCH = 1024
"""Commands per pipeline at most."""
_FOLD_ITEMS = 512
_FOLD_BYTES = 1 << 20
"""Items (and their bytes) folded into one script call at most: a script holds the
server for its whole run, so a long backlog goes as several calls."""
_BACKOFF_S = 0.1
_BACKOFF_CAP_S = 2.0
_CORRUPTED = "CORRUPTED "
"""How this package's scripts start an error about keys Redis lost half of."""
_LOST_HALF = (
    "Redis lost part of what is kept together (keys evicted, expired or deleted one "
    "without the other, or a partial restore), so it is refused rather than guessed at. "
    "Delete the keys named to start that frame afresh (its history or registry entry is "
    "lost), and run Redis with maxmemory-policy noeviction and AOF"
)


@dataclass(frozen=True, slots=True)
class RedisStatistics:
    """What a :class:`~xml_pipeline.backends.redis.RedisBackend` sent so far.

    Attributes:
        commands: commands sent (a retried command counts again).
        round_trips: pipelines sent (each is one write and its replies).
        retries: commands sent again after a connection failure.
        largest_batch: the most commands sent in one pipeline.
        connects: connections opened.
        folded: items sent inside the commands of a :meth:`Pipeline.batch` (a
            history append or registry write each, for the backend): ``commands``
            counts each such call once, whatever it carries.
    """

    commands: int
    round_trips: int
    retries: int
    largest_batch: int
    connects: int
    folded: int = 0


class _Failure(Exception):
    """Carries a redis exception to the caller's future (one per call)."""

    def __init__(self, exc: BaseException, *, maybe_applied: bool) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.maybe_applied = maybe_applied


class _Call:
    __slots__ = (
        "args", "attempt", "failed_at", "future", "idempotent", "retries", "script", "timer",
    )  # fmt: skip

    def __init__(
        self,
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        idempotent: bool,
        retries: int,
        script: Script | None,
    ) -> None:
        self.args = args
        self.future = future
        self.idempotent = idempotent
        self.retries = retries
        self.script = script
        self.attempt = 0
        self.failed_at: float | None = None  # loop time of its first failure
        self.timer: asyncio.TimerHandle | None = None

    def set_result(self, reply: Any) -> None:
        """Settle the call with its reply."""
        self.future.set_result(reply)

    def set_exception(self, failure: _Failure) -> None:
        """Settle the call with its failure."""
        self.future.set_exception(failure)


class _Folded(_Call):
    """One script call carrying the items of a :class:`ScriptBatch`: ``args`` is the
    head (EVALSHA, sha, keys, shared arguments), ``tail`` the items' packed arguments.

    Each item's caller awaits a future of its own (cancelling one caller must not
    cancel the others), settled here from the reply's list; the call's own future
    only marks it done.
    """

    __slots__ = ("n_tail", "nbytes", "sealed", "tail", "waiters")

    def __init__(self, args: tuple[Any, ...], future: asyncio.Future[Any], retries: int,
                 script: Script) -> None:  # fmt: skip
        super().__init__(args, future, True, retries, script)
        self.tail: list[bytes] = []
        self.n_tail = 0
        self.nbytes = 0
        self.sealed = False  # packed once: what it sends (and resends) is fixed
        self.waiters: list[asyncio.Future[Any]] = []

    def set_result(self, reply: Any) -> None:
        waiters = self.waiters
        if not (isinstance(reply, list) and len(reply) == len(waiters)):
            what = f"{len(reply)} replies" if isinstance(reply, list) else type(reply).__name__
            error = BackendError(f"a batched script answered {what} for {len(waiters)} items")
            self.set_exception(_Failure(error, maybe_applied=True))
            return
        self.future.set_result(None)
        for waiter, item in zip(waiters, reply, strict=True):
            if waiter.done():  # its caller was cancelled
                continue
            if isinstance(item, ResponseError):  # this item's own error
                waiter.set_exception(_Failure(item, maybe_applied=False))
            else:
                waiter.set_result(item)

    def set_exception(self, failure: _Failure) -> None:
        self.future.set_result(None)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(_Failure(failure.exc, maybe_applied=failure.maybe_applied))


def pack_args(*args: bytes) -> bytes:
    """The RESP encoding of command arguments (bytes each), for :meth:`ScriptBatch.run`:
    an item is packed once, by its caller, and copied into the call as it is."""
    return b"".join([b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args])


class ScriptBatch:
    """The calls of one script whose items are folded together: see :meth:`Pipeline.batch`."""

    __slots__ = ("_head", "_open", "_pipeline", "_script")

    def __init__(self, pipeline: Pipeline, script: Script, head: tuple[Any, ...]) -> None:
        self._pipeline = pipeline
        self._script = script
        self._head = head
        self._open: _Folded | None = None

    async def run(self, item: bytes, n_args: int) -> Any:
        """Add one item (``n_args`` arguments packed by :func:`pack_args`) to the call
        being gathered, and return its reply: the element of the script's reply list
        at the item's place.

        Raises:
            BackendUnavailable: as :meth:`Pipeline.call` (the whole call failed).
            BackendError: the script answered an error for this item (or for all).
        """
        pipeline = self._pipeline
        loop = pipeline._running_loop()
        call = self._open
        if (
            call is None
            or call.sealed
            or call.future.done()  # failed before it was sent (the pipeline closed)
            or len(call.waiters) >= _FOLD_ITEMS
            or call.nbytes + len(item) > _FOLD_BYTES
            or call.future.get_loop() is not loop
        ):
            call = pipeline._submit_folded(self._head, self._script, loop)
            self._open = call
        call.tail.append(item)
        call.n_tail += n_args
        call.nbytes += len(item)
        waiter = loop.create_future()
        call.waiters.append(waiter)
        try:
            return await waiter
        except _Failure as failure:
            raise self._pipeline._error(failure, True) from _cause(failure)


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
        folded = call if type(call) is _Folded else None
        if folded is None:
            append(b"*%d\r\n" % len(args))
        else:
            folded.sealed = True
            append(b"*%d\r\n" % (len(args) + folded.n_tail))
        for arg in args:
            if type(arg) is int:
                arg = b"%d" % arg
            append(b"$%d\r\n%b\r\n" % (len(arg), arg))
        if folded is not None:
            out += folded.tail
    return [b"".join(out)]


def _cause(failure: _Failure) -> BaseException | None:
    """What a caller's exception is chained to: the redis exception, not our own."""
    return None if isinstance(failure.exc, BackendError) else failure.exc


class Pipeline:
    """Redis commands from one event loop, sent in batches over a few connections.

    Nothing is connected until the first command (or :meth:`ping`). A pipeline belongs
    to the event loop it is first used on.

    A blocking command (``XREADGROUP ... BLOCK``, ``BLPOP``) holds its lane for the whole
    wait and counts against ``socket_timeout_s``, like every reply: block for less than
    that, or give the blocking reads a pipeline of their own (``lanes=1``).

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` and ``unix://`` also work).
        connect_timeout_s: time allowed to open a connection (and for :meth:`ping`).
        socket_timeout_s: time allowed for the replies of one pipeline.
        retries: how many times a failed command may be sent again at least (by
            default; 0: never).
        outage_s: how long a failed command keeps being sent again while Redis cannot
            be reached (backing off up to 2 s), past ``retries``: the callers wait
            through an outage this long instead of failing.
        lanes: connections, so pipelines in flight at once.
        owner: what error messages call the user of this pipeline
            (``<url>: the backend is closed``).

    Raises:
        BackendUnavailable: the URL cannot be parsed.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float,
        socket_timeout_s: float,
        retries: int,
        outage_s: float = 0.0,
        lanes: int = _LANES,
        owner: str = "backend",
    ) -> None:
        self.url = redact_url(url)
        self._connect_timeout = connect_timeout_s
        self._socket_timeout = socket_timeout_s
        self._retries = max(0, retries)
        self._outage_s = max(0.0, outage_s)
        self._lanes = max(1, lanes)
        self._owner = owner
        try:
            self._pool = ConnectionPool.from_url(
                url,
                socket_connect_timeout=connect_timeout_s,
                # Reads and writes are timed here, once per pipeline: redis-py would
                # start a timer (and, to write, a task) for every reply.
                socket_timeout=None,
                client_name="xml_pipeline",
                protocol=2,  # RESP2: the replies this package reads are the same everywhere
            )
        except (ValueError, TypeError) as exc:
            raise BackendUnavailable(f"invalid Redis URL {self.url!r}: {exc}") from exc
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
        self._n_folded = 0
        self._largest_batch = 0

    def __repr__(self) -> str:
        return f"Pipeline({self.url!r})"

    def statistics(self) -> RedisStatistics:
        """Counters of what was sent so far."""
        return RedisStatistics(
            commands=self._n_commands,
            round_trips=self._n_round_trips,
            retries=self._n_retries,
            largest_batch=self._largest_batch,
            connects=self._n_connects,
            folded=self._n_folded,
        )

    # -- the API ---------------------------------------------------------------
    # call() and eval() each await their future directly (no inner coroutine): they
    # run once per command, and a frame less is measurable per message.

    async def call(self, *args: Any, idempotent: bool = True, retries: int | None = None) -> Any:
        """Send one command and return its reply.

        Args:
            args: the command and its arguments, each bytes or int (``b"GET", key``).
            idempotent: the command may be sent again when its reply was lost (it may
                have run): true for reads and for writes by value; false when a second
                run answers or does otherwise (``DEL``'s count, ``INCR``, ``XADD *``).
            retries: this call's limit, instead of the pipeline's.

        Raises:
            BackendUnavailable: Redis cannot be reached (after the retries), refused
                our credentials, or the pipeline is closed.
            BackendError: Redis answered with an error.
        """
        call = self._submit(args, idempotent, self._retries if retries is None else retries, None)
        try:
            return await call.future
        except _Failure as failure:
            raise self._error(failure, idempotent) from _cause(failure)

    async def eval(
        self,
        script: Script,
        keys: tuple[bytes, ...],
        *args: Any,
        idempotent: bool = True,
        retries: int | None = None,
    ) -> Any:
        """Run a script with EVALSHA (EVAL if the server does not know it yet).

        Arguments, return value and exceptions as for :meth:`call`.
        """
        call = self._submit(
            (b"EVALSHA", script.sha, len(keys), *keys, *args),
            idempotent,
            self._retries if retries is None else retries,
            script,
        )
        try:
            return await call.future
        except _Failure as failure:
            raise self._error(failure, idempotent) from _cause(failure)

    def batch(self, script: Script, keys: tuple[bytes, ...], *args: Any) -> ScriptBatch:
        """Calls of ``script`` that fold their items together.

        The items given to :meth:`ScriptBatch.run` while the pipeline gathers (one loop
        tick, or longer while every lane is busy) go as one call, ``EVALSHA sha
        len(keys) *keys *args *items``, sent again whole if it is retried: so every
        item must be idempotent, and the script must answer a list with one reply
        per item, in order, an item's error as an error element of that list (an
        item's failure is its own; the others' replies stand).

        Args:
            script: the script, which loops over the items after ``args``.
            keys: its KEYS, the same for every call.
            args: its first ARGV, the same for every call.
        """
        return ScriptBatch(self, script, (b"EVALSHA", script.sha, len(keys), *keys, *args))

    def _submit_folded(
        self, head: tuple[Any, ...], script: Script, loop: asyncio.AbstractEventLoop
    ) -> _Folded:
        call = _Folded(head, loop.create_future(), self._retries, script)
        self._queue.append(call)
        self._schedule_flush()
        return call

    async def ping(self) -> None:
        """Check that Redis answers, once, within ``connect_timeout_s``.

        Raises:
            BackendUnavailable: ``<url> is unreachable: <reason>``.
        """
        try:
            async with asyncio.timeout(self._connect_timeout):
                reply = await self.call(b"PING", retries=0)
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
        closed = self._closed_error()
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

    # -- queueing and sending --------------------------------------------------

    def _submit(
        self, args: tuple[Any, ...], idempotent: bool, retries: int, script: Script | None
    ) -> _Call:
        loop = self._running_loop()
        call = _Call(args, loop.create_future(), idempotent, retries, script)
        self._queue.append(call)
        self._schedule_flush()
        return call

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop a call is made on, checked to be this pipeline's, which is open."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(
                    f"{self.url}: the {self._owner} is used from an event loop"
                    " it does not belong to"
                )
            self._rebind(loop)
        if self._closed:
            raise self._closed_error()
        return loop

    def _closed_error(self) -> BackendUnavailable:
        return BackendUnavailable(f"{self.url}: the {self._owner} is closed")

    def _error(self, failure: _Failure, idempotent: bool) -> BackendError:
        """The exception a caller sees for a failed call (chained to :func:`_cause`)."""
        exc = failure.exc
        if isinstance(exc, BackendError):
            return BackendUnavailable(str(exc))
        if isinstance(exc, _FATAL):
            return BackendUnavailable(f"{self.url} refused us: {_reason(exc)}")
        if isinstance(exc, _RETRIABLE):
            if failure.maybe_applied and not idempotent:
                return BackendUnavailable(
                    f"{self.url} is unreachable: {_reason(exc)}"
                    " (the command may or may not have been applied)"
                )
            return BackendUnavailable(f"{self.url} is unreachable: {_reason(exc)}")
        if isinstance(exc, ResponseError) and str(exc).startswith(_CORRUPTED):
            # (error() in a script adds " script: <sha>, on @user_script:<line>.")
            what = str(exc)[len(_CORRUPTED) :].rpartition(" script: ")
            return BackendCorrupted(f"{self.url}: {what[0] or what[2]}. {_LOST_HALF}")
        if isinstance(exc, RedisError):
            # (a script's command refused for memory comes back as a plain error)
            if isinstance(exc, OutOfMemoryError) or "used memory > 'maxmemory'" in str(exc):
                # Out of memory (maxmemory with noeviction): nothing was written, and
                # the same call may succeed once memory is freed, as after an outage.
                return BackendUnavailable(f"{self.url} is out of memory: {_reason(exc)}")
            return BackendError(f"{self.url}: {_reason(exc)}")
        return BackendError(f"{self.url}: {type(exc).__name__}: {exc}")

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop this pipeline was used on is closed: its sockets went with it.
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
            elif len(self._connections) < self._lanes:
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
            for call in batch:
                if type(call) is _Folded:
                    self._n_folded += len(call.waiters)
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
            self._fail(batch[done:], self._closed_error())
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

    # -- settling --------------------------------------------------------------

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
            call.set_exception(_Failure(reply, maybe_applied=False))
        else:
            call.set_result(reply)

    def _fail(self, calls: list[_Call], exc: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                call.set_exception(_Failure(exc, maybe_applied=False))

    def _failed(self, calls: list[_Call], exc: Exception, *, maybe_applied: bool) -> None:
        retriable = isinstance(exc, _RETRIABLE) and not isinstance(exc, _FATAL)
        loop = self._loop
        assert loop is not None
        retried = 0
        now = loop.time()
        for call in calls:
            if call.future.done():
                continue
            if call.failed_at is None:
                call.failed_at = now
            if (
                retriable
                and not self._closed
                and call.retries > 0
                and (call.attempt < call.retries or now - call.failed_at < self._outage_s)
                and (call.idempotent or not maybe_applied)
            ):
                call.attempt += 1
                retried += 1
                delay = min(_BACKOFF_CAP_S, _BACKOFF_S * 2 ** (call.attempt - 1))
                delay *= 0.5 + random.random() / 2  # jitter
                call.timer = loop.call_later(delay, self._retry, call)
                self._waiting.add(call)
            else:
                call.set_exception(_Failure(exc, maybe_applied=maybe_applied))
        self._n_retries += retried
        if retried and self._down_since is None:
            self._down_since = loop.time()
            logger.warning(
                "%s is unreachable (%s): retrying for up to %g s",
                self.url,
                _reason(exc),
                max(self._outage_s, _BACKOFF_CAP_S * self._retries),
            )

    def _retry(self, call: _Call) -> None:
        self._waiting.discard(call)
        call.timer = None
        if call.future.done():
            return
        if self._closed:
            self._fail([call], self._closed_error())
            return
        self._queue.append(call)
        self._schedule_flush()
