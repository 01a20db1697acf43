"""Catching what blocks the pump's event loop. Private to the engine (:mod:`xml_pipeline.pump`).

An ``async def`` handler runs on the event loop's thread: while one of its steps (the
code between two awaits) runs, nothing else does, in no listener. A blocking call there
(``time.sleep``, a synchronous client, a long computation) stalls every listener, and no
timer fires meanwhile: the handler's own ``timeout_s`` cannot interrupt it, so it may
answer after its deadline (the pump makes that answer a timeout, see ``StreamPump._call``).

Two measures, both owned by the pump, neither changing process-wide state (no
``loop.set_debug()``, no ``slow_callback_duration``) nor reading private interpreter
state:

- Each step of an inline handler is timed, so the listener to blame is known exactly,
  the moment its step ends. The pump runs the handler coroutine's first step itself
  (:meth:`BlockWatch.first_step`: ``coro.send(None)`` between two ``perf_counter()``
  reads), which is the whole run of the common handler that never suspends; one that
  suspends is awaited through :class:`Steps`, which times each later step the same way.
  Measured: ~0.45 µs per handler call in ``StreamPump._call`` alone, ~0.6 µs more per
  later step (a suspension costs a few µs anyway); ~1 µs per hop, ~4 % of the hops/s,
  in a saturated relay of trivial handlers (catching the StopIteration of the first
  step is most of it). Blaming instead whichever handler was in flight when the monitor
  saw lag would be cheaper still, but wrong as soon as two handlers are suspended at
  once, and the one that blocked may be gone by the time the monitor runs.
- :meth:`BlockWatch.monitor`, a task of the pump's task group, wakes every ``interval``
  and measures how late its timer fired. Lateness of ``limit`` or more that no handler
  step accounts for is reported as a block outside the handlers (a task a handler
  started, an egress callback, the application's own code). Its lateness is a lower
  bound of the block (short by up to ``interval``).

Each kind is reported once at WARNING (per listener; once for the rest), later ones at
DEBUG; every one is counted for ``statistics()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from time import perf_counter
from typing import Any

from ._delivery import Runtime
from .config import Listener

__all__ = ["BlockWatch", "Steps"]

logger = logging.getLogger(__name__)

_INTERVAL_S = 0.1  # the monitor's period, or half the limit when that is shorter
_MIN_INTERVAL_S = 0.01
_SENT = object()  # Steps: the first step's signal was handed over

_ADVICE = (
    "blocking code belongs in a sync handler (a plain def: it runs in a thread) or a "
    "cpu_bound one (it runs in a worker process)"
)


def handler_name(listener: Listener) -> str:
    """``module:qualname`` of a listener's handler (of its class, for a callable object)."""
    if listener.handler_path:
        return listener.handler_path
    handler = listener.handler
    named = handler if hasattr(handler, "__qualname__") else type(handler)
    return f"{getattr(named, '__module__', '?')}:{getattr(named, '__qualname__', '?')}"


class BlockWatch:
    """Times inline handler steps and watches the loop's lateness against ``limit`` (s)."""

    __slots__ = ("_warned_outside", "count", "interval", "limit", "ticks")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.interval = max(_MIN_INTERVAL_S, min(_INTERVAL_S, limit / 2))
        self.count = 0  # blocks seen, by a handler or not (statistics' blocked_loop)
        self.ticks = 0  # times the monitor woke up
        self._warned_outside = False

    def first_step(self, rt: Runtime, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a handler coroutine's first step, timed.

        Returns:
            The handler's result if it finished in that step, else a :class:`Steps`
            that awaits the rest of it.
        """
        start = perf_counter()
        try:
            signal = coro.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            took = perf_counter() - start
            if took >= self.limit:
                self.blocked_by(rt, took)
        return Steps(coro, signal, rt, self)

    def blocked_by(self, rt: Runtime, took: float) -> None:
        """A step of ``rt``'s handler held the loop for ``took`` seconds."""
        self.count += 1
        rt.blocked += 1
        rt.blocked_max = max(rt.blocked_max, took)
        first = rt.blocked == 1
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "listener %r (handler %s) blocked the event loop for %.3f s, and every other "
            "listener waited meanwhile: %s%s",
            rt.name, handler_name(rt.listener), took, _ADVICE,
            " (reported once per listener; statistics() counts them)" if first else "",
        )  # fmt: skip

    async def monitor(self) -> None:
        """Measure the loop's lateness every ``interval``, until cancelled; report a
        block that no handler step accounts for."""
        loop = asyncio.get_running_loop()
        interval = self.interval
        while True:
            seen = self.count
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.ticks += 1
            late = loop.time() - due
            if late >= self.limit and self.count == seen:
                self._blocked_outside(late)

    def _blocked_outside(self, late: float) -> None:
        self.count += 1
        first = not self._warned_outside
        self._warned_outside = True
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "something blocked the event loop for at least %.3f s outside the listeners' "
            "handlers (a task a handler started, an egress callback, the application's "
            "own code), and every listener waited meanwhile: %s%s",
            late, _ADVICE,
            " (reported once; statistics().blocked_loop counts them)" if first else "",
        )  # fmt: skip


class Steps(Generator[Any, Any, Any]):
    """The rest of an inline handler's coroutine, each step timed.

    Awaiting it hands the first step's signal (what the handler waits for) to the task,
    then passes each resumption on to the coroutine: values with ``send``, exceptions
    (a cancellation, a timeout) with ``throw``.
    """

    __slots__ = ("_coro", "_rt", "_signal", "_watch")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], signal: Any, rt: Runtime, watch: BlockWatch
    ) -> None:
        self._coro = coro
        self._signal = signal
        self._rt = rt
        self._watch = watch

    def __await__(self) -> Generator[Any, Any, Any]:
        return self

    def __next__(self) -> Any:
        signal = self._signal
        if signal is not _SENT:
            self._signal = _SENT
            return signal
        return self.send(None)

    def send(self, value: Any) -> Any:
        start = perf_counter()
        try:
            return self._coro.send(value)
        finally:
            took = perf_counter() - start
            if took >= self._watch.limit:
                self._watch.blocked_by(self._rt, took)

    def throw(self, *args: Any) -> Any:
        start = perf_counter()
        try:
            return self._coro.throw(*args)
        finally:
            took = perf_counter() - start
            if took >= self._watch.limit:
                self._watch.blocked_by(self._rt, took)

    def close(self) -> None:
        self._coro.close()
