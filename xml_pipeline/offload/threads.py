"""Daemon worker threads for sync handlers, one small pool per listener.

Unlike ``ThreadPoolExecutor``, the threads are daemons: a handler stuck past its
timeout neither blocks the interpreter's exit nor starves other listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SyncRunner"]

logger = logging.getLogger(__name__)

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class SyncRunner:
    """Runs callables in at most ``size`` daemon threads, started on demand.

    With ``carry_context``, each callable runs in a copy of the submitter's context
    variables (as ``asyncio.to_thread`` does): the pump's log context reaches sync
    handlers. Off by default, as copying costs on every call.
    """

    def __init__(self, name: str, size: int, *, carry_context: bool = False) -> None:
        self._name = name
        self._size = size
        self._carry_context = carry_context
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._busy = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a thread; the future resolves on the calling loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._carry_context:
            fn, args = contextvars.copy_context().run, (fn, *args)
        with self._lock:
            spawn = self._idle == 0 and self._threads < self._size
            if spawn:
                self._threads += 1
        self._jobs.put((loop, future, fn, args))
        if spawn:
            thread = threading.Thread(
                target=self._work, name=f"xml_pipeline {self._name}", daemon=True
            )
            thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._threads -= 1
                    return
                self._busy += 1
            loop, future, fn, args = job
            if future.done():  # cancelled (timed out) while it waited for a thread
                with self._lock:
                    self._busy -= 1
                continue
            try:
                ok, value = True, fn(*args)
            except (StopIteration, StopAsyncIteration) as exc:
                # A future cannot hold these (set_exception refuses StopIteration):
                # the awaiting coroutine would wait forever.
                error = RuntimeError(f"{type(exc).__name__} raised: {exc}")
                error.__cause__ = exc
                ok, value = False, error
            except BaseException as exc:  # handed to the awaiting coroutine
                ok, value = False, exc
            finally:
                with self._lock:
                    self._busy -= 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future, ok, value)

    def shutdown(self) -> None:
        """Let idle threads exit. Threads still running a handler finish it first."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)
