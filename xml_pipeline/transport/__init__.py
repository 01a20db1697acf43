"""How messages move between listeners.

The embedded default is the pump's in-process inboxes (``asyncio.Queue`` per
listener worker, see :mod:`xml_pipeline.pump`). With a ``redis://`` transport several
pump processes (*nodes*) serve one organism: each listener's inbox is a Redis Stream
read through a consumer group, and every delivery ends with one atomic commit (the
fence, the history, the outputs, the acknowledgement); the primitives are in
:mod:`xml_pipeline.transport.redis`, imported only when a transport is asked for (so
that ``import xml_pipeline`` does not import ``redis``).
"""

from __future__ import annotations

import importlib
import zlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..exceptions import ConfigError

if TYPE_CHECKING:
    from ..backends.base import Backend
    from .redis import RedisStreams

__all__ = ["TRANSPORT_SCHEMES", "open_transport", "shard_of"]

TRANSPORT_SCHEMES = ("redis", "rediss", "unix")
"""The URL schemes of the Redis Streams transport."""


def shard_of(frame: str, shards: int) -> int:
    """The shard of a listener's inbox that the messages of ``frame`` go to, among
    ``shards``: the same in every process (CRC-32 of the frame's id), so that one
    frame's messages are in one stream, in order."""
    return zlib.crc32(frame.encode()) % shards if shards > 1 else 0


def open_transport(url: str, backend: Backend, **options: Any) -> RedisStreams:
    """The Redis Streams transport at ``url``, writing history through ``backend``.

    The commit that ends a delivery writes the history in the same atomic step, so
    the backend must be a Redis backend on the same server (checked when the pump
    starts).

    Raises:
        ConfigError: not a Redis URL, or the backend is not a Redis backend.
    """
    scheme = urlsplit(url).scheme
    if scheme not in TRANSPORT_SCHEMES:
        raise ConfigError(
            f"transport {url!r}: the transport is a Redis URL (redis://, rediss:// or "
            "unix://); without one the pump's in-process inboxes are used"
        )
    module = importlib.import_module("xml_pipeline.transport.redis")
    backends = importlib.import_module("xml_pipeline.backends.redis")
    if not isinstance(backend, backends.RedisBackend):
        raise ConfigError(
            f"transport {url!r} needs the backend on the same Redis server (it commits "
            f"history, outputs and acknowledgements in one step); the backend is {backend!r}"
        )
    streams: RedisStreams = module.RedisStreams(url, backend, **options)
    return streams
