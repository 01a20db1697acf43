"""The worker process of ``cpu_bound`` listeners.

The pump's process pool starts each worker with :func:`initialize` and sends it
batches through :func:`run_batch`. Only small named records of plain values
(``typing.NamedTuple``: they pickle as tuples do, with the class named once per batch)
cross the process boundary; no lxml objects and no payload models:

- a :class:`Task`: the listener's name, the payload's XML, its :class:`Meta` (the plain
  fields of :class:`~xml_pipeline.HandlerMetadata`) and, with ``history_snapshot``, the
  frame's history as :class:`~xml_pipeline.backends.Slot` records;
- one result per task: a list of :class:`Output` (each response, its XML encoded in the
  worker), or a :class:`Failure` (an error code and what the handler raised);
- per batch, an :class:`Answer`: the seconds the batch took and its results.

A worker imports each ``cpu_bound`` handler and builds its payload codecs once,
keeps one event loop for async handlers, and, when a memory limit is set, caps its
address space (RLIMIT_AS) so a handler going past it gets a ``MemoryError`` instead of
taking the machine down.

Lifecycle: a worker ignores SIGINT and SIGTERM, so that a signal sent to the whole
process group (Ctrl-C, ``kill -- -PGID``, systemd stopping a unit) reaches the pump,
which drains and then stops its workers itself. A worker never outlives its pump: it
exits as soon as the pump's process is gone (``kill -9`` included), by two means that
cost nothing per task. On Linux, ``PR_SET_PDEATHSIG`` has the kernel SIGKILL it when
its parent dies (the pump with ``spawn``; with ``forkserver``, the fork server, which
exits once the pump and its workers are gone). Everywhere, a thread blocked on the
pump's sentinel (``multiprocessing.parent_process().sentinel``, a pipe whose write end
only the pump holds) ends the process when that pipe reaches EOF.

When multiprocessing's fork server imports this module (the pool adds it to the fork
server's preload list), it makes the fork server ignore SIGTERM as well: the workers'
result pipes run through it, and its death would break the pool. Its children get
SIGTERM's default back, so processes that other code starts through the same fork
server are unaffected.

Each worker owns one :class:`WorkerStatus` of a shared array, and writes its fields:
the pump reads them to know which message a worker is running when it must kill it
(a timeout) or when a worker dies, which processes are its workers, and how much CPU
they used. A :class:`Control` record, shared too, numbers the slots workers claim.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict

from pydantic import BaseModel

from ._tracing import worker_context, worker_detach
from .backends import open_backend
from .backends.base import Backend, HistoryLimits, Slot
from .config import import_object
from .exceptions import InvalidReturn, MessageError
from .handler import HandlerMetadata, responses_of
from .parser import parse_trusted
from .payload import Codec, codec_for

__all__ = [
    "Answer",
    "BackendSpec",
    "Control",
    "Failure",
    "ListenerSpec",
    "Meta",
    "Output",
    "Ping",
    "Result",
    "Task",
    "WorkerSpec",
    "WorkerStatus",
    "class_path",
    "initialize",
    "ping",
    "process_birth",
    "run_batch",
]


class WorkerStatus(ctypes.Structure):
    """A worker's slot in the pool's status array: written by the worker, read by the pump.

    Attributes:
        pid: the worker's pid (0: the slot was never claimed).
        batch: the batch it runs (0: idle).
        index: the task of that batch it runs.
        started_ns: when it started that task (``time.monotonic_ns``).
        cpu_ns: its CPU time so far (``time.process_time_ns``), after each batch.
        generation: the executor it belongs to (the pool numbers them).
        birth: its start time (:func:`process_birth`): a pid reused by another process
            has another.
    """

    _fields_ = [
        ("pid", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("index", ctypes.c_int64),
        ("started_ns", ctypes.c_int64),
        ("cpu_ns", ctypes.c_int64),
        ("generation", ctypes.c_int64),
        ("birth", ctypes.c_int64),
    ]
    pid: int
    batch: int
    index: int
    started_ns: int
    cpu_ns: int
    generation: int
    birth: int


class Control(ctypes.Structure):
    """What a pool shares with all its workers (read and written under its lock).

    Attributes:
        claimed: status slots claimed so far (a worker takes the next, modulo the slots).
        retired_cpu_ns: CPU of the workers whose slot a newer one claimed again.
        closing: 1 once the pool closes: a worker starting then exits at once.
    """

    _fields_ = [
        ("claimed", ctypes.c_int64),
        ("retired_cpu_ns", ctypes.c_int64),
        ("closing", ctypes.c_int64),
    ]
    claimed: int
    retired_cpu_ns: int
    closing: int


# The records below cross the process boundary. NamedTuple, not a frozen slotted
# dataclass: measured per task (Task with its Meta out, one Output back), pickling both
# ways costs 3.6 us as NamedTuples, 2.6 us with the reducer registered below, 11.6 us
# as dataclasses (their __getstate__/__setstate__ run in Python), 0.6 us as bare
# tuples; building one costs 0.3 us, a dataclass 0.8 us.


class Meta(NamedTuple):
    """What a handler learns about its message: ``HandlerMetadata``'s plain fields."""

    thread_id: str
    from_id: str
    own_name: str
    message_id: str
    is_self_call: bool
    depth: int
    from_external: bool


class Task(NamedTuple):
    """One message for a ``cpu_bound`` listener, as the pump sends it to a worker."""

    listener: str
    xml: bytes  # the payload element
    meta: Meta
    history: list[Slot] | None  # the frame's history (history_snapshot), or None
    # The W3C traceparent of the pump's span around this task, when the pump traces:
    # the handler runs under it, so the spans it makes (with the worker's own tracer
    # provider, if the process has one) are children of that span, in the same trace.
    trace: str | None = None


class Output(NamedTuple):
    """One response of a handler, encoded in the worker."""

    to: str | None
    is_response: bool  # respond (to the caller), not forward
    qname: str  # the payload's routing key {namespace}local
    class_path: str  # module:qualname of its payload class
    xml: bytes


class Failure(NamedTuple):
    """A task that failed in the worker."""

    code: str  # a MessageError code: "handler-error", "validation", "invalid-return"...
    kind: str  # the exception's type name
    message: str
    traceback: str  # the last frames, for a handler's own exception; else ""


Result = list[Output] | Failure
"""A task's result: its handler's responses, or why it failed."""


class Answer(NamedTuple):
    """What :func:`run_batch` returns: one result per task, in order."""

    seconds: float  # how long the batch ran in the worker
    results: list[Result]


class Ping(NamedTuple):
    """What :func:`ping` returns."""

    pid: int
    errors: dict[str, str]  # listener name -> why its code did not import


_tuple_new = tuple.__new__


def _reduce_record(record: tuple[Any, ...]) -> tuple[Any, ...]:
    # Rebuilt by one C call (tuple.__new__), not by the class's generated __new__, and
    # found in multiprocessing's dispatch table before the __reduce_ex__ protocol.
    return _tuple_new, (type(record), tuple(record))


for _record in (Meta, Task, Output, Failure, Answer, Ping):
    # What the executor pickles with, both ways (plain pickle keeps NamedTuple's own).
    multiprocessing.reduction.register(_record, _reduce_record)


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

    module: str  # this module's file in the pump: a worker must run the same code
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
    status: WorkerStatus  # this worker's slot
    backend_spec: BackendSpec | None
    backend: Backend | None = None
    paths: dict[type[BaseModel], str] = field(default_factory=dict)


_state: _State | None = None


def _load(spec: ListenerSpec) -> _Entry:
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


def initialize(spec: WorkerSpec, status: Any, control: Any, generation: int) -> None:
    """Process initializer: claim a status slot, import handlers and codecs once.

    Args:
        spec: what to import.
        status: the pool's status array (shared :class:`WorkerStatus` records).
        control: the pool's :class:`Control` record (shared, with a lock).
        generation: the number of the executor this worker belongs to.
    """
    global _state
    # The pump decides when workers stop: a signal sent to the whole process group
    # must not kill a worker in the middle of a message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_pump()
    shared: Control = control.get_obj()  # used under the lock below, never through it
    lock = control.get_lock()
    # With a timeout: a worker killed while holding the lock must not keep every later
    # one from starting (a claim without the lock risks no more than a shared slot).
    locked = lock.acquire(timeout=_CLAIM_LOCK_S)
    try:
        closing = shared.closing
        if not closing:
            mine: WorkerStatus = status[shared.claimed % len(status)]  # a view, not a copy
            shared.claimed += 1
            shared.retired_cpu_ns += mine.cpu_ns
            mine.cpu_ns = 0
    finally:
        if locked:
            lock.release()
    if closing:
        os._exit(0)  # the pool is closing: nothing will be sent to this worker
    mine.batch = 0
    mine.generation = generation
    mine.birth = process_birth(os.getpid()) or 0
    mine.pid = os.getpid()  # last: the pool looks at slots with a pid
    # Appended, not put first: an organism's folder must not shadow installed packages.
    for path in spec["paths"]:
        if path not in sys.path:
            sys.path.append(path)
    entries = {name: _load(listener) for name, listener in spec["listeners"].items()}
    if os.path.realpath(__file__) != os.path.realpath(spec["module"]):
        # The fork server preloads this module by its own sys.path, which may find
        # another copy of xml_pipeline than the pump runs.
        error = (
            f"the worker processes run {__file__}, but the pump runs {spec['module']}: "
            "install xml_pipeline where both find it, or use start_method: spawn"
        )
        entries = {name: _Entry(error=error) for name in entries}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _state = _State(entries, loop, mine, spec["backend"])
    limit = spec["memory_limit_mb"]
    if limit is not None:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit * 1024 * 1024, hard))


_CLAIM_LOCK_S = 2.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIFELINE_STACK = 256 * 1024  # the lifeline thread only waits: a small stack (RLIMIT_AS)


def _die_with_pump() -> None:
    """Make sure this worker ends when the pump's process ends, even by ``kill -9``."""
    pump = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        import ctypes

        # The kernel SIGKILLs this process when the thread that forked it exits: with
        # spawn, the pump's thread that submitted to the executor (its event loop's);
        # with forkserver, the fork server's only thread.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass
    if pump is None:
        return
    # The sentinel is a pipe whose write end only the pump holds: EOF means the pump is
    # gone. A thread waiting on it costs nothing per task; it also covers what the
    # parent-death signal cannot (no prctl; with forkserver, a pump that dies while the
    # fork server lives on because this worker holds it open).
    sentinel = pump.sentinel

    def lifeline() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)

    previous = threading.stack_size(_LIFELINE_STACK)
    try:
        threading.Thread(target=lifeline, name="xml_pipeline lifeline", daemon=True).start()
    finally:
        threading.stack_size(previous)
    # The pump died before the parent-death signal was set: nothing would kill us.
    if not pump.is_alive():
        os._exit(1)


def process_birth(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``).

    Tells a live worker from another process that got its pid after it died.

    Returns:
        the start time; None if no such process is alive (a zombie is not); 0 where
        ``/proc`` is missing (then only whether the pid exists is known).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError):
        return None
    else:
        # fields[0] is field 3 of stat(5), the state; field 22 is the start time.
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def ping() -> Ping:
    """The worker's pid and the listeners whose code it could not import."""
    state = _require_state()
    state.status.cpu_ns = time.process_time_ns()
    errors = {n: e.error for n, e in state.entries.items() if e.error is not None}
    return Ping(os.getpid(), errors)


def run_batch(batch_id: int, tasks: Sequence[Task]) -> Answer:
    """Run each task in order: the seconds it took, and one result per task (never raises)."""
    state = _require_state()
    status = state.status
    results: list[Result] = []
    began = time.perf_counter()
    try:
        for index, task in enumerate(tasks):
            status.started_ns = time.monotonic_ns()
            status.index = index
            status.batch = batch_id
            results.append(_run(state, task))
    finally:
        status.batch = 0
        # Once per batch (one clock read), so the pool can report its workers' CPU.
        status.cpu_ns = time.process_time_ns()
    return Answer(time.perf_counter() - began, results)


def _require_state() -> _State:
    if _state is None:
        raise RuntimeError("xml_pipeline.worker.initialize() has not run in this process")
    return _state


def _error(code: str, exc: BaseException, *, trace: bool = False) -> Failure:
    text = ""
    if trace:
        text = "".join(traceback.format_exception(exc, limit=-4))[-2000:]
    message = exc.reason if isinstance(exc, MessageError) else str(exc)
    return Failure(code, type(exc).__name__, message, text)


def _run(state: _State, task: Task) -> Result:
    name = task.listener
    meta = task.meta
    entry = state.entries.get(name)
    if entry is None or entry.handler is None:
        reason = entry.error if entry is not None else f"no cpu_bound listener {name!r}"
        return Failure("handler-error", "ImportError", reason or "not loaded", "")
    try:
        element = parse_trusted(task.xml)
        codec = entry.codecs.get(element.tag)
        if codec is None:
            expected = ", ".join(sorted(entry.codecs))
            reason = f"{name} accepts {expected}, not {element.tag}"
            return Failure("validation", "PayloadInvalid", reason, "")
        model = codec.decode(element)
    except MessageError as exc:
        return _error(exc.code, exc)
    except Exception as exc:  # a validator that raised something else: this message only
        return _error("handler-error", exc, trace=True)
    hist, blocking = _history_access(state, name, meta.thread_id, task.history)
    info = HandlerMetadata(*meta, hist, None, blocking)
    token = None if task.trace is None else worker_context(task.trace)
    try:
        result = entry.handler(model, info)
        if inspect.iscoroutine(result):
            # (run_until_complete copies this context into the handler's task)
            result = state.loop.run_until_complete(result)
        responses = responses_of(name, result)
    except InvalidReturn as exc:
        return _error(exc.code, exc)
    except BaseException as exc:  # SystemExit and the like too: one message fails, not a batch
        return _error("handler-error", exc, trace=True)
    finally:
        if token is not None:
            worker_detach(token)
    outs: list[Output] = []
    try:
        for response in responses:
            cls = type(response.payload)
            path = state.paths.get(cls)
            if path is None:
                path = state.paths[cls] = class_path(cls)
            out_codec = codec_for(cls)
            data = out_codec.encode_bytes(response.payload)
            outs.append(Output(response.to, response.is_response, out_codec.qname, path, data))
    except ValueError as exc:
        failure = InvalidReturn(f"{name} returned a payload XML cannot carry: {exc}")
        return _error(failure.code, failure)
    except Exception as exc:  # MemoryError, a serializer's own error: this message only
        return _error("handler-error", exc, trace=True)
    return outs


def _history_access(
    state: _State, name: str, thread_id: str, slots: list[Slot] | None
) -> tuple[Callable[[], Coroutine[Any, Any, list[Slot]]], Callable[[], list[Slot]]]:
    if slots is not None:

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
            assert spec is not None
            backend = open_backend(spec["url"], HistoryLimits(**spec["limits"]), **spec["options"])
            state.backend = backend
        return await backend.buffer_get_thread(thread_id)

    def shared_blocking() -> list[Slot]:
        if state.loop.is_running():
            raise RuntimeError("history_blocking() would block the event loop; await history()")
        return state.loop.run_until_complete(shared())

    return shared, shared_blocking


def _in_fork_server() -> bool:
    # How multiprocessing.forkserver starts its server (the command is the same since
    # Python 3.4); the server imports the modules of its preload list before serving.
    argv = sys.orig_argv
    return (
        len(argv) >= 2
        and argv[-2] == "-c"
        and argv[-1].startswith("from multiprocessing.forkserver import main")
    )


def _guard_fork_server() -> None:
    """Make the fork server ignore SIGTERM, as it already ignores SIGINT.

    Workers' results reach the pump through pipes their fork server holds: a fork
    server killed by a SIGTERM sent to the whole process group breaks the pool, although
    every worker is alive. It still exits by itself once the pump and its workers are
    gone (EOF on its "alive" pipe). Its children get the previous disposition back.
    """
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, previous))


if _in_fork_server():
    _guard_fork_server()
