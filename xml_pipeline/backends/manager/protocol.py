"""The manager's wire protocol, shared by the server and the client: framing, the
mutual HMAC handshake, the JSON codec and the two slot encodings.

Framing is :mod:`multiprocessing.connection`'s (a signed 4-byte big-endian length,
or -1 and an unsigned 8-byte length past 2 GiB, then the bytes), so that a peer
holding a ``multiprocessing.connection.Connection`` can speak to either side with
``send_bytes``/``recv_bytes``. The handshake is that module's
``deliver_challenge``/``answer_challenge``, spoken here over a pair of callables
that read and write one frame (asyncio streams on the client, the session protocol
on the server): both
the ``{digest}``-prefixed form of Python 3.12+ and the bare HMAC-MD5 of earlier
versions are understood; what this side sends is ``{sha256}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import operator
import os
import struct
from collections.abc import Awaitable, Callable
from multiprocessing import AuthenticationError
from typing import Any

import pydantic_core

from ..base import Slot, slot_from_obj
from ..scheme import ManagerOptions

__all__ = [
    "AUTHKEY_ENV",
    "HANDSHAKE_FRAME_BYTES",
    "FrameBuffer",
    "FrameTooLarge",
    "ReadFrame",
    "WriteFrame",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_CALLS",
    "PROTOCOL",
    "SLOT_KEYS",
    "answer_challenge",
    "decode_rows",
    "decode_slots",
    "deliver_challenge",
    "display",
    "dumps",
    "encode_rows",
    "encode_string",
    "fast_slot",
    "frame",
    "loads",
    "parse_address",
    "read_frame",
    "reason",
]

AUTHKEY_ENV = "XML_PIPELINE_MANAGER_AUTHKEY"
"""The environment variable holding the authkey when no ``authkey`` option is given."""

PROTOCOL = 2
"""The wire protocol version, checked by ``hello``. 2: the answer to ``hello`` names the
server's ``max_request_bytes``, which the client keeps every request frame under (a
server still accepts clients of protocol 1)."""

_DEFAULTS = ManagerOptions()

MAX_REQUEST_BYTES = _DEFAULTS.max_request_bytes
"""The default largest request frame a server reads (8 MiB; its ``max_request_bytes``;
before authentication: 256 bytes). See :class:`~xml_pipeline.backends.ManagerOptions`."""

MAX_CONNECTIONS = _DEFAULTS.max_connections
"""The default number of clients a server keeps at once (its ``max_connections``)."""

MAX_REQUEST_CALLS = 4096
"""The most calls one request frame may hold (a client sends at most 1,024): a frame
of millions of tiny calls is refused before any runs, instead of holding the server's
thread for seconds and making an answer many times its size."""

HANDSHAKE_FRAME_BYTES = 256
"""The largest frame either side reads before the peer has proved it holds the key."""

SLOT_KEYS = ("i", "d", "f", "t", "p", "m", "ts", "x")
"""slot_to_bytes's keys, in :class:`~xml_pipeline.backends.base.Slot`'s order."""

_dumps = json.JSONEncoder(separators=(",", ":")).encode
encode_string = json.encoder.encode_basestring_ascii
"""What :func:`dumps` does to one string (a quoted, escaped JSON string)."""

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")
_CHALLENGE = b"#CHALLENGE#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"
_DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})
_MD5_LEN = 16

_slot_fields = operator.itemgetter(*SLOT_KEYS)
_new_slot = tuple.__new__
_a2b = binascii.a2b_base64
_ESCAPE = "surrogateescape"


# -- values ----------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return _dumps(value).encode()


def loads(data: bytes) -> Any:
    """Parse one JSON frame. Raises ValueError."""
    # pydantic-core's parser (a dependency already) is about twice as fast as the json
    # module on frames of slots, keys cached; json covers what it refuses (lone
    # surrogates that json.dumps escaped).
    try:
        return pydantic_core.from_json(data, cache_strings="keys")
    except ValueError:
        return json.loads(data)


def encode_rows(slots: list[Slot]) -> bytes:
    """Slots as ``ROW`` arrays: ``[i, d, f, t, p, m, ts, xml]``, the XML as a string
    (its bytes decoded as UTF-8 with ``surrogateescape``, so any bytes round-trip).

    A client parses arrays about twice as fast as the objects of
    :func:`~xml_pipeline.backends.base.slot_to_bytes`, and a string faster than
    base64 (measured: 50 slots, 25 µs instead of 32 to parse and build).
    """
    return dumps([(*slot[:7], slot.xml.decode("utf-8", "surrogateescape")) for slot in slots])


def decode_rows(value: Any) -> list[Slot]:
    """Slots from parsed ``ROW`` arrays. Raises ValueError on anything else.

    One ``tuple.__new__`` and one ``str.encode`` a slot for what :func:`encode_rows`
    writes; anything else is checked by ``slot_from_obj``.
    """
    slots: list[Slot] = []
    append = slots.append
    for row in value:
        try:
            i, d, f, t, p, m, ts, x = row
            if type(i) is int and type(ts) is float and (d == "in" or d == "out"):
                append(_new_slot(Slot, (i, d, f, t, p, m, ts, x.encode("utf-8", _ESCAPE))))
                continue
        except (TypeError, ValueError, AttributeError):
            pass
        if type(row) is not list or len(row) != 8 or type(row[7]) is not str:
            raise ValueError(f"not a slot row: {str(row)[:80]!r}")
        obj = dict(zip(SLOT_KEYS, row, strict=True))
        obj["x"] = base64.b64encode(row[7].encode("utf-8", _ESCAPE)).decode("ascii")
        append(slot_from_obj(obj))
    return slots


def decode_slots(value: Any) -> list[Slot]:
    """Slots from parsed ``SLOT`` objects (what ``slot_to_bytes`` writes).

    ~0.6 µs a slot where ``slot_from_obj`` takes ~1.2 µs for what the server writes;
    anything else goes through ``slot_from_obj``, which checks every field.
    """
    slots: list[Slot] = []
    append = slots.append
    for obj in value:
        try:
            i, d, f, t, p, m, ts, x = _slot_fields(obj)
            if type(i) is int and type(ts) is float and (d == "in" or d == "out"):
                append(_new_slot(Slot, (i, d, f, t, p, m, ts, _a2b(x))))
                continue
        except (KeyError, TypeError, ValueError):
            pass
        append(slot_from_obj(obj))
    return slots


def fast_slot(value: Any) -> Slot | None:
    """A slot from a parsed ``SLOT`` object of exactly the written types, else None."""
    try:
        i, d, f, t, p, m, ts, x = _slot_fields(value)
    except KeyError:
        return None
    if (
        type(i) is int
        and (d == "in" or d == "out")
        and type(f) is str
        and (t is None or type(t) is str)
        and type(p) is str
        and type(m) is str
        and type(ts) is float
        and type(x) is str
    ):
        return _new_slot(Slot, (i, d, f, t, p, m, ts, _a2b(x)))
    return None


# -- addresses and errors --------------------------------------------------------------


def reason(exc: BaseException) -> str:
    """A short, lower-case reason (``address already in use``)."""
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        text = os.strerror(exc.errno) if exc.errno else str(exc.strerror)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def display(address: tuple[str, int]) -> str:
    """``manager://HOST:PORT`` (``manager://[::1]:PORT`` for IPv6)."""
    host, port = address
    return f"manager://[{host}]:{port}" if ":" in host else f"manager://{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a ``(host, port)`` pair.

    Raises:
        ValueError: not of that form, or the port is not 0-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port_text)


# -- framing ---------------------------------------------------------------------------


def frame(data: bytes) -> bytes:
    """``data`` with its length header."""
    size = len(data)
    if size > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(size) + data
    return _HEADER.pack(size) + data


class FrameTooLarge(ValueError):
    """A frame's header announces more bytes than the reader accepts (nothing of it
    was buffered beyond what had already arrived)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a frame of {size} bytes")
        self.size = size
        self.limit = limit


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One frame from a stream. FrameTooLarge: larger than ``limit``; IncompleteReadError: EOF."""
    (size,) = _HEADER.unpack(await reader.readexactly(4))
    if size == -1:
        (size,) = _LONG_HEADER.unpack(await reader.readexactly(8))
    if size < 0 or size > limit:
        raise FrameTooLarge(size, limit)
    return await reader.readexactly(size)


class FrameBuffer:
    """The bytes an ``asyncio.Protocol`` received, cut into frames.

    :meth:`feed` what ``data_received`` got, then take frames with :meth:`next` until
    it returns None. A chunk holding whole frames is sliced without a copy of the
    rest; a frame arriving in pieces is gathered in one ``bytearray``.

    Args:
        limit: the largest frame accepted (may be raised later, e.g. after the handshake).
    """

    __slots__ = ("_data", "_pos", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data: bytes | bytearray = b""
        self._pos = 0

    def __len__(self) -> int:
        """Bytes received and not yet taken as frames."""
        return len(self._data) - self._pos

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        pending = self._data
        if self._pos >= len(pending):
            self._data, self._pos = data, 0
            return
        if type(pending) is bytearray:
            if self._pos:
                del pending[: self._pos]
                self._pos = 0
            pending += data
        else:
            self._data = bytearray(memoryview(pending)[self._pos :])
            self._data += data
            self._pos = 0

    def next(self) -> bytes | None:
        """The next whole frame, or None until more bytes come.

        Raises:
            FrameTooLarge: the next frame's header announces more than :attr:`limit`
                (raised from the header alone: the frame is never gathered).
        """
        data, pos = self._data, self._pos
        end = len(data)
        if end - pos < 4:
            return None
        (size,) = _HEADER.unpack_from(data, pos)
        start = pos + 4
        if size == -1:
            if end - start < 8:
                return None
            (size,) = _LONG_HEADER.unpack_from(data, start)
            start += 8
        if size < 0 or size > self.limit:
            raise FrameTooLarge(size, self.limit)
        stop = start + size
        if stop > end:
            return None
        if stop == end:  # all taken: hold on to nothing
            self._data, self._pos = b"", 0
        else:
            self._pos = stop
        if isinstance(data, bytearray):
            return bytes(memoryview(data)[start:stop])
        return data[start:stop]


# -- the handshake ---------------------------------------------------------------------

ReadFrame = Callable[[], Awaitable[bytes]]
"""Awaits the peer's next frame (at most :data:`HANDSHAKE_FRAME_BYTES` during the
handshake; ValueError past it, ``EOFError`` when the peer hung up)."""
WriteFrame = Callable[[bytes], None]
"""Sends one frame to the peer."""


def _digest_name(data: bytes) -> str | None:
    """The digest a ``{name}...`` challenge or answer names; None: legacy HMAC-MD5."""
    if data.startswith(b"{"):
        end = data.find(b"}", 1, 22)
        if end > 0:
            name = data[1:end].decode("ascii", "replace")
            if name in _DIGESTS:
                return name
    return None


async def deliver_challenge(read: ReadFrame, write: WriteFrame, authkey: bytes) -> None:
    """Challenge the peer to prove it holds ``authkey`` (the server's first half).

    Raises:
        AuthenticationError: the peer's answer is wrong.
        ValueError: the peer does not speak the handshake.
        EOFError: the peer hung up.
    """
    challenge = b"{sha256}" + os.urandom(40)
    write(_CHALLENGE + challenge)
    answer = await read()
    name = "md5" if len(answer) == _MD5_LEN else _digest_name(answer)
    if name is not None and name != "md5":
        answer = answer[len(name) + 2 :]
    expected = hmac.new(authkey, challenge, name or "md5").digest()
    if name is None or not hmac.compare_digest(expected, answer):
        write(_FAILURE)
        raise AuthenticationError("digest received was wrong")
    write(_WELCOME)


async def answer_challenge(read: ReadFrame, write: WriteFrame, authkey: bytes) -> None:
    """Prove to the peer that this side holds ``authkey`` (the client's first half).

    Raises:
        AuthenticationError: the peer rejected the answer (a different key).
        ValueError: the peer does not speak the handshake.
        EOFError: the peer hung up.
    """
    message = await read()
    if not message.startswith(_CHALLENGE):
        raise ValueError("the peer did not send a challenge")
    message = message[len(_CHALLENGE) :]
    name = _digest_name(message)
    mac = hmac.new(authkey, message, name or "md5").digest()
    write(b"{%s}%s" % (name.encode(), mac) if name else mac)
    if await read() != _WELCOME:
        raise AuthenticationError("digest sent was rejected")
