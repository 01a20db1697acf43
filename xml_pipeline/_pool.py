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
  over and the old one finishes its batches and exits.

Which task a worker is running is read from a shared array the workers write
(see :mod:`xml_pipeline.worker`), so the hot path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import worker
from .config import Organism, ProcessPoolSettings, import_object
from .exceptions import (
    ConfigError,
    HandlerFailed,
    HandlerTimeout,
    InvalidReturn,
    MalformedMessage,
    MessageError,
    PayloadInvalid,
    WorkerCrashed,
)
from .worker import BackendSpec, ListenerSpec, Meta, Result, WorkerSpec

__all__ = ["PoolStatistics", "WorkerPool", "worker_spec"]


logger = logging.getLogger("xml_pipeline.pool")

_SLOTS_PER_WORKER = 64  # status slots, claimed in turn by starting workers (mod the count)
_BATCHES_PER_WORKER = 2
# A batch is sized to run about this long (by the mean time of recent tasks), so slow
# handlers go out a few at a time and spread over the workers, while fast ones fill
# batch_max; the ~0.2 ms of an executor round trip stays a small part of it.
_BATCH_TARGET_S = 0.01
_START_TIMEOUT_S = 60.0
_Answer = tuple[float, list[Result]]
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
    """

    workers: int
    tasks: int
    batches: int
    crashes: int
    timeouts: int
    recycles: int
    queued: int
    in_flight: int


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


def worker_spec(organism: Organism, backend_url: str | None = None) -> WorkerSpec:
    """The plain-data description a worker builds its ``cpu_bound`` listeners from.

    Args:
        organism: the organism.
        backend_url: the shared backend workers read history from (None: no access).

    Raises:
        ConfigError: a handler or payload class cannot be imported by path.
    """
    listeners: dict[str, ListenerSpec] = {}
    for listener in organism.listeners:
        if not listener.cpu_bound:
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
    backend: BackendSpec | None = None
    if backend_url is not None:
        parts = urlsplit(backend_url)
        url = urlunsplit(parts._replace(query="")) if parts.scheme == "manager" else backend_url
        options = dict(organism.backend_options)
        if parts.scheme == "manager":
            options["serve"] = False
        backend = BackendSpec(url=url, limits=dataclasses.asdict(organism.history), options=options)
    return WorkerSpec(
        paths=paths,
        listeners=listeners,
        backend=backend,
        memory_limit_mb=organism.process_pool.memory_limit_mb,
    )


class _Task:
    __slots__ = ("breaks", "crashes", "future", "listener", "record", "timeout")

    def __init__(
        self,
        record: worker.Task,
        future: asyncio.Future[Result],
        listener: str,
        timeout: float | None,
    ) -> None:
        self.record = record
        self.future = future
        self.listener = listener
        self.timeout = timeout
        self.crashes = 0
        self.breaks = 0


class _Batch:
    __slots__ = ("executor", "id", "solo", "tasks")

    def __init__(
        self,
        id: int,  # noqa: A002
        tasks: list[_Task],
        executor: ProcessPoolExecutor,
        solo: bool,
    ) -> None:
        self.id = id
        self.tasks = tasks
        self.executor = executor
        self.solo = solo


def _processes(executor: ProcessPoolExecutor) -> dict[int, Any]:
    # The executor keeps its processes in a private mapping (pid -> Process); there
    # is no public way to kill a hung worker or to be sure none is left.
    return dict(getattr(executor, "_processes", None) or {})


class WorkerPool:
    """Runs ``cpu_bound`` tasks in worker processes. Create, ``await start()``, ``aclose()``."""

    def __init__(self, settings: ProcessPoolSettings, spec: WorkerSpec) -> None:
        self._settings = settings
        self._spec = spec
        self._workers = settings.worker_count
        self._window = _BATCHES_PER_WORKER * self._workers
        self._ctx = multiprocessing.get_context(settings.start_method)
        self._slots = 0
        self._status: Any = None
        self._counter: Any = None
        self._executor: ProcessPoolExecutor | None = None
        self._retired: list[threading.Thread] = []
        self._ready: collections.deque[_Task] = collections.deque()
        self._suspects: collections.deque[_Task] = collections.deque()
        self._in_flight: dict[int, _Batch] = {}
        self._timed_out: set[tuple[int, int]] = set()
        self._batch_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._closed = False
        self._watchdog: asyncio.Task[None] | None = None
        self._since_recycle = 0
        self._task_s = 0.0  # moving mean of a task's run time in a worker
        self._tasks_done = 0
        self._batches = 0
        self._crashes = 0
        self._timeouts = 0
        self._recycles = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self, *, watch_timeouts: bool = False) -> None:
        """Start the workers and check that each imported its listeners.

        Raises:
            ConfigError: a worker could not import a handler or payload class, or
                the workers did not start.
        """
        self._loop = asyncio.get_running_loop()
        self._slots = max(1024, _SLOTS_PER_WORKER * self._workers)
        self._status = self._ctx.RawArray("q", worker.SLOT_WIDTH * self._slots)
        self._counter = self._ctx.Value("q", 0)
        executor = self._executor = self._new_executor()
        try:
            pings = [
                asyncio.wrap_future(executor.submit(worker.ping)) for _ in range(self._workers)
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
        for _, errors in answers:
            for name, error in sorted(errors.items()):
                await self.aclose()
                raise ConfigError(f"listener {name!r} in a worker process: {error}")
        if watch_timeouts:
            self._watchdog = asyncio.create_task(self._watch(), name="xml_pipeline pool watchdog")

    def _new_executor(self) -> ProcessPoolExecutor:
        self._since_recycle = 0
        return ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=self._ctx,
            initializer=worker.initialize,
            initargs=(self._spec, self._status, self._counter),
        )

    def _retire(self, executor: ProcessPoolExecutor) -> None:
        """Let an executor finish what it runs and exit, without blocking the loop."""
        thread = threading.Thread(
            target=executor.shutdown, name="xml_pipeline pool retire", daemon=True
        )
        thread.start()
        self._retired = [t for t in self._retired if t.is_alive()]
        self._retired.append(thread)

    async def aclose(self) -> None:
        """Stop every worker process now; tasks not answered yet are cancelled."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for task in itertools.chain(self._ready, self._suspects):
            task.future.cancel()
        self._ready.clear()
        self._suspects.clear()
        executors = {id(b.executor): b.executor for b in self._in_flight.values()}
        for batch in self._in_flight.values():
            for task in batch.tasks:
                task.future.cancel()
        self._in_flight.clear()
        if self._executor is not None:
            executors[id(self._executor)] = self._executor
            self._executor = None
        processes = [p for ex in executors.values() for p in _processes(ex).values()]
        for process in processes:
            with contextlib.suppress(Exception):
                process.terminate()
        await asyncio.to_thread(self._reap, list(executors.values()), processes)

    def _reap(self, executors: list[ProcessPoolExecutor], processes: list[Any]) -> None:
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
        for thread in self._retired:
            thread.join(10)
        for process in processes:
            with contextlib.suppress(Exception):
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counters."""
        return PoolStatistics(
            workers=self._workers,
            tasks=self._tasks_done,
            batches=self._batches,
            crashes=self._crashes,
            timeouts=self._timeouts,
            recycles=self._recycles,
            queued=len(self._ready) + len(self._suspects),
            in_flight=sum(len(b.tasks) for b in self._in_flight.values()),
        )

    # -- running tasks -----------------------------------------------------------

    async def run(
        self,
        listener: str,
        xml: bytes,
        meta: Meta,
        history: list[tuple[Any, ...]] | None,
        timeout: float | None,
    ) -> list[tuple[str | None, bool, str, str, bytes]]:
        """Run one task; its responses as ``(to, is_response, qname, class_path, xml)``.

        Raises:
            MessageError: the handler failed (the subclass names how).
        """
        assert self._loop is not None
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        future: asyncio.Future[Result] = self._loop.create_future()
        self._ready.append(_Task((listener, xml, meta, history), future, listener, timeout))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)
        result = await future
        if result[0] == "ok":
            outs: list[tuple[str | None, bool, str, str, bytes]] = result[1]
            return outs
        _, code, kind, message, trace = result
        if code == "handler-error":
            detail = f"\n{trace}" if trace and logger.isEnabledFor(logging.DEBUG) else ""
            logger.warning("handler of %s raised %s: %s%s", listener, kind, message, detail)
            raise HandlerFailed(f"{listener} raised {kind}: {message}", listener=listener)
        raise _ERRORS.get(code, HandlerFailed)(message, listener=listener)

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
        while ready and len(self._in_flight) < self._window:
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
        self._since_recycle += len(tasks)
        try:
            future = executor.submit(worker.run_batch, batch.id, [t.record for t in tasks])
        except (BrokenProcessPool, RuntimeError):
            self._on_break(executor)
            return
        future.add_done_callback(lambda f: self._threadsafe(batch, f))

    def _threadsafe(self, batch: _Batch, future: ConcurrentFuture[_Answer]) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._on_done, batch, future)

    def _on_done(self, batch: _Batch, future: ConcurrentFuture[_Answer]) -> None:
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
                        ("error", "handler-error", type(error).__name__, str(error), "")
                    )
        else:
            seconds, results = future.result()
            mean = seconds / len(batch.tasks)
            self._task_s = mean if self._task_s == 0 else 0.8 * self._task_s + 0.2 * mean
            for task, result in zip(batch.tasks, results, strict=True):
                if not task.future.done():
                    task.future.set_result(result)
            self._tasks_done += len(batch.tasks)
        recycle = self._settings.recycle_after
        if (
            recycle is not None
            and batch.executor is self._executor
            and self._since_recycle >= recycle * self._workers
        ):
            self._recycles += 1
            logger.info("recycling the worker processes after %d tasks", self._since_recycle)
            self._retire(batch.executor)
            self._executor = self._new_executor()
        self._dispatch()

    def _running(self, batches: dict[int, _Batch]) -> set[tuple[int, int]]:
        """(batch id, task index) of what the workers are running now, by the status array."""
        status = self._status
        running = set()
        for slot in range(min(self._counter.value, self._slots)):
            base = slot * worker.SLOT_WIDTH
            batch_id = status[base + 1]
            if batch_id in batches:
                running.add((batch_id, status[base + 2]))
        return running

    def _on_break(self, executor: ProcessPoolExecutor) -> None:
        """The executor broke: answer the culprit, resubmit the rest, replace the executor."""
        batches = {i: b for i, b in self._in_flight.items() if b.executor is executor}
        running = self._running(batches)
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
                        f"{task.listener} did not finish within {task.timeout:g} s "
                        "(its worker process was killed)"
                    )
                    self._fail(task, HandlerTimeout(reason, listener=task.listener))
                    continue
                task.breaks += 1
                suspect = not killed and (key in running or batch.solo)
                if suspect:
                    task.crashes += 1
                if suspect and batch.solo and task.crashes >= max_crashes:
                    reason = (
                        f"the worker process running {task.listener} died "
                        f"({task.crashes} times with this message, the last time alone)"
                    )
                    self._fail(task, WorkerCrashed(reason, listener=task.listener))
                elif task.breaks > 10 * max_crashes + 10:
                    reason = (
                        f"the worker pool broke {task.breaks} times while {task.listener} "
                        "had this message; giving up"
                    )
                    self._fail(task, WorkerCrashed(reason, listener=task.listener))
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
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._dispatch)

    def _fail(self, task: _Task, exc: MessageError) -> None:
        task.future.set_result(("error", exc.code, type(exc).__name__, exc.reason, ""))

    # -- timeouts ----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._watch_period())
            self._check_timeouts()

    def _watch_period(self) -> float:
        timeouts = [t.timeout for b in self._in_flight.values() for t in b.tasks if t.timeout]
        return min(0.25, max(0.005, min(timeouts, default=1.0) / 10))

    def _check_timeouts(self) -> None:
        status = self._status
        now = time.monotonic_ns()
        for slot in range(min(self._counter.value, self._slots)):
            base = slot * worker.SLOT_WIDTH
            batch = self._in_flight.get(status[base + 1])
            if batch is None:
                continue
            index = status[base + 2]
            started = status[base + 3]
            if index >= len(batch.tasks):
                continue
            task = batch.tasks[index]
            if task.timeout is None or task.future.done():
                continue
            if now - started <= task.timeout * 1e9:
                continue
            if status[base + 1] != batch.id or status[base + 2] != index:
                continue  # it moved on meanwhile
            pid = status[base]
            if pid not in _processes(batch.executor):
                continue
            key = (batch.id, index)
            if key in self._timed_out:
                continue
            self._timed_out.add(key)
            self._timeouts += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
