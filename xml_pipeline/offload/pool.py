"""The process pool of ``cpu_bound`` listeners, as the pump sees it.

:class:`WorkerPool` wraps a ``ProcessPoolExecutor`` whose processes run
:mod:`xml_pipeline.worker`. It adds what the executor lacks:

- **micro-batching**: every task ready in one loop tick goes out in as few
  submissions as keep the workers busy (at most ``batch_max`` each, at most two
  batches in flight per worker), because one executor round trip costs far more
  than running a small handler;
- **crash recovery**: a dead worker breaks the whole executor. The pool builds a
  new one, resubmits the innocent tasks, and runs the tasks that were running when
  it broke (the suspects) one at a time, alone: a task that crashes a worker while
  alone and has crashed ``max_crashes`` times is failed with ``WorkerCrashed``;
- **timeouts**: a task running past its listener's ``timeout_s`` has its worker
  killed; it is failed with ``HandlerTimeout``, the others are resubmitted;
- **recycling**: after ``recycle_after`` tasks per worker a fresh executor takes
  over and the old one finishes its batches and exits;
- **a bounded shutdown**: :meth:`WorkerPool.aclose` lets idle workers exit through
  the executor's shutdown, SIGKILLs the busy ones (their tasks are cancelled) and,
  after a grace, whatever is left; it never waits longer than a few seconds.

Which worker processes the pool has, which task each is running and how much CPU
they used are read from a shared array the workers write (see
:mod:`xml_pipeline.worker`), never from the executor's private attributes, so the hot
path pays nothing for it. Workers ignore SIGINT and SIGTERM (the pool stops them
itself) and die with the pump's process.

The timeout watchdog, :meth:`WorkerPool.watch`, is not started by the pool: its owner
runs it in its own task group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from .. import worker
from ..backends.base import Slot
from ..config import Organism, ProcessPoolSettings, import_object
from ..exceptions import (
    ConfigError,
    HandlerFailed,
    HandlerTimeout,
    InvalidReturn,
    MalformedMessage,
    MessageError,
    PayloadInvalid,
    WorkerCrashed,
)
from ..worker import Answer, BackendSpec, Failure, ListenerSpec, Meta, Output, Result, WorkerSpec

__all__ = ["PoolStatistics", "WorkerPool", "worker_spec"]


logger = logging.getLogger("xml_pipeline.pool")

_SLOTS_PER_WORKER = 64  # status slots, claimed in turn by starting workers (mod the count)
_BATCHES_PER_WORKER = 2
# A batch is sized to run about this long (by the mean time of recent tasks), so slow
# handlers go out a few at a time and spread over the workers, while fast ones fill
# batch_max; the ~0.2 ms of an executor round trip stays a small part of it.
_BATCH_TARGET_S = 0.01
_START_TIMEOUT_S = 60.0
_CLAIM_TIMEOUT_S = 5.0
# aclose(): how long idle workers get to exit through the executor's shutdown before
# they are SIGKILLed too, then how long to wait for the killed ones to be gone.
_CLOSE_GRACE_S = 2.0
_KILL_WAIT_S = 5.0
_CLOSE_POLL_S = 0.01
# Modules the fork server imports before it forks workers: they start in milliseconds
# instead of importing xml_pipeline each time, and the fork server ignores SIGTERM
# (see xml_pipeline.worker). "__main__" is multiprocessing's default.
_FORKSERVER_PRELOAD = ["__main__", worker.__name__]
# A task failed by the pool itself (a bug, never the handler): answered HandlerFailed.
_INTERNAL = "internal"
_ERRORS: dict[str, type[MessageError]] = {
    "validation": PayloadInvalid,
    "malformed": MalformedMessage,
    "invalid-return": InvalidReturn,
    "timeout": HandlerTimeout,
    "worker-crashed": WorkerCrashed,
}


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """Counters of the worker process pool.

    Attributes:
        workers: worker processes per executor.
        tasks: tasks completed (answered by a worker).
        batches: submissions to workers.
        crashes: times the executor broke (a worker died or was killed).
        timeouts: workers killed for running past a timeout.
        recycles: executors replaced after ``recycle_after`` tasks per worker.
        queued: tasks waiting to be submitted.
        in_flight: tasks submitted and not yet answered.
        worker_cpu_s: CPU seconds (user + system) of every worker process this pool
            ever ran, as the workers report it after each batch (the CPU of a
            worker's last batch, if it was killed in it, is not counted); it never
            decreases.
        pids: the worker processes alive now.
    """

    workers: int
    tasks: int
    batches: int
    crashes: int
    timeouts: int
    recycles: int
    queued: int
    in_flight: int
    worker_cpu_s: float
    pids: tuple[int, ...]


def _checked_path(obj: Any, given: str | None, what: str) -> str:
    try:
        path = given or worker.class_path(obj)
    except AttributeError:  # an instance, a functools.partial: no __qualname__
        raise ConfigError(
            f"{what} must be importable by module path in a worker process; "
            f"{obj!r} has no module-level name: set the listener's handler_path"
        ) from None
    try:
        found = import_object(path)
    except Exception:
        found = None
    if found is not obj:
        raise ConfigError(
            f"{what} must be importable by module path in a worker process, and "
            f"{path!r} is not it (define it at the top level of a module, not in "
            "a function or __main__ of an interactive session)"
        )
    return path


def worker_spec(
    organism: Organism,
    backend: tuple[str, Mapping[str, Any]] | None = None,
    *,
    only: Collection[str] | None = None,
) -> WorkerSpec:
    """The plain-data description a worker builds its ``cpu_bound`` listeners from.

    Args:
        organism: the organism.
        backend: the URL and options of the shared store workers read history from,
            as another process joins it (see :func:`~xml_pipeline.backends.client_url`);
            None: no access.
        only: the listeners to include (a node of a distributed organism runs those
            it serves); None: every cpu_bound listener.

    Raises:
        ConfigError: a handler or payload class cannot be imported by path.
    """
    listeners: dict[str, ListenerSpec] = {}
    for listener in organism.listeners:
        if not listener.cpu_bound or (only is not None and listener.name not in only):
            continue
        handler = _checked_path(
            listener.handler,
            listener.handler_path,
            f"listener {listener.name!r} is cpu_bound: its handler",
        )
        payloads = [
            _checked_path(cls, None, f"listener {listener.name!r}: payload class {cls.__name__}")
            for cls in listener.payloads
        ]
        listeners[listener.name] = ListenerSpec(handler=handler, payloads=payloads)
    paths: list[str] = []
    if organism.path is not None:
        paths.append(str(organism.path.resolve().parent))
    paths.extend(p for p in sys.path if isinstance(p, str) and p and p not in paths)
    store: BackendSpec | None = None
    if backend is not None:
        url, options = backend
        store = BackendSpec(
            url=url, limits=dataclasses.asdict(organism.history), options=dict(options)
        )
    return WorkerSpec(
        module=worker.__file__,
        paths=paths,
        listeners=listeners,
        backend=store,
        memory_limit_mb=organism.process_pool.memory_limit_mb,
    )


class _Executor:
    """A ``ProcessPoolExecutor``, and the generation its workers write in their slots."""

    __slots__ = ("executor", "generation", "submitted")

    def __init__(self, executor: ProcessPoolExecutor, generation: int) -> None:
        self.executor = executor
        self.generation = generation
        self.submitted = 0  # tasks sent to it (for recycle_after)


class _Task:
    """A task in the pool: what goes to a worker, and what the pool keeps of it."""

    __slots__ = ("breaks", "crashes", "future", "record", "timeout")

    def __init__(
        self, record: worker.Task, future: asyncio.Future[Result], timeout: float | None
    ) -> None:
        self.record = record
        self.future = future
        self.timeout = timeout
        self.crashes = 0
        self.breaks = 0


class _Batch:
    __slots__ = ("executor", "id", "solo", "tasks")

    def __init__(
        self,
        id: int,  # noqa: A002
        tasks: list[_Task],
        executor: _Executor,
        solo: bool,
    ) -> None:
        self.id = id
        self.tasks = tasks
        self.executor = executor
        self.solo = solo


def _alive(pid: int, birth: int) -> bool:
    """Whether the worker that wrote (pid, birth) in its slot is still running."""
    now = worker.process_birth(pid)
    if now is None:
        return False
    return now == birth or not (now and birth)  # 0: no /proc, the pid is all we know


def _kill(victims: list[tuple[int, int]]) -> None:
    """SIGKILL the workers ``(pid, birth)`` that are still alive (not a reused pid)."""
    for pid, birth in victims:
        if _alive(pid, birth):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class WorkerPool:
    """Runs ``cpu_bound`` tasks in worker processes.

    Create, ``await start()``, run :meth:`watch` in a task group when a listener has a
    timeout, and ``await aclose()``.
    """

    def __init__(self, settings: ProcessPoolSettings, spec: WorkerSpec) -> None:
        self._settings = settings
        self._spec = spec
        self._workers = settings.worker_count
        self._window = _BATCHES_PER_WORKER * self._workers
        self._ctx = multiprocessing.get_context(settings.start_method)
        self._slots = 0
        self._status: Any = None
        self._control: Any = None
        self._shared: Any = None
        self._dead_slots: dict[int, tuple[int, int]] = {}  # slot -> (pid, birth) seen dead
        self._generations = itertools.count(1)
        self._executor: _Executor | None = None
        self._retired: list[threading.Thread] = []
        self._ready: collections.deque[_Task] = collections.deque()
        self._suspects: collections.deque[_Task] = collections.deque()
        self._in_flight: dict[int, _Batch] = {}
        self._timed_out: set[tuple[int, int]] = set()
        self._batch_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._closed = False
        self._task_s = 0.0  # moving mean of a task's run time in a worker
        self._tasks_done = 0
        self._batches = 0
        self._crashes = 0
        self._timeouts = 0
        self._recycles = 0
        self._cpu_ns = 0  # the worker CPU last read (statistics())

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and check that each imported its listeners.

        Raises:
            ConfigError: a worker could not import a handler or payload class, or
                the workers did not start.
        """
        self._loop = asyncio.get_running_loop()
        self._slots = max(1024, _SLOTS_PER_WORKER * self._workers)
        self._status = self._ctx.RawArray(worker.WorkerStatus, self._slots)
        self._control = self._ctx.Value(worker.Control)
        # Read without its lock (which the workers take to claim a slot), except by
        # statistics(), which only tries it: a worker killed while holding it must not
        # hang the pool.
        self._shared = self._control.get_obj()
        if self._settings.start_method == "forkserver":
            # Process-global, and read only when the fork server starts (with the
            # first pool of the process): a fork server started earlier by other code
            # is used as it is.
            self._ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
        executor = self._executor = self._new_executor()
        try:
            pings = [
                asyncio.wrap_future(executor.executor.submit(worker.ping))
                for _ in range(self._workers)
            ]
            async with asyncio.timeout(_START_TIMEOUT_S):
                answers = await asyncio.gather(*pings)
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, TimeoutError | BrokenProcessPool | OSError):
                raise ConfigError(
                    f"the worker processes did not start ({exc!r}); a script that runs a "
                    "pump with cpu_bound listeners must start it under "
                    "if __name__ == '__main__':"
                ) from exc
            raise
        for answer in answers:
            for name, error in sorted(answer.errors.items()):
                await self.aclose()
                raise ConfigError(f"listener {name!r} in a worker process: {error}")
        # One submit starts one process, but one worker may have answered two pings:
        # wait (briefly) until each has claimed its slot, so pids lists them all.
        deadline = time.monotonic() + _CLAIM_TIMEOUT_S
        while len(self._live(executor.generation)) < self._workers:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(_CLOSE_POLL_S)

    def _new_executor(self) -> _Executor:
        generation = next(self._generations)
        executor = ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=self._ctx,
            initializer=worker.initialize,
            initargs=(self._spec, self._status, self._control, generation),
        )
        return _Executor(executor, generation)

    def _retire(self, executor: _Executor, *, cancel: bool = False) -> None:
        """Let an executor finish what it runs and exit, without blocking the loop."""
        thread = threading.Thread(
            target=functools.partial(executor.executor.shutdown, cancel_futures=cancel),
            name="xml_pipeline pool retire",
            daemon=True,
        )
        thread.start()
        self._retired = [t for t in self._retired if t.is_alive()]
        self._retired.append(thread)

    async def aclose(self) -> None:
        """Stop every worker process; tasks not answered yet are cancelled.

        Idle workers exit through the executors' shutdown; workers running a task are
        SIGKILLed at once (their tasks are cancelled), and any worker still alive
        after a grace of 2 s too. Bounded in time (a few seconds at most, whatever the
        workers or the executors' threads do), idempotent, and safe to cancel, as from
        a shielded cancel scope with a deadline: what is left when it is cancelled is
        SIGKILLed before it returns. Afterwards no worker process of this pool is alive.

        The fork server (``start_method: forkserver``) is multiprocessing's, shared by
        every pool of the process: it stays until the process exits, then exits by
        itself.
        """
        self._closed = True
        for task in itertools.chain(self._ready, self._suspects):
            task.future.cancel()
        self._ready.clear()
        self._suspects.clear()
        executors = {b.executor.generation: b.executor for b in self._in_flight.values()}
        for batch in self._in_flight.values():
            for task in batch.tasks:
                task.future.cancel()
        self._in_flight.clear()
        if self._executor is not None:
            executors[self._executor.generation] = self._executor
            self._executor = None
        for executor in executors.values():
            self._retire(executor, cancel=True)
        if self._shared is not None:
            self._shared.closing = 1  # a worker starting now exits
        _kill(self._live(busy=True))
        try:
            await self._wait_stopped(_CLOSE_GRACE_S)
        finally:
            _kill(self._live())  # hung, or this call was cancelled: SIGKILL the rest
        await self._wait_stopped(_KILL_WAIT_S)

    async def _wait_stopped(self, seconds: float) -> None:
        # Polled: the workers are not this process's children with forkserver, and the
        # executors' threads have nothing to await; it is the shutdown, not the hot path.
        deadline = time.monotonic() + seconds
        while self._stopping():
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(_CLOSE_POLL_S)

    def _stopping(self) -> bool:
        """Whether a worker or an executor's shutdown is still under way."""
        self._retired = [t for t in self._retired if t.is_alive()]
        return bool(self._retired or self._live())

    def _claimed(self) -> list[worker.WorkerStatus]:
        """The status slots workers claimed so far (views of the shared array)."""
        if self._status is None:
            return []
        slots: list[worker.WorkerStatus] = self._status[: min(self._shared.claimed, self._slots)]
        return slots

    def _live(self, generation: int | None = None, *, busy: bool = False) -> list[tuple[int, int]]:
        """``(pid, birth)`` of the workers alive (of one executor; running a batch)."""
        found = []
        for slot, status in enumerate(self._claimed()):
            pid = status.pid
            birth = status.birth
            if not pid or self._dead_slots.get(slot) == (pid, birth):
                continue
            if generation is not None and status.generation != generation:
                continue
            if busy and not status.batch:
                continue
            if _alive(pid, birth):
                found.append((pid, birth))
            else:
                self._dead_slots[slot] = (pid, birth)
        return found

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counters."""
        cpu_ns = self._cpu_ns
        if self._status is not None:
            # Under the workers' lock: a worker reclaiming a slot moves its CPU to
            # retired_cpu_ns in two steps, and a read between them would count it twice
            # or not at all (a counter going down). Tried, not waited for (a worker
            # holds it for microseconds, or forever if killed then): while it is held
            # the last value stands. Never less than that either (a worker claims
            # without the lock after a timeout).
            lock = self._control.get_lock()
            if lock.acquire(False):
                try:
                    read = self._shared.retired_cpu_ns + sum(s.cpu_ns for s in self._claimed())
                finally:
                    lock.release()
                cpu_ns = self._cpu_ns = max(cpu_ns, read)
        return PoolStatistics(
            workers=self._workers,
            tasks=self._tasks_done,
            batches=self._batches,
            crashes=self._crashes,
            timeouts=self._timeouts,
            recycles=self._recycles,
            queued=len(self._ready) + len(self._suspects),
            in_flight=sum(len(b.tasks) for b in self._in_flight.values()),
            worker_cpu_s=cpu_ns / 1e9,
            pids=tuple(sorted(pid for pid, _ in self._live())),
        )

    # -- running tasks -----------------------------------------------------------

    async def run(
        self,
        listener: str,
        xml: bytes,
        meta: Meta,
        history: list[Slot] | None,
        timeout: float | None,
        trace: str | None = None,
    ) -> list[Output]:
        """Run one task; its handler's responses, encoded. ``trace``: the W3C
        ``traceparent`` the handler runs under in the worker (see ``Task.trace``).

        Raises:
            MessageError: the handler failed (the subclass names how).
        """
        assert self._loop is not None
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        future: asyncio.Future[Result] = self._loop.create_future()
        self._ready.append(_Task(worker.Task(listener, xml, meta, history, trace), future, timeout))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)
        result = await future
        if not isinstance(result, Failure):
            return result
        if result.code == "handler-error":
            trace = result.traceback
            detail = f"\n{trace}" if trace and logger.isEnabledFor(logging.DEBUG) else ""
            logger.warning(
                "handler of %s raised %s: %s%s", listener, result.kind, result.message, detail
            )
            raise HandlerFailed(
                f"{listener} raised {result.kind}: {result.message}", listener=listener
            )
        raise _ERRORS.get(result.code, HandlerFailed)(result.message, listener=listener)

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._closed or self._executor is None:
            return
        while self._suspects:
            # Suspects run alone, so a crash can be pinned on one task.
            if self._in_flight:
                return
            task = self._suspects.popleft()
            if not task.future.done():
                self._submit([task], solo=True)
                return
        # (no suspect left, or only cancelled ones: the ready tasks go out)
        ready = self._ready
        cap = self._settings.batch_max
        if self._task_s > 0:
            cap = max(1, min(cap, int(_BATCH_TARGET_S / self._task_s)))
        while ready and len(self._in_flight) < self._window and self._executor is not None:
            free = self._window - len(self._in_flight)
            size = min(cap, max(1, math.ceil(len(ready) / free)))
            tasks: list[_Task] = []
            while ready and len(tasks) < size:
                task = ready.popleft()
                if not task.future.done():
                    tasks.append(task)
            if tasks:
                self._submit(tasks, solo=False)

    def _submit(self, tasks: list[_Task], *, solo: bool) -> None:
        executor = self._executor
        assert executor is not None
        batch = _Batch(next(self._batch_ids), tasks, executor, solo)
        self._in_flight[batch.id] = batch
        self._batches += 1
        executor.submitted += len(tasks)
        try:
            try:
                future = executor.executor.submit(
                    worker.run_batch, batch.id, [t.record for t in tasks]
                )
            except (BrokenProcessPool, RuntimeError):
                self._on_break(executor)
                return
            future.add_done_callback(functools.partial(self._threadsafe, batch))
        except Exception as exc:
            self._abandon(batch, exc)

    def _threadsafe(self, batch: _Batch, future: ConcurrentFuture[Answer]) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._on_done, batch, future)

    def _on_done(self, batch: _Batch, future: ConcurrentFuture[Answer]) -> None:
        try:
            self._answer(batch, future)
        except BaseException as exc:
            self._abandon(batch, exc)
            if not isinstance(exc, Exception):
                raise

    def _abandon(self, batch: _Batch, exc: BaseException) -> None:
        """Handling a batch failed in the pool itself: fail its tasks, never strand them."""
        logger.error(
            "internal error in the worker pool, %d message(s) failed: %r",
            sum(not t.future.done() for t in batch.tasks),
            exc,
            exc_info=exc,
        )
        if self._in_flight.get(batch.id) is batch:
            del self._in_flight[batch.id]
        reason = f"internal error in the worker pool: {type(exc).__name__}: {exc}"
        for task in batch.tasks:
            if not task.future.done():
                task.future.set_result(Failure(_INTERNAL, "HandlerFailed", reason, ""))
        self._schedule()

    def _answer(self, batch: _Batch, future: ConcurrentFuture[Answer]) -> None:
        if self._closed or self._in_flight.get(batch.id) is not batch:
            return  # answered already (the executor broke, or the pool closed)
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or isinstance(error, BrokenProcessPool):
            self._on_break(batch.executor)
            return
        del self._in_flight[batch.id]
        if error is not None:  # cannot happen with plain records; fail loudly, not silently
            logger.error("a batch failed in the worker pool: %r", error)
            for task in batch.tasks:
                if not task.future.done():
                    task.future.set_result(
                        Failure("handler-error", type(error).__name__, str(error), "")
                    )
        else:
            answer = future.result()
            results = answer.results
            mean = answer.seconds / len(batch.tasks)
            self._task_s = mean if self._task_s == 0 else 0.8 * self._task_s + 0.2 * mean
            for task, result in zip(batch.tasks, results, strict=True):
                if not task.future.done():
                    task.future.set_result(result)
            self._tasks_done += len(batch.tasks)
        recycle = self._settings.recycle_after
        current = self._executor
        if (
            recycle is not None
            and batch.executor is current
            and current.submitted >= recycle * self._workers
        ):
            self._recycles += 1
            logger.info("recycling the worker processes after %d tasks", current.submitted)
            self._retire(current)
            self._executor = self._new_executor()
        self._dispatch()

    def _running(self, batches: dict[int, _Batch]) -> set[tuple[int, int]]:
        """(batch id, task index) of what the workers are running now, by the status array."""
        running = set()
        for status in self._claimed():
            batch_id = status.batch
            if batch_id in batches:
                running.add((batch_id, status.index))
        return running

    def _on_break(self, executor: _Executor) -> None:
        """The executor broke: answer the culprit, resubmit the rest, replace the executor."""
        batches = {i: b for i, b in self._in_flight.items() if b.executor is executor}
        running = self._running(batches)
        # Its other workers may be running a batch still (they ignore the SIGTERM the
        # executor sends them): their tasks go out again, so stop them now.
        _kill(self._live(executor.generation))
        killed = {key for key in self._timed_out if key[0] in batches}
        self._timed_out -= killed
        self._crashes += 1
        innocents: list[_Task] = []
        max_crashes = self._settings.max_crashes
        for batch_id, batch in batches.items():
            del self._in_flight[batch_id]
            for index, task in enumerate(batch.tasks):
                if task.future.done():
                    continue
                key = (batch_id, index)
                if key in killed:
                    assert task.timeout is not None
                    reason = (
                        f"{task.record.listener} did not finish within {task.timeout:g} s "
                        "(its worker process was killed)"
                    )
                    self._fail(task, HandlerTimeout(reason, listener=task.record.listener))
                    continue
                task.breaks += 1
                suspect = not killed and (key in running or batch.solo)
                if suspect:
                    task.crashes += 1
                if suspect and batch.solo and task.crashes >= max_crashes:
                    reason = (
                        f"the worker process running {task.record.listener} died "
                        f"({task.crashes} times with this message, the last time alone)"
                    )
                    self._fail(task, WorkerCrashed(reason, listener=task.record.listener))
                elif task.breaks > 10 * max_crashes + 10:
                    reason = (
                        f"the worker pool broke {task.breaks} times while {task.record.listener} "
                        "had this message; giving up"
                    )
                    self._fail(task, WorkerCrashed(reason, listener=task.record.listener))
                elif suspect:
                    self._suspects.append(task)
                else:
                    innocents.append(task)
        self._ready.extendleft(reversed(innocents))
        if killed:
            logger.warning("killed a worker process running past its timeout")
        else:
            logger.warning(
                "a worker process died; %d message(s) resubmitted, %d suspect(s) to run alone",
                len(innocents),
                len(self._suspects),
            )
        if executor is self._executor and not self._closed:
            self._executor = self._new_executor()
        self._retire(executor)
        self._schedule()

    def _fail(self, task: _Task, exc: MessageError) -> None:
        task.future.set_result(Failure(exc.code, type(exc).__name__, exc.reason, ""))

    # -- timeouts ----------------------------------------------------------------

    async def watch(self) -> None:
        """Kill the workers running a task past its listener's ``timeout_s``.

        Runs until cancelled (or until the pool is closed): the pool's owner runs it
        in its task group when a ``cpu_bound`` listener has a timeout. Without it,
        ``timeout_s`` is not enforced. A killed worker breaks its executor: its task
        is answered ``HandlerTimeout``, the others are resubmitted.
        """
        while not self._closed:
            await asyncio.sleep(self._watch_period())
            if not self._closed and self._status is not None:
                self._check_timeouts()

    def _watch_period(self) -> float:
        timeouts = [t.timeout for b in self._in_flight.values() for t in b.tasks if t.timeout]
        return min(0.25, max(0.005, min(timeouts, default=1.0) / 10))

    def _check_timeouts(self) -> None:
        now = time.monotonic_ns()
        for status in self._claimed():
            batch = self._in_flight.get(status.batch)
            if batch is None:
                continue
            index = status.index
            started = status.started_ns
            if index >= len(batch.tasks):
                continue
            task = batch.tasks[index]
            if task.timeout is None or task.future.done():
                continue
            if now - started <= task.timeout * 1e9:
                continue
            if status.batch != batch.id or status.index != index:
                continue  # it moved on meanwhile
            if status.generation != batch.executor.generation:
                continue  # a stale slot
            key = (batch.id, index)
            if key in self._timed_out:
                continue
            pid = status.pid
            birth = status.birth
            if not _alive(pid, birth):
                continue
            self._timed_out.add(key)
            self._timeouts += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
