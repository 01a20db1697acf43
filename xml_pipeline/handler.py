"""What handlers receive and return.

::

    async def handle(payload: Greeting, meta: HandlerMetadata) -> HandlerResponse | None:
        return HandlerResponse(Shout(text=payload.name), to="shouter")   # forward
        return HandlerResponse.respond(Reply(text="hi"))                 # answer the caller
        return [HandlerResponse(...), HandlerResponse(...)]             # several
        return None                                                       # end the branch
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .backends.base import Slot
from .exceptions import ConfigError, InvalidReturn
from .payload import codec_for

__all__ = ["Handler", "HandlerMetadata", "HandlerResponse"]

Handler = Callable[[Any, "HandlerMetadata"], Any]
"""A handler, sync or async: ``(payload, meta) -> HandlerResponse | list[...] | None``."""


@dataclass(frozen=True, slots=True)
class HandlerResponse:
    """A message a handler emits. The pump sets its sender and thread.

    ``HandlerResponse(payload, to="name")`` forwards to one listener;
    ``HandlerResponse(payload)`` forwards to every listener accepting the payload;
    ``HandlerResponse.respond(payload)`` answers the caller.
    """

    payload: BaseModel
    to: str | None = None
    is_response: bool = False

    @classmethod
    def respond(cls, payload: BaseModel) -> HandlerResponse:
        """Answer whoever called this frame (a listener, or the external sender)."""
        return cls(payload, None, True)


@dataclass(frozen=True, slots=True)
class HandlerMetadata:
    """What a handler knows about the message it is handling.

    Attributes:
        thread_id: the frame's opaque id.
        from_id: the sender (a listener name, or the external sender's label).
        own_name: this listener's name.
        message_id: the message's id.
        is_self_call: the listener sent this message to itself.
        depth: hops from the conversation's root to this frame.
        from_external: the sender is outside the organism (``from_id`` is only a label).
    """

    thread_id: str
    from_id: str
    own_name: str
    message_id: str
    is_self_call: bool
    depth: int
    from_external: bool
    _history: Callable[[], Coroutine[Any, Any, list[Slot]]] = field(repr=False, compare=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False, compare=False)
    _blocking: Callable[[], list[Slot]] | None = field(default=None, repr=False, compare=False)

    async def history(self) -> list[Slot]:
        """This frame's history (its listener's transcript), oldest first."""
        return await self._history()

    def history_blocking(self) -> list[Slot]:
        """This frame's history, for a sync handler running in a worker thread.

        In a ``cpu_bound`` worker process it works from the handler's own thread.

        Raises:
            RuntimeError: called from the event loop's own thread.
        """
        if self._blocking is not None:
            return self._blocking()
        loop = self._loop
        if loop is None:
            raise RuntimeError("history_blocking() needs the pump's event loop")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("history_blocking() would block the event loop; await history()")
        if loop.is_closed():
            raise RuntimeError("history_blocking(): the pump's event loop is closed")
        coro = self._history()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except BaseException:
            coro.close()
            raise
        return future.result()


def responses_of(listener: str, result: Any) -> list[HandlerResponse]:
    """Check what a handler returned and list its responses.

    Raises:
        InvalidReturn: not a HandlerResponse, a list of them, or None; or a payload
            that is not a usable payload model.
    """
    if result is None:
        return []
    if isinstance(result, HandlerResponse):
        items = [result]
    elif isinstance(result, list | tuple):
        items = list(result)
    else:
        raise InvalidReturn(
            f"{listener} returned {type(result).__name__}; expected HandlerResponse, "
            "a list of them, or None",
            listener=listener,
        )
    for item in items:
        if not isinstance(item, HandlerResponse):
            raise InvalidReturn(
                f"{listener} returned a list holding {type(item).__name__}", listener=listener
            )
        if not isinstance(item.payload, BaseModel):
            raise InvalidReturn(
                f"{listener} returned a payload of type {type(item.payload).__name__}, "
                "not a pydantic model",
                listener=listener,
            )
        try:
            codec_for(type(item.payload))
        except ConfigError as exc:
            raise InvalidReturn(f"{listener}: {exc}", listener=listener) from exc
    return items
