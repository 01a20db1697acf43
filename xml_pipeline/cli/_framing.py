"""How ``run --input`` is cut into messages (``--framing``).

- ``lines`` (default): one message per line; blank lines are skipped
  (:class:`LineSplitter`).
- ``xml``: consecutive top-level XML documents, so pretty-printed, multi-line
  documents work. A small byte-level splitter (:class:`DocumentSplitter`) finds
  where each document ends (tags with quoted attributes, comments, CDATA,
  processing instructions, element depth) without parsing: only
  ``pump.inject`` parses, with the project's hardened parser. Text between
  documents is answered like a malformed document.

In both, an item longer than ``pump.max_message_bytes`` comes as :data:`TOO_LARGE`
(``run`` answers it with a ``Huh``, ``too-large``, and reads on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from typing import IO

__all__ = ["TOO_LARGE", "DocumentSplitter", "LineSplitter", "items"]


TOO_LARGE = object()  # stands for an item longer than the cap, which was skipped


async def _chunks(source: str) -> AsyncIterator[bytes]:
    stream: IO[bytes]
    if source == "-":
        stream = sys.stdin.buffer
        close = False
    else:
        stream = open(source, "rb")  # noqa: SIM115, ASYNC230 - closed below; a local file
        close = True
    try:
        mode = os.fstat(stream.fileno()).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stream.isatty()):
            # Files and devices such as /dev/null cannot be watched by the event loop:
            # read them directly, a chunk at a time.
            while chunk := stream.read(65536):
                yield chunk
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        # The loop's pipe reader makes the descriptor non-blocking, a flag of the open
        # file description (which a terminal shares with stdout, stderr and the shell):
        # put it back as it was when done.
        blocking = os.get_blocking(stream.fileno())
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), stream
        )
        try:
            while chunk := await reader.read(65536):
                yield chunk
        finally:
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(stream.fileno(), blocking)
            transport.close()
    finally:
        if close:
            stream.close()


class LineSplitter:
    """Cuts a byte stream into lines; an over-long line is skipped as ``TOO_LARGE``."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buf = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[bytes | object]:
        items: list[bytes | object] = []
        buf = self._buf
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not self._skipping:
                    buf += chunk[start:]
                    if len(buf) > self._cap:
                        buf.clear()
                        self._skipping = True
                        items.append(TOO_LARGE)
                return items
            if self._skipping:
                self._skipping = False
            elif len(buf) + end - start > self._cap:  # every line, not only long chunks
                buf.clear()
                items.append(TOO_LARGE)
            else:
                buf += chunk[start:end]
                items.append(bytes(buf))
                buf.clear()
            start = end + 1

    def close(self) -> list[bytes | object]:
        items: list[bytes | object] = []
        if self._buf and not self._skipping:
            items.append(bytes(self._buf))
        self._buf.clear()
        return items


# Modes of the document splitter.
_BETWEEN, _GARBAGE, _TEXT, _TAG, _COMMENT, _CDATA, _PI, _DECL = range(8)
# What a "<" opens.
_OPEN_COMMENT, _OPEN_CDATA, _OPEN_XML_DECL, _OPEN_PI, _OPEN_DECL, _OPEN_END, _OPEN_START = range(7)
_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_TAG_STOP = re.compile(rb"[>\"']")
_CLOSE = {_COMMENT: b"-->", _CDATA: b"]]>", _PI: b"?>"}


class DocumentSplitter:
    """Cuts a byte stream into consecutive top-level XML documents, without parsing them.

    It follows only what decides where a document ends: start, end and empty-element
    tags (with ``>`` inside quoted attribute values), comments, CDATA sections,
    processing instructions and declarations, and the element depth. Whether a
    document is well-formed is for the parser to say when it is injected. Between
    documents, whitespace, comments and processing instructions are skipped; other
    text up to the next ``<`` is an item of its own (answered as malformed). An XML
    declaration inside a document starts a new one, so a truncated document does
    not swallow the rest of the stream. An item longer than ``cap`` bytes is
    dropped while it is read and reported as ``TOO_LARGE``.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buf = bytearray()
        self._pos = 0  # where scanning resumes
        self._start: int | None = None  # where the current item begins
        self._mode = _BETWEEN
        self._in_doc = False
        self._depth = 0
        self._root_seen = False
        self._end_tag = False
        self._quote = 0  # the quote byte a tag or declaration is inside, or 0
        self._brackets = 0  # [ ] nesting in a DOCTYPE declaration
        self._skipping = False  # the current item is over the cap: not kept
        self.items: list[bytes | object] = []

    def feed(self, chunk: bytes) -> list[bytes | object]:
        self._buf += chunk
        self._scan(final=False)
        return self._take()

    def close(self) -> list[bytes | object]:
        self._scan(final=True)
        if self._start is not None and not self._skipping:
            rest = bytes(self._buf[self._start :]).strip(_WHITESPACE)
            if rest:
                self.items.append(rest)
        self._start = None
        self._buf.clear()
        self._pos = 0
        return self._take()

    def _take(self) -> list[bytes | object]:
        items, self.items = self.items, []
        return items

    def _begin(self, at: int, mode: int, *, in_doc: bool = True) -> None:
        self._start = at
        self._mode = mode
        self._in_doc = in_doc
        self._depth = 0
        self._root_seen = False
        self._skipping = False

    def _finish(self, end: int) -> None:
        """The current item ends before ``end``."""
        assert self._start is not None
        if self._skipping:
            self._skipping = False
        elif end - self._start > self._cap:
            self.items.append(TOO_LARGE)
        else:
            data = bytes(self._buf[self._start : end])
            # XML whitespace only: b"\x0b" (say) is garbage, not space to strip.
            self.items.append(data if self._in_doc else data.rstrip(_WHITESPACE))
        self._start = None
        self._in_doc = False
        self._mode = _BETWEEN

    def _opens(self, at: int, final: bool) -> int | None:
        """What the ``<`` at ``at`` opens; None when more bytes are needed to tell."""
        buf = self._buf
        have = len(buf) - at
        if have < 2:
            return None if not final else _OPEN_START
        second = buf[at + 1]
        if second == 0x2F:  # </
            return _OPEN_END
        if second == 0x3F:  # <?
            if have < 6 and not final:
                return None
            declaration = buf.startswith(b"<?xml", at) and have > 5 and buf[at + 5] in _WHITESPACE
            return _OPEN_XML_DECL if declaration else _OPEN_PI
        if second != 0x21:  # not <!
            return _OPEN_START
        if have < 3:
            return None if not final else _OPEN_DECL
        if buf[at + 2] == 0x2D:  # <!-
            if have < 4 and not final:
                return None
            return _OPEN_COMMENT if buf.startswith(b"<!--", at) else _OPEN_DECL
        if buf[at + 2] == 0x5B:  # <![
            if have < 9 and not final:
                return None
            return _OPEN_CDATA if buf.startswith(b"<![CDATA[", at) else _OPEN_DECL
        return _OPEN_DECL

    def _scan(self, *, final: bool) -> None:
        buf = self._buf
        i = self._pos
        n = len(buf)
        while i < n:
            mode = self._mode
            if mode == _BETWEEN:
                while i < n and buf[i] in _WHITESPACE:
                    i += 1
                if i == n:
                    break
                if buf[i] != 0x3C:  # not "<"
                    if buf.startswith(_BOM, i):
                        i += len(_BOM)
                        continue
                    if n - i < len(_BOM) and _BOM.startswith(buf[i:]) and not final:
                        break
                    self._begin(i, _GARBAGE, in_doc=False)
                    i += 1
                    continue
                opens = self._opens(i, final)
                if opens is None:
                    break
                if opens == _OPEN_COMMENT:  # between documents: skipped
                    self._mode, i = _COMMENT, i + 4
                elif opens == _OPEN_PI:
                    self._mode, i = _PI, i + 2
                elif opens == _OPEN_END:  # an end tag with no document: garbage
                    self._begin(i, _GARBAGE, in_doc=False)
                    i += 2
                else:
                    self._begin(i, _TEXT)
            elif mode == _GARBAGE:
                end = buf.find(b"<", i)
                if end < 0:
                    i = n
                    break
                self._finish(end)
                i = end
            elif mode == _TEXT:
                lt = buf.find(b"<", i)
                if lt < 0:
                    i = n
                    break
                opens = self._opens(lt, final)
                if opens is None:
                    i = lt
                    break
                if opens == _OPEN_COMMENT:
                    self._mode, i = _COMMENT, lt + 4
                elif opens == _OPEN_CDATA:
                    self._mode, i = _CDATA, lt + 9
                elif opens in (_OPEN_PI, _OPEN_XML_DECL):
                    # (While skipping, the item's start was moved up to the bytes
                    # still kept, so it may equal lt: a declaration there starts
                    # the next document all the same.)
                    if opens == _OPEN_XML_DECL and (self._skipping or lt != self._start):
                        self._finish(lt)  # a truncated document: a new one begins here
                        self._begin(lt, _TEXT)
                    self._mode, i = _PI, lt + 2
                elif opens == _OPEN_DECL:
                    self._mode, self._quote, self._brackets, i = _DECL, 0, 0, lt + 2
                else:
                    self._end_tag = opens == _OPEN_END
                    self._mode, self._quote, i = _TAG, 0, lt + 1
            elif mode == _TAG:
                i = self._scan_tag(i)
                if i < 0:
                    i = n
                    break
            elif mode == _DECL:
                i = self._scan_declaration(i)
            else:  # a comment, CDATA section or processing instruction
                close = _CLOSE[mode]
                end = buf.find(close, i)
                if end < 0:
                    i = max(i, n - len(close) + 1)
                    break
                i = end + len(close)
                self._mode = _TEXT if self._in_doc else _BETWEEN
        self._pos = i
        self._check_cap()
        self._compact()

    def _scan_declaration(self, i: int) -> int:
        """Scan a ``<!DOCTYPE …>`` (its internal subset in ``[ ]``) from ``i``."""
        buf = self._buf
        n = len(buf)
        while i < n:
            c = buf[i]
            i += 1
            if self._quote:
                if c == self._quote:
                    self._quote = 0
            elif c in b"\"'":
                self._quote = c
            elif c == 0x5B:  # [
                self._brackets += 1
            elif c == 0x5D:  # ]
                self._brackets = max(0, self._brackets - 1)
            elif c == 0x3E and not self._brackets:  # >
                self._mode = _TEXT
                break
        return i

    def _scan_tag(self, i: int) -> int:
        """Scan a tag from ``i``; return where scanning goes on, or -1 to wait for more."""
        buf = self._buf
        while True:
            if self._quote:
                end = buf.find(bytes((self._quote,)), i)
                if end < 0:
                    return -1
                self._quote = 0
                i = end + 1
                continue
            found = _TAG_STOP.search(buf, i)
            if found is None:
                return -1
            i = found.end()
            if buf[i - 1] != 0x3E:  # a quote opens
                self._quote = buf[i - 1]
                continue
            break
        if self._end_tag:
            if self._depth == 0:  # an end tag without a start: the document is broken
                self._finish(i)
                return i
            self._depth -= 1
        elif buf[i - 2] != 0x2F:  # not "/>": an element opens
            self._depth += 1
            self._root_seen = True
        else:
            self._root_seen = True
        if self._depth == 0 and self._root_seen:
            self._finish(i)
        else:
            self._mode = _TEXT
        return i

    def _check_cap(self) -> None:
        if self._start is None or self._skipping:
            return
        if len(self._buf) - self._start > self._cap:
            self._skipping = True
            self.items.append(TOO_LARGE)

    def _compact(self) -> None:
        """Drop the bytes no item needs any more (all of them while skipping)."""
        keep = self._pos if self._start is None or self._skipping else self._start
        if keep:
            del self._buf[:keep]
            self._pos -= keep
            if self._start is not None:
                self._start = max(0, self._start - keep)


async def items(source: str, framing: str, cap: int) -> AsyncIterator[bytes | object]:
    """The messages of ``source``; an over-long one comes as ``TOO_LARGE``."""
    splitter = DocumentSplitter(cap) if framing == "xml" else LineSplitter(cap)
    async for chunk in _chunks(source):
        for item in splitter.feed(chunk):
            yield item
    for item in splitter.close():
        yield item
