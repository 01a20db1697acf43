"""Organism configuration: strict YAML models and their resolution into an Organism.

:func:`load_organism` reads one YAML file, validates it against frozen pydantic
models (unknown keys are errors), imports every handler and payload class (the
YAML file's folder is put on ``sys.path``) and returns an :class:`Organism`.
Every problem becomes one :class:`ConfigError` line naming the file, the key and,
where known, the line.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
]


# -- the YAML schema ---------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OrganismSection(_Strict):
    name: str = Field(min_length=1)
    description: str = ""


class _HistorySection(_Strict):
    max_slots_per_thread: int = Field(10_000, ge=1)
    max_threads: int = Field(100_000, ge=1)
    ttl_s: float = Field(86_400.0, gt=0)
    max_dead_letters: int = Field(10_000, ge=1)


class _PumpSection(_Strict):
    queue_size: int = Field(1024, ge=1)
    max_depth: int = Field(32, ge=1)
    drain_timeout_s: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(1024 * 1024, ge=64)
    max_xml_depth: int = Field(64, ge=3)
    max_elements: int = Field(10_000, ge=2)
    max_attributes: int = Field(10_000, ge=0)
    sync_threads: int = Field(32, ge=1)
    gc_threshold: int | None = Field(10_000, ge=100)
    max_in_pump: int = Field(100_000, ge=1)


class _ListenerSection(_Strict):
    name: str = Field(min_length=1, max_length=256)
    payload: str | list[str]
    handler: str = Field(min_length=1)
    description: str = ""
    peers: list[str] | None = None
    concurrency: int = Field(16, ge=1, le=100_000)
    timeout_s: float | None = Field(None, gt=0)
    cpu_bound: bool = False
    history_snapshot: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_printable(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("a listener name must be printable, without surrounding spaces")
        return value


class _ProcessPoolSection(_Strict):
    workers: int | None = Field(None, ge=1, le=1024)
    batch_max: int = Field(64, ge=1, le=100_000)
    recycle_after: int | None = Field(None, ge=1)
    max_crashes: int = Field(2, ge=1, le=100)
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    memory_limit_mb: int | None = Field(None, ge=64)


class _BootSection(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    to: str | None = None
    sender: str = Field("boot", alias="from", min_length=1)
    payload: str = Field(min_length=1)


class OrganismConfig(_Strict):
    """The whole organism YAML file, validated but not yet imported."""

    organism: _OrganismSection
    backend: str = "memory://"
    manager: ManagerOptions = ManagerOptions()
    redis: RedisOptions = RedisOptions()
    history: _HistorySection = _HistorySection()
    pump: _PumpSection = _PumpSection()
    process_pool: _ProcessPoolSection = _ProcessPoolSection()
    listeners: list[_ListenerSection] = Field(min_length=1)
    boot: list[_BootSection] = []


# -- the resolved organism -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    """A named handler and the payload classes it accepts.

    Attributes:
        name: unique in the organism; may contain dots.
        payloads: accepted payload classes (routing is by their qualified names).
        handler: sync or async callable ``(payload, meta)``.
        description: free text shown by ``check``.
        peers: listeners this one may forward to; None means any.
        concurrency: messages handled at once (different frames only).
        timeout_s: per-message handler time limit; None means none.
        cpu_bound: run the handler in the worker process pool (see ``ProcessPoolSettings``);
            the handler and its payload classes must be importable by module path.
        history_snapshot: for a ``cpu_bound`` handler on the in-memory backend, ship the
            frame's history with each task so ``meta.history()`` works in the worker.
        handler_path: ``module:attr`` the handler is imported by in a worker (derived
            from the function when None).
    """

    name: str
    payloads: tuple[type[BaseModel], ...]
    handler: Handler
    description: str = ""
    peers: frozenset[str] | None = None
    concurrency: int = 16
    timeout_s: float | None = None
    cpu_bound: bool = False
    history_snapshot: bool = False
    handler_path: str | None = None
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a listener needs a name")
        if not self.payloads:
            raise ConfigError(f"listener {self.name!r} accepts no payload class")
        if not callable(self.handler):
            raise ConfigError(f"listener {self.name!r}: handler is not callable")
        seen: dict[str, type[BaseModel]] = {}
        for cls in self.payloads:
            qname = codec_for(cls).qname
            if qname in seen:
                raise ConfigError(
                    f"listener {self.name!r}: {seen[qname].__name__} and {cls.__name__} "
                    f"both map to {qname}"
                )
            seen[qname] = cls
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
    to: str | None = None
    sender: str = "boot"


@dataclass(frozen=True, slots=True)
class PumpSettings:
    """Pump knobs (the ``pump`` section)."""

    queue_size: int = 1024
    max_depth: int = 32
    drain_timeout_s: float = 10.0
    limits: ParseLimits = field(default_factory=ParseLimits)
    sync_threads: int = 32
    max_in_pump: int = 100_000
    """Messages inside the pump past which a handler's forwards are refused (overloaded)."""
    gc_threshold: int | None = 10_000
    """While the pump runs, the garbage collector's generation-0 threshold is raised
    to at least this (process-wide, restored on exit); None leaves it alone."""


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

    workers: int | None = None
    batch_max: int = 64
    recycle_after: int | None = None
    max_crashes: int = 2
    start_method: str = "forkserver"
    memory_limit_mb: int | None = None

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
    backend: str = "memory://"
    history: HistoryLimits = field(default_factory=HistoryLimits)
    settings: PumpSettings = field(default_factory=PumpSettings)
    boot: tuple[BootMessage, ...] = ()
    path: Path | None = None
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    """Options for the backend (the ``manager:`` or ``redis:`` section of the file)."""
    process_pool: ProcessPoolSettings = field(default_factory=ProcessPoolSettings)

    def __post_init__(self) -> None:
        names = [listener.name for listener in self.listeners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"duplicate listener name(s): {', '.join(dupes)}")
        known = set(names)
        for listener in self.listeners:
            for peer in sorted(listener.peers or ()):
                if peer not in known:
                    raise ConfigError(f"listener {listener.name!r}: unknown peer {peer!r}")
        for boot in self.boot:
            if boot.to is not None and boot.to not in known:
                raise ConfigError(f"boot message to unknown listener {boot.to!r}")

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


def _config_error(path: Path, root: yaml.Node | None, exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and p in ("str", "list[str]"))]
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = exc.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return ConfigError(f"{_where(path, loc, root)}: {msg}{suffix}")


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

    Args:
        path: the YAML file.
        backend: a backend URL overriding the file's ``backend``.

    Raises:
        ConfigError: one line naming the file, the key and the line.
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
        raise _config_error(path, root, exc) from exc

    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)

    def resolve(loc: Sequence[int | str], spec: str) -> Any:
        try:
            return import_object(spec)
        except Exception as exc:  # any import-time failure of user code
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise ConfigError(
                f"{_where(path, loc, root)}: cannot import {spec!r}: {reason}"
            ) from exc

    listeners = []
    for i, section in enumerate(config.listeners):
        specs = [section.payload] if isinstance(section.payload, str) else section.payload
        classes = []
        for j, spec in enumerate(specs):
            loc: list[int | str] = ["listeners", i, "payload"]
            if isinstance(section.payload, list):
                loc.append(j)
            cls = resolve(loc, spec)
            if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
                raise ConfigError(
                    f"{_where(path, loc, root)}: {spec!r} is not a pydantic model class"
                )
            try:
                codec_for(cls)
            except ConfigError as exc:
                raise ConfigError(f"{_where(path, loc, root)}: {exc}") from exc
            classes.append(cls)
        handler = resolve(["listeners", i, "handler"], section.handler)
        try:
            listeners.append(
                Listener(
                    name=section.name,
                    payloads=tuple(classes),
                    handler=handler,
                    description=section.description,
                    peers=None if section.peers is None else frozenset(section.peers),
                    concurrency=section.concurrency,
                    timeout_s=section.timeout_s,
                    cpu_bound=section.cpu_bound,
                    history_snapshot=section.history_snapshot,
                    handler_path=section.handler if section.cpu_bound else None,
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{_where(path, ['listeners', i], root)}: {exc}") from exc

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
            ),
            boot=tuple(BootMessage(b.payload.encode("utf-8"), b.to, b.sender) for b in config.boot),
            path=path,
            backend_options=_backend_options(config, url, backend is not None),
            process_pool=ProcessPoolSettings(**config.process_pool.model_dump()),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
