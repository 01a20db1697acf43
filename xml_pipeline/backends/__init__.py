"""History, registry and dead-letter backends, chosen by URL.

``memory://`` (the default) keeps everything in this process. Backend modules are
imported only when their scheme is asked for.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..exceptions import BackendUnavailable
from .base import (
    Backend,
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_bytes,
    dead_letter_from_obj,
    dead_letter_to_bytes,
    redact_url,
    slot_from_bytes,
    slot_from_obj,
    slot_to_bytes,
)

__all__ = [
    "SCHEMES",
    "Backend",
    "check_backend_url",
    "redact_url",
    "DeadLetter",
    "HistoryLimits",
    "Slot",
    "dead_letter_from_bytes",
    "dead_letter_from_obj",
    "dead_letter_to_bytes",
    "open_backend",
    "slot_from_bytes",
    "slot_from_obj",
    "slot_to_bytes",
]

SCHEMES = ("memory", "manager", "redis", "rediss")


def check_backend_url(url: str) -> None:
    """Check that a backend URL names a known scheme, without connecting.

    Raises:
        BackendUnavailable: the scheme is unknown.
    """
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        valid = ", ".join(f"{s}://" for s in SCHEMES)
        raise BackendUnavailable(f"unknown backend URL {url!r}: the schemes available are {valid}")


def open_backend(url: str, limits: HistoryLimits | None = None, **options: Any) -> Backend:
    """Create the backend a URL names. Nothing is connected yet: see ``Backend.ping``.

    Args:
        url: ``memory://``, ``manager://HOST:PORT`` or ``redis://HOST:PORT/DB``.
        limits: trimming and eviction bounds.
        options: backend-specific options (the ``manager:`` or ``redis:`` section of
            the organism file), passed to the backend's ``from_url``.

    Raises:
        BackendUnavailable: the scheme is unknown or its backend cannot be loaded.
    """
    check_backend_url(url)
    scheme = urlsplit(url).scheme
    if scheme == "manager":
        from .manager import ManagerBackend

        return ManagerBackend.from_url(url, limits, **options)
    if scheme in ("redis", "rediss"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:
            raise BackendUnavailable(
                f"redis:// needs the redis package: pip install 'xml-pipeline[redis]' ({exc})"
            ) from exc
        return RedisBackend.from_url(url, limits, **options)
    from .memory import MemoryBackend

    return MemoryBackend(limits)
