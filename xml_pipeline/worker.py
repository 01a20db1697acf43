"""The worker process of ``cpu_bound`` listeners.

The pump's process pool starts each worker with :func:`initialize` and sends it
batches through :func:`run_batch`. Only plain records cross the process boundary;
no lxml objects and no pickled payload models:

- a **task** is ``(listener, payload_xml, meta, history)`` where ``meta`` is
  ``(thread_id, from_id, own_name, message_id, is_self_call, depth, from_external)``
  and ``history`` is None or a list of slot tuples (a snapshot of the frame's history);
- a **result** is ``("ok", [(to, is_response, qname, class_path, payload_xml), ...])``
  or ``("error", code, exception_type, message, short_traceback)``.

A worker imports each ``cpu_bound`` handler and builds its payload codecs once,
ignores SIGINT (the pump decides when workers stop), keeps one event loop for async
handlers, and, when a memory limit is set, caps its address space (RLIMIT_AS) so a
handler going past it gets a ``MemoryError`` instead of taking the machine down.

Each worker owns four integers of a shared array, ``[pid, batch, index, started_ns]``:
the pump reads them to know which message a worker is running when it must kill it
(a timeout) or when a worker dies.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from pydantic import BaseModel

from .backends.base import Backend, HistoryLimits, Slot
from .exceptions import InvalidReturn, MessageError
from .handler import HandlerMetadata, responses_of
from .parser import parse_trusted
from .payload import Codec, codec_for

__all__ = [
    "SLOT_WIDTH",
    "BackendSpec",
    "ListenerSpec",
    "Meta",
    "Result",
    "Task",
    "WorkerSpec",
    "class_path",
    "initialize",
    "ping",
    "run_batch",
]

SLOT_WIDTH = 4
"""Integers per worker in the status array: pid, batch id (0: idle), index, start (ns)."""

Meta = tuple[str, str, str, str, bool, int, bool]
Task = tuple[str, bytes, Meta, list[tuple[Any, ...]] | None]
Result = tuple[Any, ...]


class ListenerSpec(TypedDict):
    """How a worker finds one ``cpu_bound`` listener's code."""

    handler: str
    payloads: list[str]


class BackendSpec(TypedDict):
    """A shared backend a worker reads history from."""

    url: str
    limits: dict[str, Any]
    options: dict[str, Any]


class WorkerSpec(TypedDict):
    """Everything a worker needs, as plain data."""

    paths: list[str]
    listeners: dict[str, ListenerSpec]
    backend: BackendSpec | None
    memory_limit_mb: int | None


def class_path(obj: Any) -> str:
    """``module:qualname`` of a class or function (how a worker imports it)."""
    return f"{obj.__module__}:{obj.__qualname__}"


@dataclass
class _Entry:
    handler: Callable[..., Any] | None = None
    codecs: dict[str, Codec] = field(default_factory=dict)
    error: str | None = None


@dataclass
class _State:
    entries: dict[str, _Entry]
    loop: asyncio.AbstractEventLoop
    status: Any
    base: int
    backend_spec: BackendSpec | None
    backend: Backend | None = None
    paths: dict[type[BaseModel], str] = field(default_factory=dict)


_state: _State | None = None


def _load(spec: ListenerSpec) -> _Entry:
    from .config import import_object

    entry = _Entry()
    try:
        entry.handler = import_object(spec["handler"])
        for path in spec["payloads"]:
            cls = import_object(path)
            codec = codec_for(cls)
            entry.codecs[codec.qname] = codec
    except Exception as exc:  # reported by ping() and by every task of this listener
        entry.error = f"cannot import {spec['handler']!r}: {type(exc).__name__}: {exc}"
    return entry


def initialize(spec: WorkerSpec, status: Any, counter: Any) -> None:
    """Process initializer: import handlers and codecs once, claim a status slot."""
    global _state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for path in reversed(spec["paths"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    entries = {name: _load(listener) for name, listener in spec["listeners"].items()}
    with counter.get_lock():
        slot = counter.value % (len(status) // SLOT_WIDTH)
        counter.value += 1
    base = slot * SLOT_WIDTH
    status[base + 1] = 0
    status[base] = os.getpid()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _state = _State(entries, loop, status, base, spec["backend"])
    limit = spec["memory_limit_mb"]
    if limit is not None:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit * 1024 * 1024, hard))


def ping() -> tuple[int, dict[str, str]]:
    """The worker's pid and the listeners whose code it could not import."""
    state = _require_state()
    return os.getpid(), {n: e.error for n, e in state.entries.items() if e.error is not None}


def run_batch(batch_id: int, tasks: Sequence[Task]) -> tuple[float, list[Result]]:
    """Run each task in order: the seconds it took, and one result per task (never raises)."""
    state = _require_state()
    status = state.status
    base = state.base
    results: list[Result] = []
    began = time.perf_counter()
    try:
        for index, task in enumerate(tasks):
            status[base + 3] = time.monotonic_ns()
            status[base + 2] = index
            status[base + 1] = batch_id
            results.append(_run(state, task))
    finally:
        status[base + 1] = 0
    return time.perf_counter() - began, results


def _require_state() -> _State:
    if _state is None:
        raise RuntimeError("xml_pipeline.worker.initialize() has not run in this process")
    return _state


def _error(code: str, exc: BaseException, *, trace: bool = False) -> Result:
    text = ""
    if trace:
        text = "".join(traceback.format_exception(exc, limit=-4))[-2000:]
    message = exc.reason if isinstance(exc, MessageError) else str(exc)
    return ("error", code, type(exc).__name__, message, text)


def _run(state: _State, task: Task) -> Result:
    name, xml, meta, history = task
    entry = state.entries.get(name)
    if entry is None or entry.handler is None:
        reason = entry.error if entry is not None else f"no cpu_bound listener {name!r}"
        return ("error", "handler-error", "ImportError", reason or "not loaded", "")
    try:
        element = parse_trusted(xml)
        codec = entry.codecs.get(element.tag)
        if codec is None:
            expected = ", ".join(sorted(entry.codecs))
            return ("error", "validation", "PayloadInvalid",
                    f"{name} accepts {expected}, not {element.tag}", "")  # fmt: skip
        model = codec.decode(element)
    except MessageError as exc:
        return _error(exc.code, exc)
    except Exception as exc:  # a validator that raised something else: this message only
        return _error("handler-error", exc, trace=True)
    hist, blocking = _history_access(state, name, meta[0], history)
    info = HandlerMetadata(*meta, hist, None, blocking)
    try:
        result = entry.handler(model, info)
        if inspect.iscoroutine(result):
            result = state.loop.run_until_complete(result)
        responses = responses_of(name, result)
    except InvalidReturn as exc:
        return _error(exc.code, exc)
    except BaseException as exc:  # SystemExit and the like too: one message fails, not a batch
        return _error("handler-error", exc, trace=True)
    outs = []
    try:
        for response in responses:
            cls = type(response.payload)
            path = state.paths.get(cls)
            if path is None:
                path = state.paths[cls] = class_path(cls)
            out_codec = codec_for(cls)
            data = out_codec.encode_bytes(response.payload)
            outs.append((response.to, response.is_response, out_codec.qname, path, data))
    except ValueError as exc:
        failure = InvalidReturn(f"{name} returned a payload XML cannot carry: {exc}")
        return _error(failure.code, failure)
    except Exception as exc:  # MemoryError, a serializer's own error: this message only
        return _error("handler-error", exc, trace=True)
    return ("ok", outs)


def _history_access(
    state: _State, name: str, thread_id: str, history: list[tuple[Any, ...]] | None
) -> tuple[Callable[[], Coroutine[Any, Any, list[Slot]]], Callable[[], list[Slot]]]:
    if history is not None:
        slots = [Slot(*item) for item in history]

        async def snapshot() -> list[Slot]:
            return list(slots)

        return snapshot, lambda: list(slots)
    spec = state.backend_spec
    if spec is None:
        reason = (
            f"{name} is cpu_bound on the in-memory backend: set history_snapshot: true "
            "on the listener to read the frame's history in the worker"
        )

        async def unavailable() -> list[Slot]:
            raise RuntimeError(reason)

        def unavailable_blocking() -> list[Slot]:
            raise RuntimeError(reason)

        return unavailable, unavailable_blocking

    async def shared() -> list[Slot]:
        backend = state.backend
        if backend is None:
            from .backends import open_backend

            assert spec is not None
            backend = open_backend(spec["url"], HistoryLimits(**spec["limits"]), **spec["options"])
            state.backend = backend
        return await backend.buffer_get_thread(thread_id)

    def shared_blocking() -> list[Slot]:
        if state.loop.is_running():
            raise RuntimeError("history_blocking() would block the event loop; await history()")
        return state.loop.run_until_complete(shared())

    return shared, shared_blocking
