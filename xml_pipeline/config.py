"""Organism configuration: strict YAML models and their resolution into an Organism.

:func:`load_organism` reads one YAML file, validates it against frozen pydantic
models (unknown keys are errors), imports every handler and payload class (the
YAML file's folder is appended to ``sys.path``) and returns an :class:`Organism`.
Every problem becomes one line of the :class:`ConfigError` naming the file, the key
and, where known, the line; all of them are reported at once.

Each default is written once. The pydantic models of the file hold them, and the
resolved records (:class:`PumpSettings`, :class:`ProcessPoolSettings`,
:class:`Listener`, :class:`BootMessage`, :class:`Organism`) take theirs from the
models; the two records that lower layers own and use without a file
(:class:`~xml_pipeline.backends.HistoryLimits`, :class:`~xml_pipeline.ParseLimits`)
are the other way round: the models take their defaults from them. The options of
each backend scheme (the ``manager:`` and ``redis:`` sections) are the models of
:mod:`xml_pipeline.backends.scheme`.

The models are also the only place a key is documented: its ``description``, with its
default and bounds, makes the key tables of ``docs/organisms.md`` (rewritten by
``scripts/gen_reference``, checked by a test) and the JSON Schema that
``python -m xml_pipeline schema --organism`` prints for editors.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from .backends.base import HistoryLimits
from .backends.scheme import ManagerOptions, RedisOptions, backend_scheme
from .exceptions import BackendUnavailable, ConfigError
from .handler import Handler
from .parser import ParseLimits
from .payload import Huh, codec_for

__all__ = [
    "BootMessage",
    "Listener",
    "Organism",
    "OrganismConfig",
    "ProcessPoolSettings",
    "PumpSettings",
    "import_object",
    "load_organism",
    "organism_json_schema",
]


logger = logging.getLogger(__name__)


# -- the YAML schema ---------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OrganismSection(_Strict):
    name: str = Field(min_length=1, description="the organism's name, shown by `check`")
    description: str = Field("", description="free text")


_HISTORY = HistoryLimits()  # the backends' own defaults
_PARSE = ParseLimits()  # the parser's own defaults


class _HistorySection(_Strict):
    max_slots_per_thread: int = Field(
        _HISTORY.max_slots_per_thread,
        ge=1,
        description="slots kept per frame; the oldest are trimmed",
    )
    max_threads: int = Field(
        _HISTORY.max_threads,
        ge=1,
        description="frames kept; past it the least recently written are evicted, up to "
        "1% of it at a time (`redis://` enforces it by `ttl_s` only)",
    )
    ttl_s: float = Field(
        _HISTORY.ttl_s,
        gt=0,
        description="`redis://` only: a frame's keys expire about this long after its last "
        "write; `memory://` and `manager://` ignore it",
    )
    max_dead_letters: int = Field(
        _HISTORY.max_dead_letters,
        ge=1,
        description="dead letters kept; the oldest are dropped",
    )
    dead_letter_budget_bytes: int = Field(
        _HISTORY.dead_letter_budget_bytes,
        ge=0,
        description="once the kept dead letters hold this many bytes, a rejection of "
        "outside input keeps only its first 256 bytes and is counted per code (see "
        "[failure modes](failures.md#dead-letters))",
    )
    dead_letter_ttl_s: float = Field(
        _HISTORY.dead_letter_ttl_s,
        ge=0,
        description="a dead letter is dropped this long after it was written; 0: never",
    )


class _PumpSection(_Strict):
    queue_size: int = Field(
        1024,
        ge=1,
        description="ingress waits while this many messages are inside the pump (see "
        "[design](design.md#admission-control))",
    )
    max_depth: int = Field(
        32,
        ge=1,
        description="deepest frame a forward may create; deeper is `Huh(depth-exceeded)`",
    )
    drain_timeout_s: float = Field(
        10.0,
        ge=0,
        description="on SIGINT/SIGTERM, how long to wait for messages inside the pump",
    )
    max_message_bytes: int = Field(
        _PARSE.max_bytes,
        ge=64,
        description="size limit of one message from outside (also of one `--input` line)",
    )
    max_xml_depth: int = Field(
        _PARSE.max_depth,
        ge=3,
        description="element nesting limit of one message from outside; the root element "
        "(`<message>` for an envelope) is depth 1",
    )
    max_elements: int = Field(
        _PARSE.max_elements,
        ge=2,
        description="element count limit of one message from outside, envelope included",
    )
    max_attributes: int = Field(
        _PARSE.max_attributes,
        ge=0,
        description="attribute count limit of one message from outside (`0`: no attributes "
        "at all; namespace declarations are not attributes)",
    )
    sync_threads: int = Field(
        32,
        ge=1,
        description="thread limit of sync listeners: each runs its handler in daemon threads "
        "of its own, at most its `concurrency` or this, whichever is smaller (see "
        "[handlers](handlers.md#async-and-sync))",
    )
    gc_threshold: int | None = Field(
        10_000,
        ge=100,
        description="the garbage collector's generation-0 threshold, raised to this value "
        "(if it is lower) by applications that opt in, for as long as they run the pump: the "
        "command line's `run` and `bench` do, restoring it when they stop; `StreamPump` "
        "itself changes no process-wide state and ignores this key. Null leaves it alone "
        "(see [design](design.md#garbage-collector))",
    )
    max_in_pump: int = Field(
        100_000,
        ge=1,
        description="a handler's forward, or respond to a listener, that would bring the "
        "messages inside the pump above this is refused with `Huh(overloaded)`; a value "
        "below `queue_size` is raised to `queue_size`",
    )
    blocked_loop_s: float | None = Field(
        0.25,
        ge=0,
        description="an `async def` handler step (the code between two awaits) that holds "
        "the event loop this long or longer is reported: one WARNING per listener naming "
        "it, counted in `statistics()`; a monitor task also reports the loop blocked this "
        "long by anything else. `0` or null: not watched (see "
        "[handlers](handlers.md#blocking-the-event-loop))",
    )


class _ListenerSection(_Strict):
    name: str = Field(
        min_length=1,
        max_length=256,
        description="unique; printable, no leading or trailing spaces; dots allowed",
    )
    payload: str | list[str] = Field(
        description="the payload class(es) accepted, each `module:attr`"
    )
    handler: str = Field(min_length=1, description="the handler, `module:attr`")
    description: str = Field("", description="free text, shown by `check`")
    peers: list[str] | None = Field(
        None,
        description="listeners this one may forward to; null means any, `[]` means none",
    )
    concurrency: int = Field(
        16,
        ge=1,
        le=100_000,
        description="messages handled at once (on different frames, unless `ordered` is "
        "false); a sync listener also gets up to this many threads, at most "
        "`pump.sync_threads`; a `cpu_bound` listener has at most this many messages in the "
        "worker processes",
    )
    ordered: bool = Field(
        True,
        description="the messages of one frame reach the listener one at a time, in order; "
        "`false`: they may run at once, up to `concurrency` (so that a handler's fan-out to "
        "this listener runs in parallel; see [handlers](handlers.md#concurrency-and-ordering))",
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="time limit per message; past it, `Huh(timeout)` (a `cpu_bound` "
        "handler's worker process is killed)",
    )
    cpu_bound: bool = Field(
        False,
        description="run the handler in the worker processes of `process_pool` (see "
        "[cpu_bound](cpu_bound.md))",
    )
    shards: int = Field(
        4,
        ge=1,
        le=256,
        description="on a Redis transport, the number of streams this listener's inbox "
        "is split into (by frame): up to this many nodes serve the listener at once, each "
        "frame's messages staying in order on one of them; the same for every node of the "
        "organism (see [distributed](distributed.md#order))",
    )
    history_snapshot: bool = Field(
        False,
        description="`cpu_bound` only: ship the frame's history with each message, so that "
        "`meta.history()` works in a worker on the `memory://` backend",
    )

    @field_validator("name")
    @classmethod
    def _name_is_printable(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("a listener name must be printable, without surrounding spaces")
        return value


class _ProcessPoolSection(_Strict):
    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="worker processes; null means the CPU count. `run --workers N` overrides it",
    )
    batch_max: int = Field(
        64,
        ge=1,
        le=100_000,
        description="most messages in one submission to a worker (see "
        "[micro-batching](cpu_bound.md#micro-batching))",
    )
    recycle_after: int | None = Field(
        None,
        ge=1,
        description="replace the workers after about this many messages per worker; null: never",
    )
    max_crashes: int = Field(
        2,
        ge=1,
        le=100,
        description="crashes of a worker after which a message is answered "
        "`Huh(worker-crashed)` (see [cpu_bound](cpu_bound.md#when-a-worker-dies))",
    )
    start_method: Literal["forkserver", "spawn"] = Field(
        "forkserver", description="how worker processes start; `fork` is refused"
    )
    memory_limit_mb: int | None = Field(
        None,
        ge=64,
        description="address-space limit (`RLIMIT_AS`) per worker: past it, the handler "
        "gets a `MemoryError`; null: none",
    )


class _BootSection(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    payload: str = Field(
        min_length=1,
        description="the XML of a bare payload element (a full `<message>` envelope is "
        "accepted too)",
    )
    to: str | None = Field(
        None,
        description="the listener to send it to; null means every listener accepting it",
    )
    sender: str = Field(
        "boot", alias="from", min_length=1, description="the external sender's label"
    )


class OrganismConfig(_Strict):
    """An organism file of xml_pipeline: its listeners and the settings of its pump."""

    organism: _OrganismSection = Field(description="the organism's name and description")
    backend: str = Field(
        "memory://",
        description="where frame histories, the thread registry and dead letters are kept, "
        "as a URL",
    )
    transport: str | None = Field(
        None,
        min_length=1,
        description="how messages move between listeners: a Redis URL makes every "
        "listener's inbox a Redis Stream, so that several processes (`run --node`) serve "
        "the organism (the backend must be Redis on the same server); null: in-process "
        "queues",
    )
    manager: ManagerOptions = Field(
        ManagerOptions(), description="options of a `manager://` backend"
    )
    redis: RedisOptions = Field(
        RedisOptions(), description="options of a `redis://`, `rediss://` or `unix://` backend"
    )
    history: _HistorySection = Field(
        _HistorySection(), description="bounds on what the backend keeps"
    )
    pump: _PumpSection = Field(
        _PumpSection(), description="the pump's queue, depth, size and thread limits"
    )
    process_pool: _ProcessPoolSection = Field(
        _ProcessPoolSection(), description="the worker processes of `cpu_bound` listeners"
    )
    listeners: list[_ListenerSection] = Field(
        min_length=1,
        description="the named handlers and the payload classes each accepts",
    )
    boot: list[_BootSection] = Field([], description="messages injected when the organism starts")


# -- the resolved organism -----------------------------------------------------------

_PUMP = _PumpSection()
_POOL = _ProcessPoolSection()


def _default(model: type[BaseModel], name: str) -> Any:
    """The default of a model's field (for models with required fields)."""
    return model.model_fields[name].get_default(call_default_factory=True)


def _check_handler_signature(listener: str, handler: Any) -> None:
    """ConfigError unless ``handler`` can be called with ``(payload, meta)``."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # no signature to read (some builtins): trust it
        return
    try:
        signature.bind(object(), object())
    except TypeError:
        name = getattr(handler, "__name__", None) or type(handler).__name__
        raise ConfigError(
            f"listener {listener!r}: the handler must accept (payload, meta), "
            f"and {name}{signature} does not"
        ) from None


@dataclass(frozen=True, slots=True)
class Listener:
    """A named handler and the payload classes it accepts.

    Attributes:
        name: unique in the organism; may contain dots.
        payloads: accepted payload classes (routing is by their qualified names).
        handler: sync or async callable ``(payload, meta)``.
        description: free text shown by ``check``.
        peers: listeners this one may forward to; None means any.
        concurrency: messages handled at once (different frames only, unless not
            ``ordered``).
        ordered: the messages of one frame reach the listener one at a time, in order;
            False: they run at once, up to ``concurrency`` (a fan-out runs in parallel).
        timeout_s: per-message handler time limit; None means none.
        cpu_bound: run the handler in the worker process pool (see ``ProcessPoolSettings``);
            the handler and its payload classes must be importable by module path.
        history_snapshot: for a ``cpu_bound`` handler on the in-memory backend, ship the
            frame's history with each task so ``meta.history()`` works in the worker.
        shards: on a Redis transport, the streams the listener's inbox is split into.
        handler_path: ``module:attr`` the handler is imported by in a worker (derived
            from the function when None).
    """

    name: str
    payloads: tuple[type[BaseModel], ...]
    handler: Handler
    description: str = _default(_ListenerSection, "description")
    peers: frozenset[str] | None = None
    concurrency: int = _default(_ListenerSection, "concurrency")
    ordered: bool = _default(_ListenerSection, "ordered")
    timeout_s: float | None = _default(_ListenerSection, "timeout_s")
    cpu_bound: bool = _default(_ListenerSection, "cpu_bound")
    history_snapshot: bool = _default(_ListenerSection, "history_snapshot")
    shards: int = _default(_ListenerSection, "shards")
    handler_path: str | None = None
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a listener needs a name")
        if not self.payloads:
            raise ConfigError(f"listener {self.name!r} accepts no payload class")
        if not callable(self.handler):
            raise ConfigError(f"listener {self.name!r}: handler is not callable")
        _check_handler_signature(self.name, self.handler)
        seen: dict[str, type[BaseModel]] = {}
        for cls in self.payloads:
            qname = codec_for(cls).qname
            if qname in seen:
                raise ConfigError(
                    f"listener {self.name!r}: {seen[qname].__name__} and {cls.__name__} "
                    f"both map to {qname}"
                )
            seen[qname] = cls
        if not isinstance(self.ordered, bool):
            raise ConfigError(
                f"listener {self.name!r}: ordered must be true or false, not {self.ordered!r}"
            )
        if not 1 <= self.shards <= 256:
            raise ConfigError(f"listener {self.name!r}: shards must be 1 to 256")
        if self.history_snapshot and not self.cpu_bound:
            raise ConfigError(
                f"listener {self.name!r}: history_snapshot applies to cpu_bound listeners only"
            )
        call = getattr(self.handler, "__call__", None)  # noqa: B004 - async __call__ objects
        is_async = inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(call)
        object.__setattr__(self, "is_async", is_async)

    @property
    def accepts_huh(self) -> bool:
        """Whether this listener receives ``Huh`` error payloads."""
        return Huh in self.payloads


@dataclass(frozen=True, slots=True)
class BootMessage:
    """A message injected when the organism starts (a bare payload, wrapped by the pump)."""

    payload: bytes
    to: str | None = _default(_BootSection, "to")
    sender: str = _default(_BootSection, "sender")


@dataclass(frozen=True, slots=True)
class PumpSettings:
    """Pump knobs (the ``pump`` section)."""

    queue_size: int = _PUMP.queue_size
    max_depth: int = _PUMP.max_depth
    drain_timeout_s: float = _PUMP.drain_timeout_s
    limits: ParseLimits = field(default_factory=ParseLimits)
    sync_threads: int = _PUMP.sync_threads
    max_in_pump: int = _PUMP.max_in_pump
    """Messages inside the pump past which a handler's forwards are refused (overloaded)."""
    gc_threshold: int | None = _PUMP.gc_threshold
    """The garbage collector's generation-0 threshold an application may raise to at
    least this while it runs the pump (None: leave it alone). ``StreamPump`` changes
    no process-wide state and ignores it; the command line (``run``, ``bench``) opts in."""
    blocked_loop_s: float | None = _PUMP.blocked_loop_s
    """Report an async handler (or anything else) holding the event loop this long or
    longer (None or 0: not watched)."""


@dataclass(frozen=True, slots=True)
class ProcessPoolSettings:
    """The worker process pool of ``cpu_bound`` listeners (the ``process_pool`` section).

    Attributes:
        workers: worker processes; None means the CPU count.
        batch_max: most messages one submission to a worker carries.
        recycle_after: replace the pool's processes after about this many messages per
            worker (None: never); guards against handlers that leak.
        max_crashes: a message running when a worker died is retried alone; once it
            has crashed a worker this many times (counting the crash that made it a
            suspect) and the last time alone, it is answered ``Huh(worker-crashed)``
            and dead-lettered.
        start_method: ``forkserver`` (default) or ``spawn``.
        memory_limit_mb: address-space limit per worker (RLIMIT_AS); a handler going
            past it gets a ``MemoryError``.
    """

    workers: int | None = _POOL.workers
    batch_max: int = _POOL.batch_max
    recycle_after: int | None = _POOL.recycle_after
    max_crashes: int = _POOL.max_crashes
    start_method: str = _POOL.start_method
    memory_limit_mb: int | None = _POOL.memory_limit_mb

    def __post_init__(self) -> None:
        if self.start_method not in ("forkserver", "spawn"):
            raise ConfigError(
                f"process_pool.start_method must be forkserver or spawn, not {self.start_method!r}"
            )
        for name in ("workers", "batch_max", "recycle_after", "max_crashes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"process_pool.{name} must be at least 1")
        if self.memory_limit_mb is not None and self.memory_limit_mb < 64:
            raise ConfigError("process_pool.memory_limit_mb must be at least 64")

    @property
    def worker_count(self) -> int:
        """``workers``, or the CPU count when unset."""
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Organism:
    """A resolved organism: what :class:`~xml_pipeline.StreamPump` runs."""

    name: str
    listeners: tuple[Listener, ...]
    backend: str = _default(OrganismConfig, "backend")
    history: HistoryLimits = field(default_factory=HistoryLimits)
    settings: PumpSettings = field(default_factory=PumpSettings)
    boot: tuple[BootMessage, ...] = ()
    path: Path | None = None
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    """Options for the backend (the ``manager:`` or ``redis:`` section of the file)."""
    transport: str | None = None
    """A Redis URL: the listeners' inboxes are Redis Streams (see :mod:`xml_pipeline.transport`)."""
    process_pool: ProcessPoolSettings = field(default_factory=ProcessPoolSettings)

    def __post_init__(self) -> None:
        problems: list[str] = []
        names = [listener.name for listener in self.listeners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"duplicate listener name(s): {', '.join(dupes)}")
        known = set(names)
        for listener in self.listeners:
            for peer in sorted(listener.peers or ()):
                if peer not in known:
                    problems.append(f"listener {listener.name!r}: unknown peer {peer!r}")
        for boot in self.boot:
            if boot.to is not None and boot.to not in known:
                problems.append(f"boot message to unknown listener {boot.to!r}")
        if problems:
            raise ConfigError("\n".join(dict.fromkeys(problems)))

    def listener(self, name: str) -> Listener:
        """The listener called ``name``. Raises KeyError."""
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)


# -- loading -------------------------------------------------------------------------


def import_object(spec: str) -> Any:
    """Import ``module:attr`` (or a dotted path ``package.module.attr``).

    Raises:
        ImportError, AttributeError: with the reason.
    """
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    else:
        module_name, _, attr_path = spec.rpartition(".")
    if not module_name or not attr_path:
        raise ImportError(f"{spec!r} is not of the form module:attr")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    line = None if node is None else node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    node = v
                    line = k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(node.value):
                return line
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _where(path: Path, loc: Sequence[int | str], root: yaml.Node | None) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    line = _line_of(root, loc)
    return f"{path}: {key or '(top level)'}" + (f" (line {line})" if line else "")


def _union_free(errors: list[ErrorDetails]) -> list[tuple[tuple[int | str, ...], str, str]]:
    """``(loc, type, message)`` of each error, the union branches folded.

    pydantic reports an input that fits no member of a union (``payload: str |
    list[str]``) once per member, under a ``loc`` naming the member. The branch
    matching the input's shape is kept (a list: the list's errors); when every
    branch only says the type is wrong, they become one message.
    """
    out: list[tuple[tuple[int | str, ...], str, str]] = []
    unions: dict[tuple[int | str, ...], dict[str, list[ErrorDetails]]] = {}
    for err in errors:
        loc = tuple(err.get("loc", ()))
        tag = _union_tag(loc, err["type"])
        if tag is None:
            out.append((loc, err.get("type", ""), err.get("msg", "invalid")))
            continue
        branches = unions.setdefault(loc[:tag], {})
        if not branches:
            out.append((loc[:tag], "union", ""))  # its place in the order
        branches.setdefault(str(loc[tag]), []).append(err)
    folded: list[tuple[tuple[int | str, ...], str, str]] = []
    for loc, kind, msg in out:
        if kind != "union":
            folded.append((loc, kind, msg))
            continue
        branches = unions[loc]
        # A branch whose only error is "not this type" does not match the input's shape.
        kept = [
            errs
            for errs in branches.values()
            if len(errs) > 1
            or not errs[0]["type"].endswith("_type")
            or len(errs[0]["loc"]) > len(loc) + 1
        ]
        if not kept:
            msgs = [errs[0]["msg"] for errs in branches.values()]
            first, rest = msgs[0], [m.removeprefix("Input should be ") for m in msgs[1:]]
            folded.append((loc, "type", " or ".join([first, *rest])))
            continue
        for errs in kept:
            for err in errs:
                folded.append(((*loc, *err["loc"][len(loc) + 1 :]), err["type"], err["msg"]))
    return folded


def _union_tag(loc: tuple[int | str, ...], kind: str) -> int | None:
    """The position in ``loc`` of a union member's name (``str``, ``list[str]``), if any."""
    for i, part in enumerate(loc):
        if not isinstance(part, str) or (kind == "extra_forbidden" and i == len(loc) - 1):
            continue
        if part not in _keys_at(loc[:i]):
            return i
    return None


def _item(annotation: Any) -> Any:
    """The model an annotation holds: ``X``, ``X | None``, ``list[X]`` → X."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model = _item(arg)
            if model is not None:
                return model
    return None


def _keys_at(loc: Sequence[int | str]) -> list[str]:
    """The keys the organism file allows at ``loc`` (a mapping), or []."""
    model: Any = OrganismConfig
    for part in loc:
        if isinstance(part, int):
            continue  # the list's item model was taken with the list's field
        fields = model.model_fields
        name = next((n for n, f in fields.items() if part in (n, f.alias)), None)
        if name is None:
            return []
        model = _item(fields[name].annotation)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _problems(path: Path, root: yaml.Node | None, exc: ValidationError) -> list[str]:
    """One line per problem, naming the file, the key and the line.

    An unknown key close to an allowed one says which it probably meant, and a
    required key it stands for is not reported missing a second time. Lines come
    in the order of the file.
    """
    errors = _union_free(exc.errors())
    missing = {loc for loc, kind, _ in errors if kind == "missing"}
    hints: dict[tuple[int | str, ...], str] = {}
    for loc, kind, _ in errors:
        if kind != "extra_forbidden" or not loc or not isinstance(loc[-1], str):
            continue
        parent, key = loc[:-1], loc[-1]
        wanted = [str(m[-1]) for m in missing if m[:-1] == parent and m[-1] not in hints.values()]
        close = difflib.get_close_matches(key, wanted, n=1) or difflib.get_close_matches(
            key, _keys_at(parent), n=1
        )
        if close:
            hints[loc] = close[0]
    claimed = {(*loc[:-1], key) for loc, key in hints.items()}
    lines: list[tuple[int, str]] = []
    for loc, kind, msg in errors:
        if kind == "missing" and loc in claimed:
            continue
        if kind == "extra_forbidden":
            msg = "unknown key"
            guess = hints.get(loc)
            if guess is not None:
                msg += f" \u2014 did you mean {guess!r}?"
                if (*loc[:-1], guess) in missing:
                    msg += " (missing)"
        line = _line_of(root, loc)
        lines.append((line or sys.maxsize, f"{_where(path, loc, root)}: {msg}"))
    lines.sort(key=lambda item: item[0])  # in the order of the file
    return list(dict.fromkeys(text for _, text in lines))


def _shadowed(folder: Path, spec: str) -> str | None:
    """Why ``spec``'s module is not the one next to the organism file, if it is not.

    With the folder appended to ``sys.path``, a module of the same name imported
    already (or found earlier on ``sys.path``) wins over the file's own.
    """
    module_name = spec.partition(":")[0] if ":" in spec else spec.rpartition(".")[0]
    top = module_name.partition(".")[0]
    ours = [folder / f"{top}.py", folder / top / "__init__.py"]
    if not top or not any(p.is_file() for p in ours):
        return None
    where = getattr(sys.modules.get(top), "__file__", None)
    if where is None or Path(where).resolve() in {p.resolve() for p in ours}:
        return None
    return (
        f"module {top!r} is {where}, not the {ours[0].name} next to the organism file (a "
        "module of that name is imported already or comes earlier on sys.path): rename yours"
    )


def _backend_options(config: OrganismConfig, url: str, overridden: bool) -> dict[str, Any]:
    """The options section of the URL's scheme (none for an unknown scheme: opening
    the backend reports it)."""
    try:
        scheme = backend_scheme(url)
    except BackendUnavailable:
        return {}
    if scheme.section is None:
        return {}
    options: dict[str, Any] = getattr(config, scheme.section).model_dump()
    if overridden and "serve" in options:
        # --backend names another store: join it rather than serve one here (the
        # URL may still say ?serve=1).
        options["serve"] = False
    return options


def load_organism(path: str | Path, *, backend: str | None = None) -> Organism:
    """Load, validate and import an organism YAML file.

    The file's folder is appended to ``sys.path`` (so that ``hello:shout`` finds
    ``hello.py`` next to it, without shadowing an installed module of that name);
    nothing else outside the returned organism changes.

    Args:
        path: the YAML file.
        backend: a backend URL overriding the file's ``backend``.

    Raises:
        ConfigError: one line per problem, each naming the file, the key and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = OrganismConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_problems(path, root, exc))) from exc

    # Appended, not inserted first: a module next to the file must not shadow an
    # installed one (the reverse is reported by _shadowed).
    folder = path.resolve().parent
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

    problems: list[str] = []

    def resolve(loc: Sequence[int | str], spec: str) -> Any:
        try:
            obj = import_object(spec)
        except Exception as exc:  # any import-time failure of user code
            reason = _shadowed(folder, spec) or f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise ConfigError(
                f"{_where(path, loc, root)}: cannot import {spec!r}: {reason}"
            ) from exc
        shadowed = _shadowed(folder, spec)
        if shadowed is not None:  # perhaps a copy of the same code: say so, and go on
            logger.warning(
                "%s: %r comes from elsewhere: %s", _where(path, loc, root), spec, shadowed
            )
        return obj

    listeners = []
    for i, section in enumerate(config.listeners):
        specs = [section.payload] if isinstance(section.payload, str) else section.payload
        classes = []
        for j, spec in enumerate(specs):
            loc: list[int | str] = ["listeners", i, "payload"]
            if isinstance(section.payload, list):
                loc.append(j)
            try:
                cls = resolve(loc, spec)
                if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
                    raise ConfigError(
                        f"{_where(path, loc, root)}: {spec!r} is not a pydantic model class"
                    )
                try:
                    codec_for(cls)
                except ConfigError as exc:
                    raise ConfigError(f"{_where(path, loc, root)}: {exc}") from exc
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            classes.append(cls)
        try:
            handler = resolve(["listeners", i, "handler"], section.handler)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if len(classes) < len(specs):
            continue  # reported above
        try:
            listeners.append(
                Listener(
                    name=section.name,
                    payloads=tuple(classes),
                    handler=handler,
                    description=section.description,
                    peers=None if section.peers is None else frozenset(section.peers),
                    concurrency=section.concurrency,
                    ordered=section.ordered,
                    timeout_s=section.timeout_s,
                    cpu_bound=section.cpu_bound,
                    history_snapshot=section.history_snapshot,
                    shards=section.shards,
                    handler_path=section.handler if section.cpu_bound else None,
                )
            )
        except ConfigError as exc:
            problems.append(f"{_where(path, ['listeners', i], root)}: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))

    p = config.pump
    h = config.history
    url = backend or config.backend
    try:
        return Organism(
            name=config.organism.name,
            listeners=tuple(listeners),
            backend=url,
            history=HistoryLimits(
                max_slots_per_thread=h.max_slots_per_thread,
                max_threads=h.max_threads,
                ttl_s=h.ttl_s,
                max_dead_letters=h.max_dead_letters,
                dead_letter_budget_bytes=h.dead_letter_budget_bytes,
                dead_letter_ttl_s=h.dead_letter_ttl_s,
            ),
            settings=PumpSettings(
                queue_size=p.queue_size,
                max_depth=p.max_depth,
                drain_timeout_s=p.drain_timeout_s,
                limits=ParseLimits(
                    max_bytes=p.max_message_bytes,
                    max_depth=p.max_xml_depth,
                    max_elements=p.max_elements,
                    max_attributes=p.max_attributes,
                ),
                sync_threads=p.sync_threads,
                gc_threshold=p.gc_threshold,
                max_in_pump=max(p.max_in_pump, p.queue_size),
                blocked_loop_s=p.blocked_loop_s,
            ),
            boot=tuple(BootMessage(b.payload.encode("utf-8"), b.to, b.sender) for b in config.boot),
            path=path,
            backend_options=_backend_options(config, url, backend is not None),
            process_pool=ProcessPoolSettings(**config.process_pool.model_dump()),
            transport=config.transport,
        )
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from exc


# -- the reference: docs/organisms.md's tables and the JSON Schema ---------------------

_JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def organism_json_schema() -> dict[str, Any]:
    """The JSON Schema of an organism file, for editors (``schema --organism``)."""
    schema = OrganismConfig.model_json_schema()
    schema["title"] = "xml_pipeline organism file"
    # A section model whose fields have no description (the backends' options) has
    # their meanings in its docstring: give them to the editor too.
    for info in OrganismConfig.model_fields.values():
        model = _item(info.annotation)
        if model is None:
            continue
        properties = schema["$defs"][model.__name__]["properties"]
        for name, meaning in _docstring_attributes(model).items():
            field_info = model.model_fields[name]
            properties[field_info.alias or name].setdefault("description", meaning)
    return {"$schema": _JSON_SCHEMA_DIALECT, **schema}


_PLURAL = {"string": "strings", "mapping": "mappings", "int": "ints", "float": "floats"}


def _type_text(annotation: Any) -> str:
    """How the reference names a field's type: ``int or null``, ``list of strings``."""
    if annotation is None or annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    named = {str: "string", int: "int", float: "float", bool: "bool"}
    if annotation in named:
        return named[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{arg}`" for arg in args)
    if origin is list:
        item = _type_text(args[0])
        return f"list of {_PLURAL.get(item, item)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in args)
    raise TypeError(f"no reference wording for the type {annotation!r}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_SIGN = {"ge": "\u2265", "gt": ">", "le": "\u2264", "lt": "<"}


def _bounds_text(info: FieldInfo) -> str:
    """A field's bounds (``≥ 1``, ``1-1024`` with an en dash, ``not empty``), or ``""``."""
    bound: dict[str, Any] = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None:
                bound[name] = value
    low = ("ge", bound["ge"]) if "ge" in bound else ("gt", bound["gt"]) if "gt" in bound else None
    high = ("le", bound["le"]) if "le" in bound else ("lt", bound["lt"]) if "lt" in bound else None
    parts: list[str] = []
    if low and high and low[0] == "ge" and high[0] == "le":
        parts.append(f"{_number(low[1])}\u2013{_number(high[1])}")
    else:
        if low:
            parts.append(f"{_SIGN[low[0]]} {_number(low[1])}")
        if high:
            parts.append(f"{_SIGN[high[0]]} {_number(high[1])}")
    shortest, longest = bound.get("min_length"), bound.get("max_length")
    is_list = typing.get_origin(info.annotation) is list
    if shortest is not None and longest is not None:
        parts.append(f"{shortest}\u2013{longest} {'items' if is_list else 'chars'}")
    elif shortest == 1:
        parts.append("at least one" if is_list else "not empty")
    elif shortest is not None:
        parts.append(f"at least {shortest} {'items' if is_list else 'chars'}")
    elif longest is not None:
        parts.append(f"at most {longest} {'items' if is_list else 'chars'}")
    return ", ".join(parts)


def _default_text(info: FieldInfo) -> str:
    """A field's default as the reference shows it (``required``, ``null``, `` `16` ``)."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "all defaults"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{_number(value)}`"
    return f"`{json.dumps(value)}`"  # "text", 16, []


def _docstring_attributes(model: type[BaseModel]) -> dict[str, str]:
    """The ``Attributes:`` entries of a model's docstring, by name (the meaning of a
    field without a ``description``)."""
    entries: dict[str, str] = {}
    current: str | None = None
    inside = False
    own = model.__dict__.get("__doc__")  # not BaseModel's, as inspect.getdoc would give
    for line in inspect.cleandoc(own or "").splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break
        name, colon, text = line.strip().partition(": ")
        if line.startswith("    ") and not line.startswith("     ") and colon:
            current = name
            entries[name] = text
        elif current is not None and line.strip():
            entries[current] += " " + line.strip()
    return {
        name: re.sub(r"\bNone\b", "null", text.replace("``", "`")).removesuffix(".")
        for name, text in entries.items()
    }


def _reference_table(model: type[BaseModel]) -> str:
    """One Markdown table of a section's keys: key, type, default, bounds, meaning."""
    fallback = _docstring_attributes(model)
    rows = ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        meaning = info.description or fallback.get(name)
        if not meaning:
            raise ValueError(f"{model.__name__}.{name} has no description")
        cells = [
            f"`{info.alias or name}`",
            _type_text(info.annotation),
            _default_text(info),
            _bounds_text(info),
            meaning.replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _reference_tables() -> dict[str, str]:
    """The key reference of the organism file: one Markdown table per section, by
    section name (``""`` for the top level)."""
    tables = {"": _reference_table(OrganismConfig)}
    for name, info in OrganismConfig.model_fields.items():
        model = _item(info.annotation)
        if model is not None:
            tables[name] = _reference_table(model)
    return tables


_GENERATED = re.compile(
    r"(<!-- generated: organism keys(?:: (?P<section>\w+))? -->\n)(?P<body>.*?)"
    r"(<!-- end generated -->)",
    re.DOTALL,
)


def _reference_markdown(doc: str) -> str:
    """``doc`` with the body of each generated block replaced by its section's table.

    A block opens with ``<!-- generated: organism keys -->`` (the top level) or
    ``<!-- generated: organism keys: SECTION -->`` and closes with
    ``<!-- end generated -->``; ``scripts/gen_reference`` rewrites
    ``docs/organisms.md`` with it.

    Raises:
        ValueError: a block names an unknown section, or a section has no block.
    """
    tables = _reference_tables()
    seen: list[str] = []

    def fill(match: re.Match[str]) -> str:
        section = match["section"] or ""
        if section not in tables:
            raise ValueError(f"no section {section!r} in the organism file")
        seen.append(section)
        # Blank lines around the table: every Markdown renderer ends it before the comment.
        return f"{match[1]}\n{tables[section]}\n{match[4]}"

    out = _GENERATED.sub(fill, doc)
    missing = [name or "(top level)" for name in tables if name not in seen]
    if missing:
        raise ValueError(f"no generated block for: {', '.join(missing)}")
    return out
