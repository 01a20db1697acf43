"""How messages move between listeners.

The embedded default is the pump's in-process inboxes (``asyncio.Queue`` per
listener worker, see :mod:`xml_pipeline.pump`). :mod:`xml_pipeline.transport.redis`
holds the primitives of the Redis Streams transport, with which several pump
processes serve one organism: each listener's inbox a stream read through a
consumer group, and every delivery ended by one atomic commit (fence, history,
outputs, acknowledgement).
"""

from __future__ import annotations

__all__: list[str] = []
