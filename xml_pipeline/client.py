"""A program that feeds an organism served by nodes, without being one.

::

    async with Client("redis://127.0.0.1:6379/0", "chain.yaml") as client:
        reply = await client.request(Ask(n=1), to="front")

A client is a node that serves no listener: what it sends goes to the listeners'
inbox streams like any node's input, and the replies to its conversations come back
on its own reply stream. Its name is unique per client unless given; an anonymous
client's reply stream is deleted when it closes.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel

from .config import Organism, load_organism
from .pump import StreamPump
from .reply import Reply

__all__ = ["Client"]


class Client:
    """Send messages to an organism on the Redis Streams transport and get its replies.

    Args:
        transport: the organism's transport (a Redis URL).
        organism: the organism (or its YAML file): what it routes and how to decode
            the replies. Its backend must be the Redis server of the transport.
        name: the client's name among the nodes; a client restarted under the same
            name gets the replies that came while it was away. Default: unique.
    """

    def __init__(
        self, transport: str, organism: Organism | str | Path, *, name: str | None = None
    ) -> None:
        if not isinstance(organism, Organism):
            organism = load_organism(organism)
        self._anonymous = name is None
        self.name = name or f"client-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pump = StreamPump(organism, transport=transport, node=self.name, serve=())
        if self._pump._node is not None:
            self._pump._node.drop_replies = self._anonymous

    def __repr__(self) -> str:
        return f"<Client {self.name} of {self._pump.organism.name} on {self._pump.transport}>"

    async def __aenter__(self) -> Client:
        await self._pump.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop; an anonymous client's reply stream goes with it."""
        await self._pump.__aexit__(exc_type, exc, tb)

    async def request(
        self,
        message: bytes | str | BaseModel,
        *,
        to: str | None = None,
        sender: str = "client",
        thread: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Send a message and wait for the first reply to it (see
        :meth:`StreamPump.request <xml_pipeline.StreamPump.request>`: a conversation
        that ends without a reply raises ``NoReply``)."""
        return await self._pump.request(message, to=to, sender=sender, thread=thread,
                                        timeout=timeout)  # fmt: skip

    async def send(
        self,
        message: bytes | str | BaseModel,
        *,
        to: str | None = None,
        sender: str = "client",
        thread: str | None = None,
    ) -> str | None:
        """Send a message without waiting; returns its conversation (None: refused)."""
        return await self._pump.inject(message, to=to, sender=sender, thread=thread)
