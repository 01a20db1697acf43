"""The backend contract: history (context slots), the thread registry, dead letters.

Every backend implements :class:`Backend`. The method names are those of the
original ``ManagerBackend`` (``buffer_*``, ``registry_*``), as coroutines, plus
``registry_setdefault`` (atomic get-or-create of a frame), the dead-letter
methods and ``aclose``.

Records cross the backend boundary as plain, immutable values (:class:`Slot`,
:class:`DeadLetter`). A backend that stores bytes uses :func:`slot_to_bytes` /
:func:`slot_from_bytes`, a documented JSON format: nothing is ever pickled.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = [
    "Backend",
    "DeadLetter",
    "HistoryLimits",
    "OVER_BUDGET_NOTE",
    "SAMPLE_BYTES",
    "Slot",
    "dead_letter_from_bytes",
    "dead_letter_from_obj",
    "dead_letter_to_bytes",
    "letter_size",
    "over_budget",
    "redact_url",
    "slot_from_bytes",
    "slot_from_obj",
    "slot_to_bytes",
]

Direction = Literal["in", "out"]


class Slot(NamedTuple):
    """One entry of a frame's history.

    Attributes:
        index: position in the frame's history, counting trimmed slots (assigned
            by the backend; pass 0 to ``buffer_append``).
        direction: ``"in"`` (delivered on the frame) or ``"out"`` (emitted by its handler).
        sender: who sent the message (a listener name or an external label).
        to: the addressee (a listener name, an external label, or None for a broadcast).
        payload: the payload's routing key ``{namespace}local``.
        message_id: the message's id; ``(message_id, direction)`` is unique per frame.
        timestamp: seconds since the epoch.
        xml: the payload element, serialized.
    """

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose
    direction: Direction
    sender: str
    to: str | None
    payload: str
    message_id: str
    timestamp: float
    xml: bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be handled, kept with the reason.

    Attributes:
        id: the dead letter's own id (assigned by the backend when empty).
        timestamp: seconds since the epoch.
        code: the ``Huh`` code (``malformed``, ``handler-error``, ...).
        reason: a human-readable explanation.
        listener: the listener concerned, if any.
        thread_id: the frame concerned, if any.
        message_id: the message's id, if it got one.
        data: the original bytes, capped.
        sender: who sent the message (a listener or an outside label), if known.
        attempts: how many times it was refused (a replay refused again adds one).
        last_error: the latest refusal, ``"code: reason"``, when it was refused again
            (``code`` and ``reason`` stay those of the first).
        stage: where it failed: ``"ingress"`` (refused input), ``"delivery"`` (its
            handler failed on it, in ``thread_id``), ``"forward"`` or ``"response"``
            (a handler's output, emitted by ``listener`` in ``thread_id``, could not be
            routed) or ``"egress"`` (a reply that could not be written; ``data`` is its
            envelope). None when unknown (a letter from before it was recorded).
        re: the id of the outside message the failed one descends from (a reply's
            ``<re>``).
        to: the message's addressee, if it named one.
        payload_class: ``module:qualname`` of an egress letter's payload class.
        reply_thread: a delivery's reply frame: where an error about the message went
            (its caller's frame for a forward, the answering listener's for a response).
    """

    id: str
    timestamp: float
    code: str
    reason: str
    listener: str | None
    thread_id: str | None
    message_id: str | None
    data: bytes
    sender: str | None = None
    attempts: int = 1
    last_error: str | None = None
    stage: str | None = None
    re: str | None = None
    to: str | None = None
    payload_class: str | None = None
    reply_thread: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """Bounds on what a backend keeps.

    Attributes:
        max_slots_per_thread: oldest slots are trimmed past this (and counted).
        max_threads: least recently used frames are evicted past this (the memory
            store evicts up to 1 % of it, at most 64, at a time).
        ttl_s: idle time after which a shared backend may expire a frame (Redis).
        max_dead_letters: oldest dead letters are dropped past this (and counted).
        dead_letter_bytes: how much of the original input a dead letter keeps.
        dead_letter_budget_bytes: once the kept dead letters hold this many bytes, a
            rejection of input from outside (a letter of no listener and no frame)
            keeps only the first :data:`SAMPLE_BYTES` of its input, and is counted
            per code; letters of accepted work are always kept whole.
        dead_letter_ttl_s: a dead letter is dropped this long after it was written
            (0: kept until replayed, purged or pushed out by ``max_dead_letters``).
    """

    max_slots_per_thread: int = 10_000
    max_threads: int = 100_000
    ttl_s: float = 86_400.0
    max_dead_letters: int = 10_000
    dead_letter_bytes: int = 64 * 1024
    dead_letter_budget_bytes: int = 64 * 1024 * 1024
    dead_letter_ttl_s: float = 7 * 86_400.0


SAMPLE_BYTES = 256
"""What a rejection of outside input keeps of it once dead letters are over budget."""

OVER_BUDGET_NOTE = (
    f" [over the dead-letter budget: only the first {SAMPLE_BYTES} bytes of the input kept]"
)
"""Appended to the reason of a letter cut to its sample."""


def over_budget(letter: DeadLetter) -> DeadLetter | None:
    """What ``letter`` becomes past the dead-letter byte budget: its sample, or None
    if it is kept whole anyway (a letter of accepted work, or already a sample)."""
    if letter.listener is not None or letter.thread_id is not None:
        return None  # accepted work: never cut
    if letter.reason.endswith(OVER_BUDGET_NOTE):
        return None
    return dataclasses.replace(
        letter, data=letter.data[:SAMPLE_BYTES], reason=letter.reason + OVER_BUDGET_NOTE
    )


def letter_size(letter: DeadLetter) -> int:
    """The bytes a dead letter counts against the budget (its input and its reason)."""
    return len(letter.data) + len(letter.reason)


@runtime_checkable
class Backend(Protocol):
    """Async storage for frame histories, the thread registry and dead letters.

    A frame (thread) is named by an opaque UUID; the registry maps it to its
    *chain*, an opaque string the pump builds (a JSON list of hops), in both
    directions. All methods are coroutines and safe to call concurrently.
    """

    # -- history ---------------------------------------------------------------

    async def buffer_append(self, thread_id: str, slot: Slot) -> int:
        """Append ``slot`` to the frame's history and return its index.

        Idempotent: if a slot with the same ``(message_id, direction)`` is already
        in this frame's history, nothing is appended and its index is returned.
        Trims the oldest slots past ``max_slots_per_thread``.
        """
        ...

    async def buffer_contains(self, thread_id: str, message_id: str, direction: str) -> bool:
        """Whether the frame's kept history holds ``(message_id, direction)``."""
        ...

    async def buffer_get_thread(self, thread_id: str) -> list[Slot]:
        """Every kept slot of the frame, oldest first (``[]`` for an unknown frame)."""
        ...

    async def buffer_get_slot(self, thread_id: str, index: int) -> Slot | None:
        """The slot at ``index`` (as returned by append), or None if absent or trimmed."""
        ...

    async def buffer_thread_len(self, thread_id: str) -> int:
        """Number of kept slots of the frame."""
        ...

    async def buffer_thread_exists(self, thread_id: str) -> bool:
        """Whether the frame has a history."""
        ...

    async def buffer_delete_thread(self, thread_id: str) -> bool:
        """Delete the frame's history; True if it existed."""
        ...

    async def buffer_list_threads(self) -> list[str]:
        """The ids of every frame that has a history."""
        ...

    async def buffer_clear(self) -> None:
        """Delete every history."""
        ...

    # -- registry --------------------------------------------------------------

    async def registry_set(self, chain: str, uuid: str) -> None:
        """Map ``chain`` to ``uuid`` and back, replacing an older mapping."""
        ...

    async def registry_setdefault(self, chain: str, uuid: str) -> str:
        """Map ``chain`` to ``uuid`` unless it is mapped already; return the winner.

        Atomic: two callers racing on one chain get the same uuid.
        """
        ...

    async def registry_get_uuid(self, chain: str) -> str | None:
        """The uuid of a chain, or None."""
        ...

    async def registry_get_chain(self, uuid: str) -> str | None:
        """The chain of a uuid, or None."""
        ...

    async def registry_delete(self, uuid: str) -> bool:
        """Delete the mapping of ``uuid``; True if it existed."""
        ...

    async def registry_list_all(self) -> dict[str, str]:
        """Every mapping, uuid → chain."""
        ...

    async def registry_clear(self) -> None:
        """Delete every mapping."""
        ...

    # -- dead letters ----------------------------------------------------------

    async def deadletter_add(self, letter: DeadLetter) -> str:
        """Store a dead letter and return its id (``letter.id``, or a new one if empty).

        A letter whose id is already stored replaces it, keeping its place (so a
        retried write stores nothing twice). ``data`` is cut to ``dead_letter_bytes``.

        Bounded (see :class:`HistoryLimits`): letters older than ``dead_letter_ttl_s``
        are dropped; once the kept letters hold ``dead_letter_budget_bytes``, a
        rejection of outside input is kept as its sample (:func:`over_budget`) and
        counted per code in :meth:`info` (``dead_letters_over_budget`` and
        ``dead_letters_over_budget:<code>``).
        """
        ...

    async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Store several dead letters in one round trip; return their ids, in order.

        The same as calling :meth:`deadletter_add` for each letter in turn (ids are
        assigned the same way, a letter whose id is already stored replaces it in
        place, the oldest are dropped past ``max_dead_letters``), but in one call to
        the store: what a pump stopping with many messages queued writes at once.
        ``[]`` stores nothing and returns ``[]``.
        """
        ...

    async def deadletter_list(self, limit: int | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first, at most ``limit``."""
        ...

    async def deadletter_delete(self, letter_id: str) -> bool:
        """Delete one dead letter; True if it existed."""
        ...

    async def deadletter_purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        ...

    # -- lifecycle -------------------------------------------------------------

    async def ping(self) -> None:
        """Check the backend can be reached (connecting if needed), within a bounded time.

        Raises:
            BackendUnavailable: with a one-line reason.
        """
        ...

    async def info(self) -> dict[str, int]:
        """Counters: ``buffer_threads``, ``registry_entries``, ``dead_letters``,
        ``dead_letter_bytes`` (counted against the budget), ``dead_letters_dropped``,
        ``dead_letters_over_budget`` (and per code), ..."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...

    async def close(self) -> None:
        """Alias of :meth:`aclose`, the original name."""
        ...


# -- the documented byte format --------------------------------------------------
#
# A slot is one JSON object (UTF-8):
#   {"i": index, "d": "in"|"out", "f": sender, "t": to-or-null, "p": payload qname,
#    "m": message id, "ts": timestamp, "x": base64 of the payload XML}
# A dead letter is one JSON object:
#   {"id", "ts", "code", "reason", "listener", "thread", "message", "data": base64}


_json = json.JSONEncoder(separators=(",", ":")).encode


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for showing.

    Both places a password can be are covered: ``scheme://user:PASSWORD@host`` and
    a ``password=`` query parameter (``unix:///run/redis.sock?password=PASSWORD``).
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    hide_query = any(key == "password" for key, _ in query)
    if password is None and not hide_query:
        return url
    # Rebuilt by hand: urlunsplit would drop the empty authority of "unix:///path".
    head, sep, rest = url.partition("?")
    if password is not None:
        head = head.replace(f":{password}@", ":***@", 1)
    if hide_query:
        tail = "#" + parts.fragment if parts.fragment else ""
        hidden = [(k, "***" if k == "password" else v) for k, v in query]
        rest = urlencode(hidden, safe="*") + tail
    return head + sep + rest


_str = json.encoder.encode_basestring_ascii  # what _json does to one string


def slot_to_bytes(slot: Slot) -> bytes:
    """Serialize a slot to the documented JSON format."""
    ts = slot.timestamp
    if type(ts) is float and math.isfinite(ts) and type(slot.index) is int:
        # The same bytes as the general case below, without building a dict.
        to = "null" if slot.to is None else _str(slot.to)
        x = base64.b64encode(slot.xml).decode("ascii")
        return (
            f'{{"i":{slot.index},"d":{_str(slot.direction)},"f":{_str(slot.sender)},'
            f'"t":{to},"p":{_str(slot.payload)},"m":{_str(slot.message_id)},'
            f'"ts":{float.__repr__(ts)},"x":"{x}"}}'
        ).encode()
    return _json(
        {
            "i": slot.index,
            "d": slot.direction,
            "f": slot.sender,
            "t": slot.to,
            "p": slot.payload,
            "m": slot.message_id,
            "ts": slot.timestamp,
            "x": base64.b64encode(slot.xml).decode("ascii"),
        }
    ).encode()


def slot_from_bytes(data: bytes) -> Slot:
    """Parse a slot from the documented JSON format. Raises ValueError."""
    return slot_from_obj(json.loads(data))


def slot_from_obj(obj: Any) -> Slot:
    """A slot from the documented JSON object, already parsed. Raises ValueError."""
    try:
        direction = obj["d"]
        if direction not in ("in", "out"):
            raise ValueError(f"bad slot direction {direction!r}")
        return Slot(
            int(obj["i"]),
            direction,
            str(obj["f"]),
            None if obj["t"] is None else str(obj["t"]),
            str(obj["p"]),
            str(obj["m"]),
            float(obj["ts"]),
            base64.b64decode(obj["x"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a slot: {exc}") from exc


_OPTIONAL = (
    ("sender", "sender"),
    ("last_error", "last_error"),
    ("stage", "stage"),
    ("re", "re"),
    ("to", "to"),
    ("payload_class", "class"),
    ("reply_thread", "reply"),
)
"""Optional string fields of a dead letter: (attribute, JSON key), left out when None."""


def dead_letter_to_bytes(letter: DeadLetter) -> bytes:
    """Serialize a dead letter to the documented JSON format."""
    return _json(
        {
            "id": letter.id,
            "ts": letter.timestamp,
            "code": letter.code,
            "reason": letter.reason,
            "listener": letter.listener,
            "thread": letter.thread_id,
            "message": letter.message_id,
            "data": base64.b64encode(letter.data).decode("ascii"),
            **({"attempts": letter.attempts} if letter.attempts != 1 else {}),
            **{key: v for attr, key in _OPTIONAL if (v := getattr(letter, attr)) is not None},
        }
    ).encode()


def dead_letter_from_bytes(data: bytes) -> DeadLetter:
    """Parse a dead letter from the documented JSON format. Raises ValueError."""
    return dead_letter_from_obj(json.loads(data))


def dead_letter_from_obj(obj: Any) -> DeadLetter:
    """A dead letter from the documented JSON object, already parsed. Raises ValueError."""
    try:
        return DeadLetter(
            id=str(obj["id"]),
            timestamp=float(obj["ts"]),
            code=str(obj["code"]),
            reason=str(obj["reason"]),
            listener=obj.get("listener"),
            thread_id=obj.get("thread"),
            message_id=obj.get("message"),
            data=base64.b64decode(obj["data"]),
            attempts=int(obj.get("attempts", 1)),
            **{attr: obj.get(key) for attr, key in _OPTIONAL},
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a dead letter: {exc}") from exc
