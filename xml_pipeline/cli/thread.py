"""``python -m xml_pipeline thread organism.yaml ID``: one conversation read back from
the backend, as a tree of frames, each with the slots of its history in order.

``ID`` may be any frame of the conversation (a ``<thread>`` a listener or a client
saw, the conversation's own id included) or the ``<id>`` of the outside message that
started it, which its replies carry as ``<re>``: the root frame's first slot is that
message, recorded as it left the outside (``out``) under its id.

It reads the registry (every frame of the conversation: their chains share its root)
and the frames' histories of a backend that outlives the pump (``manager://``,
``redis://``), joined as any other process joins it, never served.

Everything printed comes from the store, which holds what outsiders sent (labels,
ids, payloads): in text, characters that are not printable (controls, terminal escape
sequences, bidirectional overrides) are shown as their code (``\\x1b``) and a
backslash as two; ``--json`` is ASCII.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..backends import Backend, Slot, backend_scheme, open_backend, redact_url
from ..config import Organism
from ..exceptions import BackendUnavailable, ConfigError
from ..frame import Frame, decode_frame
from ._common import _LOG_LEVELS, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, _add_log_format, _error
from .deadletters import joining_organism

__all__ = [
    "AmbiguousId",
    "Conversation",
    "FrameTree",
    "add_parser",
    "as_json",
    "find_conversation",
    "main",
    "printable",
    "write_tree",
]

_BATCH = 100  # histories read at once


@dataclass(slots=True)
class FrameTree:
    """One frame of a conversation, with its history and the frames it called.

    Attributes:
        uuid: the frame's id; None for a frame the registry no longer holds (evicted)
            whose callees it still holds.
        hops: listener names from the root to the frame's own (``()`` for the root).
        slots: its history, oldest first.
        children: the frames it called, in the order of their first slot.
    """

    uuid: str | None
    hops: tuple[str, ...]
    slots: list[Slot] = field(default_factory=list)
    children: list[FrameTree] = field(default_factory=list)

    @property
    def first(self) -> float:
        """When the frame's first kept slot was written (inf: none kept)."""
        own = self.slots[0].timestamp if self.slots else float("inf")
        return min([own, *(child.first for child in self.children)])


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation read back: its id (the root frame's), the outside sender's
    label, and the tree of its frames."""

    id: str
    origin: str
    root: FrameTree

    def frames(self) -> list[FrameTree]:
        """Every frame, depth first, the root first."""
        out: list[FrameTree] = []
        todo = [self.root]
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(reversed(node.children))
        return out


async def find_conversation(backend: Backend, wanted: str) -> Conversation | None:
    """The conversation ``wanted`` names (a frame's id, or the ``<id>``/``<re>`` of its
    first message), read from ``backend``; None if no conversation matches.

    One registry lookup, then a listing of the registry and one history read per
    frame of the conversation; an id that is not a frame's costs one history read
    per conversation in the registry.
    """
    chain = await backend.registry_get_chain(wanted)
    named = decode_frame(wanted, chain) if chain is not None else None
    chains = await backend.registry_list_all()
    frames = [
        frame
        for uuid, text in chains.items()
        if text.startswith("[") and (frame := decode_frame(uuid, text)) is not None
    ]
    if named is None:
        named = await _by_first_message(backend, frames, wanted)
        if named is None:
            return None
    root_id = named.root
    mine = [f for f in frames if f.root == root_id]
    histories = await _histories(backend, [f.uuid for f in mine])
    # The root frame's id is the conversation's, even if the registry lost its entry.
    root = FrameTree(root_id, (), histories.get(root_id, []))
    if root_id not in histories:
        root.slots = await backend.buffer_get_thread(root_id)
    nodes: dict[tuple[str, ...], FrameTree] = {(): root}
    for frame in sorted(mine, key=lambda f: len(f.hops)):
        if frame.hops:
            node = _node(nodes, frame.hops)
            node.uuid = frame.uuid
            node.slots = histories.get(frame.uuid, [])
    for node in nodes.values():
        node.children.sort(key=lambda child: (child.first, child.hops))
    return Conversation(root_id, named.origin, root)


def _node(nodes: dict[tuple[str, ...], FrameTree], hops: tuple[str, ...]) -> FrameTree:
    """The tree node of ``hops``, made (with any missing callers) if new."""
    node = nodes.get(hops)
    if node is None:
        node = nodes[hops] = FrameTree(None, hops)
        _node(nodes, hops[:-1]).children.append(node)
    return node


async def _histories(backend: Backend, uuids: list[str]) -> dict[str, list[Slot]]:
    out: dict[str, list[Slot]] = {}
    for i in range(0, len(uuids), _BATCH):
        batch = uuids[i : i + _BATCH]
        got = await asyncio.gather(*(backend.buffer_get_thread(u) for u in batch))
        out.update(zip(batch, got, strict=True))
    return out


async def _by_first_message(backend: Backend, frames: list[Frame], wanted: str) -> Frame | None:
    """The root frame whose first slot is the outside message ``wanted`` (one slot read
    per conversation).

    Raises:
        AmbiguousId: an ``<id>`` is unique per sender only: several senders used it.
    """
    roots = [f for f in frames if not f.hops and f.root == f.uuid]
    found: list[Frame] = []
    for i in range(0, len(roots), _BATCH):
        batch = roots[i : i + _BATCH]
        firsts = await asyncio.gather(*(backend.buffer_get_slot(f.uuid, 0) for f in batch))
        for frame, first in zip(batch, firsts, strict=True):
            if first is not None and first.direction == "out" and first.message_id == wanted:
                found.append(frame)
    if len(found) > 1:
        senders = ", ".join(sorted(printable(f.origin) for f in found))
        raise AmbiguousId(
            f"{len(found)} conversations have a first message with id "
            f"{printable(wanted)!r} (from {senders}): name one by its thread id"
        )
    return found[0] if found else None


class AmbiguousId(LookupError):
    """An outside ``<id>`` names the first message of several conversations."""


# -- output --------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` safe for a terminal: a backslash doubled, and every character that is
    not printable (controls, escape sequences, bidirectional overrides, lone
    surrogates) as its code: ``\\x1b``, ``\\u202e``; an undecodable byte kept by
    ``surrogateescape`` as ``\\xNN``."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _payload_text(xml: bytes) -> str:
    return printable(xml.decode("utf-8", "surrogateescape"))


def _when(timestamp: float) -> str:
    whole = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    return f"{whole}.{int(timestamp % 1 * 1000):03d}"


def _slot_line(slot: Slot, wanted: str) -> str:
    to = printable(slot.to) if slot.to is not None else "(all accepting)"
    mark = "  <= the id given" if slot.message_id == wanted else ""
    return (
        f"{slot.index:>3} {slot.direction:<3} {printable(slot.sender)} -> {to}  "
        f"{printable(slot.payload)}  id {printable(slot.message_id)}  "
        f"{_when(slot.timestamp)}{mark}"
    )


def write_tree(
    conversation: Conversation, out: IO[str], *, wanted: str = "", payloads: bool = False
) -> None:
    """Print ``conversation`` as a tree of frames, each frame's slots in order below it.

    Args:
        wanted: the id asked for: its frame and slots are marked.
        payloads: print each slot's payload (escaped) below it.
    """
    frames = conversation.frames()
    slots = sum(len(f.slots) for f in frames)
    print(f"conversation {printable(conversation.id)} from {printable(conversation.origin)}: "
          f"{len(frames)} frame(s), {slots} slot(s)", file=out)  # fmt: skip
    _write_node(conversation.root, conversation.origin, out, "", "", wanted, payloads)


def _write_node(
    node: FrameTree, origin: str, out: IO[str], head: str, body: str, wanted: str,
    payloads: bool,
) -> None:  # fmt: skip
    name = f"{printable(origin)} (outside)" if not node.hops else printable(node.hops[-1])
    uuid = printable(node.uuid) if node.uuid is not None else "(no longer in the registry)"
    mark = "  <= the id given" if node.uuid == wanted else ""
    print(f"{head}{name}  {uuid}{mark}", file=out)
    inner = body + ("│   " if node.children else "    ")
    if not node.slots:
        print(f"{inner}(no history kept)", file=out)
    for slot in node.slots:
        print(f"{inner}{_slot_line(slot, wanted)}", file=out)
        if payloads:
            print(f"{inner}      {_payload_text(slot.xml)}", file=out)
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        _write_node(child, origin, out, body + ("└── " if last else "├── "),
                    body + ("    " if last else "│   "), wanted, payloads)  # fmt: skip


def as_json(conversation: Conversation, *, payloads: bool = False) -> dict[str, Any]:
    """``conversation`` as a JSON-ready dict: ``{"conversation", "origin", "frame"}``,
    each frame ``{"thread", "listener", "hops", "slots", "children"}``."""

    def slot(s: Slot) -> dict[str, Any]:
        record: dict[str, Any] = {
            "index": s.index,
            "direction": s.direction,
            "from": s.sender,
            "to": s.to,
            "payload": s.payload,
            "message": s.message_id,
            "time": s.timestamp,
        }
        if payloads:
            record["xml"] = s.xml.decode("utf-8", "replace")
        return record

    def frame(node: FrameTree) -> dict[str, Any]:
        return {
            "thread": node.uuid,
            "listener": node.hops[-1] if node.hops else None,
            "hops": list(node.hops),
            "slots": [slot(s) for s in node.slots],
            "children": [frame(child) for child in node.children],
        }

    return {
        "conversation": conversation.id,
        "origin": conversation.origin,
        "frame": frame(conversation.root),
    }


# -- the command ---------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add the ``thread`` subcommand to the subparsers ``sub`` of the command line."""
    thread = sub.add_parser(
        "thread",
        help="print one conversation of a shared backend as a tree of frames and their slots",
        description="Print one conversation read from the organism's backend (manager:// "
        "or redis://): its frames as a tree, each with the slots of its history in order.",
    )
    thread.add_argument("organism", type=Path, help="the organism YAML file")
    thread.add_argument(
        "id",
        help="any frame (thread) of the conversation, or the <id> of its first message "
        "(the <re> of its replies)",
    )
    thread.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    thread.add_argument("--payloads", action="store_true", help="print each slot's payload")
    thread.add_argument("--json", action="store_true", help="one JSON object (ASCII)")
    thread.add_argument("--log-level", default="WARNING", type=str.upper, choices=_LOG_LEVELS)
    _add_log_format(thread)


def main(organism: Organism, args: argparse.Namespace) -> int:
    """Print the conversation ``args.id`` names. Returns the exit status."""
    try:
        if not backend_scheme(organism.backend).persistent:
            raise ConfigError(
                f"{redact_url(organism.backend)} keeps no history after its pump stops; "
                "thread reads a backend that does (manager://, redis://): --backend URL"
            )
        organism = joining_organism(organism)
    except (ConfigError, BackendUnavailable) as exc:
        _error(str(exc))
        return EXIT_USAGE
    with asyncio.Runner() as runner:
        try:
            conversation = runner.run(_read(organism, args.id))
        except AmbiguousId as exc:
            _error(str(exc))
            return EXIT_FAILURE
    if conversation is None:
        _error(
            f"no conversation in {redact_url(organism.backend)} has a frame or a first "
            f"message with id '{printable(args.id)}'"
        )
        return EXIT_FAILURE
    if args.json:
        sys.stdout.write(json.dumps(as_json(conversation, payloads=args.payloads)) + "\n")
    else:
        write_tree(conversation, sys.stdout, wanted=args.id, payloads=args.payloads)
    sys.stdout.flush()
    return EXIT_OK


async def _read(organism: Organism, wanted: str) -> Conversation | None:
    backend = open_backend(organism.backend, organism.history, **organism.backend_options)
    try:
        await backend.ping()
        return await find_conversation(backend, wanted)
    finally:
        await backend.aclose()
