"""The routing table: payload qualified name → listeners that accept it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import Listener
from .payload import Codec, codec_for

__all__ = ["Route", "RoutingTable"]


@dataclass(frozen=True, slots=True)
class Route:
    """One accepted payload: the listener and the codec of its class."""

    listener: Listener
    codec: Codec


class RoutingTable:
    """Which listeners accept which payloads, built once from an organism's listeners."""

    def __init__(self, listeners: Iterable[Listener]) -> None:
        self.by_qname: dict[str, tuple[Route, ...]] = {}
        self.by_listener: dict[str, dict[str, Codec]] = {}
        for listener in listeners:
            codecs = self.by_listener.setdefault(listener.name, {})
            for cls in listener.payloads:
                codec = codec_for(cls)
                codecs[codec.qname] = codec
                self.by_qname[codec.qname] = (
                    *self.by_qname.get(codec.qname, ()),
                    Route(listener, codec),
                )

    def routes(self, qname: str) -> tuple[Route, ...]:
        """Every listener accepting ``qname``, in declaration order."""
        return self.by_qname.get(qname, ())

    def describe(self) -> list[tuple[str, str, str]]:
        """Rows of ``(qname, class, listener)`` sorted by qname, for ``check``."""
        rows = []
        for qname, routes in sorted(self.by_qname.items()):
            for route in routes:
                cls = route.codec.cls
                rows.append((qname, f"{cls.__module__}:{cls.__qualname__}", route.listener.name))
        return rows
