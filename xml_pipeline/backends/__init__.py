"""History, registry and dead-letter backends, chosen by URL.

``memory://`` (the default) keeps everything in this process. What each URL scheme
means (its backend class, options, whether other processes can reach the store) is
known in one place, :mod:`xml_pipeline.backends.scheme`; backend modules are
imported only when their scheme is asked for.
"""

from __future__ import annotations

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
from .scheme import (
    SCHEMES,
    BackendScheme,
    ManagerOptions,
    RedisOptions,
    backend_scheme,
    client_url,
    open_backend,
    serves,
)

__all__ = [
    "SCHEMES",
    "Backend",
    "BackendScheme",
    "BackendUnavailable",
    "DeadLetter",
    "HistoryLimits",
    "ManagerOptions",
    "RedisOptions",
    "Slot",
    "backend_scheme",
    "check_backend_url",
    "client_url",
    "dead_letter_from_bytes",
    "dead_letter_from_obj",
    "dead_letter_to_bytes",
    "open_backend",
    "redact_url",
    "serves",
    "slot_from_bytes",
    "slot_from_obj",
    "slot_to_bytes",
]


def check_backend_url(url: str) -> None:
    """Check that a backend URL names a known scheme, without connecting.

    The same as :func:`backend_scheme`, for callers that only want the check.

    Raises:
        BackendUnavailable: the scheme is unknown.
    """
    backend_scheme(url)
