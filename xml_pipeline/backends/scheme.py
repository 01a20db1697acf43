"""Backend URL schemes: the one place that knows them.

A backend is named by a URL, and its scheme decides everything else. :data:`SCHEMES`
maps each scheme to a frozen :class:`BackendScheme`: the class implementing it
(imported only when a URL of that scheme is opened, so ``import xml_pipeline`` never
imports ``redis``), the organism file's section holding its options and the pydantic
model of that section, and what the store offers to other processes. Callers ask
here rather than look at a URL themselves:

- :func:`backend_scheme`: the record of a URL (an unknown scheme is one error naming
  every valid one);
- :func:`open_backend`: the backend a URL names, built with its options;
- :func:`serves`: whether a URL and its options ask this process to serve a manager
  store (``?serve=1``, ``?serve=true`` and ``serve: true`` mean the same);
- :func:`client_url`: the URL and options with which another process (a pool worker,
  the ``deadletters`` command) joins the same store without serving it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from ..exceptions import BackendUnavailable
from .base import Backend, HistoryLimits, redact_url

__all__ = [
    "SCHEMES",
    "BackendScheme",
    "ManagerOptions",
    "RedisOptions",
    "backend_scheme",
    "client_url",
    "open_backend",
    "serves",
]


# -- the options sections of the organism file --------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManagerOptions(_Options):
    """The ``manager:`` section: options of a ``manager://`` backend.

    Attributes:
        authkey: the shared secret; None takes it from ``XML_PIPELINE_MANAGER_AUTHKEY``.
        serve: this process serves the store at the URL's address (``?serve=`` in the
            URL wins).
        connect_timeout_s: bound on connecting and proving the authkey.
        max_request_bytes: the largest request frame the served store reads (when this
            process serves it); a larger one disconnects its client, and a client never
            sends one (it splits batches, and refuses a single call that large).
        max_connections: how many clients the served store keeps at once; past it a new
            connection is closed at once.
    """

    authkey: str | None = Field(None, min_length=1, repr=False)
    serve: bool = False
    connect_timeout_s: float = Field(5.0, gt=0)
    # The largest call a pump makes by default is one history slot of a message at
    # pump.max_message_bytes (1 MiB): ~1.4 MiB of JSON once base64-encoded. A client's
    # batch stops past 1 MiB, so its frames stay under ~2.5 MiB; a dead letter keeps at
    # most history.dead_letter_bytes (64 KiB). 8 MiB leaves room for handler outputs a
    # few times larger than what ingress accepts, while one frame stays cheap to decode
    # on the server's single thread (~0.45 s and ~200 MiB for the worst 8 MiB of JSON,
    # millions of empty arrays; ~10 ms for frames of slots).
    max_request_bytes: int = Field(8 << 20, ge=64 << 10)
    max_connections: int = Field(256, ge=1)


class RedisOptions(_Options):
    """The ``redis:`` section: options of ``redis://``, ``rediss://`` and ``unix://``.

    Attributes:
        prefix: every key starts with ``prefix:``.
        connect_timeout_s: bound on opening a connection (and on the first ``PING``).
        socket_timeout_s: bound on a reply.
        retries: how many times a failed command may be sent again, at least (0:
            never).
        outage_s: how long a command keeps being sent again while Redis cannot be
            reached (backing off up to 2 s): ingress and handlers wait through an
            outage this long instead of failing.
        allow_eviction: accept a server whose ``maxmemory-policy`` evicts keys.
    """

    prefix: str = Field("xml_pipeline", min_length=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    socket_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(5, ge=0)
    outage_s: float = Field(120.0, ge=0)
    allow_eviction: bool = False


# -- the registry ----------------------------------------------------------------------


class _BackendClass(Protocol):
    @classmethod
    def from_url(
        cls, url: str, limits: HistoryLimits | None = None, /, **options: Any
    ) -> Backend: ...


@dataclass(frozen=True, slots=True)
class BackendScheme:
    """What the project knows about one backend URL scheme.

    Attributes:
        name: the scheme, without ``://``.
        example: the form of its URLs, for messages and documentation.
        backend: ``module:class`` of the backend; its ``from_url(url, limits, **options)``
            builds one. Imported on first use.
        section: the organism file's section holding the options, or None.
        options: the pydantic model of that section, or None.
        shared: other processes can reach the store (pool workers, the
            ``deadletters`` command).
        persistent: the store outlives the process writing to it, so its dead
            letters can be listed and replayed afterwards.
        servable: a process may serve the store itself (``?serve=1``, ``serve: true``).
        extra: the ``pip install 'xml-pipeline[EXTRA]'`` the backend needs, if any.
    """

    name: str
    example: str
    backend: str
    section: str | None = None
    options: type[BaseModel] | None = None
    shared: bool = False
    persistent: bool = False
    servable: bool = False
    extra: str | None = None

    def load(self) -> _BackendClass:
        """Import the backend class.

        Raises:
            BackendUnavailable: its module (or a package it needs) cannot be imported.
        """
        module_name, _, attr = self.backend.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            package = (exc.name or module_name).partition(".")[0]
            hint = f": pip install 'xml-pipeline[{self.extra}]'" if self.extra else ""
            raise BackendUnavailable(
                f"{self.name}:// needs the {package} package{hint} ({exc})"
            ) from exc
        return cast(_BackendClass, getattr(module, attr))

    def open(self, url: str, limits: HistoryLimits | None = None, **options: Any) -> Backend:
        """The backend ``url`` names (nothing connected yet: see ``Backend.ping``)."""
        return self.load().from_url(url, limits, **options)


_MEMORY = BackendScheme(
    name="memory",
    example="memory://",
    backend="xml_pipeline.backends.memory:MemoryBackend",
)
_MANAGER = BackendScheme(
    name="manager",
    example="manager://HOST:PORT",
    backend="xml_pipeline.backends.manager:ManagerBackend",
    section="manager",
    options=ManagerOptions,
    shared=True,
    # The store lives in its server's process, which outlives the pumps that join it.
    persistent=True,
    servable=True,
)
_REDIS = BackendScheme(
    name="redis",
    example="redis://HOST:PORT/DB",
    backend="xml_pipeline.backends.redis:RedisBackend",
    section="redis",
    options=RedisOptions,
    shared=True,
    persistent=True,
    extra="redis",
)

SCHEMES: Mapping[str, BackendScheme] = MappingProxyType(
    {
        "memory": _MEMORY,
        "manager": _MANAGER,
        "redis": _REDIS,
        "rediss": replace(_REDIS, name="rediss", example="rediss://HOST:PORT/DB"),
        "unix": replace(_REDIS, name="unix", example="unix:///PATH?db=DB"),
    }
)
"""Every backend URL scheme, by name (``rediss://`` is Redis over TLS, ``unix://``
Redis over a unix socket)."""


def backend_scheme(url: str) -> BackendScheme:
    """The scheme record of a backend URL, without connecting or importing anything.

    Raises:
        BackendUnavailable: the scheme is unknown (the message names the valid ones).
    """
    try:
        name = urlsplit(url).scheme
    except ValueError:  # e.g. an unbalanced "[" in the host
        name = ""
    scheme = SCHEMES.get(name) if "://" in url else None
    if scheme is None:
        valid = ", ".join(f"{s}://" for s in SCHEMES)
        raise BackendUnavailable(
            f"unknown backend URL {redact_url(url)!r}: the schemes available are {valid}"
        )
    return scheme


def open_backend(url: str, limits: HistoryLimits | None = None, **options: Any) -> Backend:
    """Create the backend a URL names. Nothing is connected yet: see ``Backend.ping``.

    Args:
        url: ``memory://``, ``manager://HOST:PORT``, ``redis://HOST:PORT/DB``,
            ``rediss://HOST:PORT/DB`` or ``unix:///PATH?db=DB``.
        limits: trimming and eviction bounds.
        options: backend-specific options (the ``manager:`` or ``redis:`` section of
            the organism file), passed to the backend's ``from_url``.

    Raises:
        BackendUnavailable: the scheme is unknown, its backend cannot be loaded, or the
            URL is malformed.
    """
    return backend_scheme(url).open(url, limits, **options)


_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _serve_query(url: str) -> bool | None:
    """The URL's ``serve=`` flag (the last one wins), or None when it has none."""
    flag: bool | None = None
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key != "serve":
            continue
        if value.lower() in _TRUE:
            flag = True
        elif value.lower() in _FALSE:
            flag = False
        else:
            raise BackendUnavailable(
                f"{redact_url(url)}: serve={value!r} is not a flag (serve=1 or serve=0)"
            )
    return flag


def serves(url: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` and its options ask this process to serve the store.

    ``?serve=1`` (or ``true``, ``yes``) and ``?serve=0`` (``false``, ``no``) in the URL
    win over the ``serve`` option (the organism file's ``manager.serve``).

    Raises:
        BackendUnavailable: an unknown scheme, a ``serve=`` that is not a flag, or a
            scheme that cannot be served asked to serve.
    """
    scheme = backend_scheme(url)
    flag = _serve_query(url)
    if flag is None:
        flag = bool((options or {}).get("serve", False))
    if flag and not scheme.servable:
        servable = ", ".join(f"{s.name}://" for s in SCHEMES.values() if s.servable)
        raise BackendUnavailable(
            f"{redact_url(url)}: a {scheme.name}:// store cannot be served by this process "
            f"(only {servable})"
        )
    return flag


def client_url(
    url: str, options: Mapping[str, Any] | None = None, *, backend: Backend | None = None
) -> tuple[str, dict[str, Any]]:
    """The URL and options another process joins this store with, without serving it.

    A pool worker, or the ``deadletters`` command, opens ``open_backend(*client_url(...))``
    (with the limits) to read and write the store the organism's ``url`` names.

    Args:
        url: the organism's backend URL.
        options: its options (``Organism.backend_options``).
        backend: the backend opened from ``url`` in this process, if any: a store it
            serves at a port picked when it started (port 0) is joined at that port.

    Raises:
        BackendUnavailable: an unknown scheme, a store no other process can reach
            (``memory://``), or a store served at port 0 by a process not named by
            ``backend`` (its port is unknown here).
    """
    scheme = backend_scheme(url)
    joined = dict(options or {})
    if not scheme.shared:
        raise BackendUnavailable(
            f"{redact_url(url)}: a {scheme.name}:// store lives in one process: "
            "no other process can join it"
        )
    if not scheme.servable:
        return url, joined
    serves(url, options)  # a malformed serve= is reported here too
    served = getattr(backend, "url", None) if backend is not None else None
    if isinstance(served, str) and urlsplit(served).scheme == scheme.name:
        url = served  # the address actually served (a servable backend's url has no secret)
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "serve"]
    url = urlunsplit(parts._replace(query=urlencode(query)))
    joined["serve"] = False
    try:
        port = parts.port
    except ValueError:
        port = None
    if port == 0:
        raise BackendUnavailable(
            f"{url}: port 0 is picked when a process starts serving the store; name the "
            f"running store's address instead (--backend {scheme.example})"
        )
    return url, joined
