"""A pump as one node of an organism on the Redis Streams transport (private to the
engine, :mod:`xml_pipeline.pump`).

What a delivery from a stream does is gathered in an :class:`Outbox` while it runs
(the history slots it records, the deliveries and replies it produces) and then
committed in one step with the input's acknowledgement
(:meth:`~xml_pipeline.transport.redis.RedisStreams.commit`). The outbox is found
through a context variable, set only around such a delivery: the in-process path
never sees one.

Stream entries carry a message and where it goes, as flat fields:

    k   "d" (a delivery to a listener's inbox) or "r" (a reply for the accepting node)
    n   the node that accepted the conversation's input (its replies go there)
    i s t q x   the message's id, sender, <to>, payload qualified name, payload XML
    re c h p    its <re>, cause (what a request() waits for), "1" if it follows a Huh,
                the payload class's import path
    l f rf rt   delivery: the target listener, its frame, the frame it answers on,
                the listener it answers to
    th o        reply: the conversation (root frame), the external sender's label
"""

from __future__ import annotations

from contextvars import ContextVar

from pydantic import BaseModel

from ._delivery import Delivery, Message
from .backends.base import Slot
from .reply import Reply

__all__ = ["OUTBOX", "Outbox", "delivery_fields", "model_path", "reply_fields"]


class Outbox:
    """What a delivery from a stream has produced, committed when it ends."""

    __slots__ = ("node", "outputs", "slots")

    def __init__(self, node: str) -> None:
        self.node = node  # the node that accepted the conversation
        self.slots: list[tuple[str, Slot]] = []
        self.outputs: list[tuple[str, dict[bytes, bytes]]] = []  # (listener or "", fields)


OUTBOX: ContextVar[Outbox | None] = ContextVar("xml_pipeline_outbox", default=None)


def model_path(model: BaseModel) -> str:
    """The import path of a payload model's class (``module:qualname``)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def _message_fields(msg: Message, node: str) -> dict[bytes, bytes]:
    fields = {
        b"n": node.encode(),
        b"i": msg.id.encode(),
        b"s": msg.sender.encode(),
        b"q": msg.qname.encode(),
        b"x": msg.xml(),
    }
    if msg.to is not None:
        fields[b"t"] = msg.to.encode()
    if msg.re is not None:
        fields[b"re"] = msg.re.encode()
    if msg.cause is not None:
        fields[b"c"] = msg.cause.encode()
    if msg.after_huh:
        fields[b"h"] = b"1"
    path = (
        msg.path
        if msg.path is not None
        else (model_path(msg.model) if msg.model is not None else None)
    )
    if path is not None:
        fields[b"p"] = path.encode()
    return fields


def delivery_fields(d: Delivery, node: str) -> dict[bytes, bytes]:
    """The stream entry of a delivery to a listener's inbox."""
    fields = _message_fields(d.message, node)
    fields[b"k"] = b"d"
    fields[b"l"] = d.runtime.name.encode()
    fields[b"f"] = d.frame.uuid.encode()
    fields[b"rf"] = d.reply_frame.uuid.encode()
    if d.reply_to is not None:
        fields[b"rt"] = d.reply_to.name.encode()
    return fields


def reply_fields(reply: Reply, msg: Message, node: str) -> dict[bytes, bytes]:
    """The stream entry of a reply for the node that accepted the conversation."""
    fields = _message_fields(msg, node)
    fields[b"k"] = b"r"
    fields[b"s"] = reply.sender.encode()
    fields[b"i"] = reply.message_id.encode()
    if reply.thread_id is not None:
        fields[b"th"] = reply.thread_id.encode()
    if reply.to is not None:
        fields[b"o"] = reply.to.encode()
    if reply.re is not None:
        fields[b"re"] = reply.re.encode()
    if b"p" not in fields:
        fields[b"p"] = model_path(reply.payload).encode()
    return fields
