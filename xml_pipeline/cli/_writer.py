"""How ``run`` writes replies: :class:`ReplyWriter`.

A thread does plain blocking writes from a bounded buffer, so a slow reader of
stdout never stalls the event loop (timers and other handlers keep running), and a
full buffer makes egress wait, which holds back the handlers that answer and,
through the bounded queues, ingress. When the reader goes away (``| head -1``) the
run stops as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
from collections.abc import Awaitable, Callable

__all__ = ["ReplyWriter"]


class ReplyWriter:
    """Writes to a file descriptor from a thread of its own, with backpressure.

    :meth:`write` never blocks the event loop: it queues the bytes for the thread,
    and returns an awaitable once more than ``high_water`` bytes wait, which
    completes when the thread has brought them down to ``low_water``. Awaiting it
    from egress holds back the handler that answered and, through the bounded
    inboxes, ingress, while timers and other listeners keep running.

    Why a thread rather than the loop's pipe transport: ``connect_write_pipe``
    puts the descriptor in non-blocking mode, and that flag belongs to the open
    file description that stdout shares with stderr (``2>&1``), with the shell's
    terminal and with other processes writing to the same pipe; their ordinary
    writes would then fail with EAGAIN. Plain blocking writes in a thread change
    nothing outside this process, and work alike for pipes, sockets, terminals and
    regular files (a slow disk or a stopped terminal cannot stall the loop either).
    """

    def __init__(
        self,
        fd: int,
        on_error: Callable[[OSError], None],
        *,
        high_water: int = 256 * 1024,
        low_water: int = 64 * 1024,
    ) -> None:
        self._fd = fd
        self._on_error = on_error
        self._high = high_water
        self._low = low_water
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Guarded by the lock: what waits to be written, its size (with what is
        # being written), whether write() waits for room, whether to stop.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._blocked = False
        self._closing = False
        # Loop side only (the thread reaches them through call_soon_threadsafe).
        self._room = asyncio.Event()
        self._room.set()
        self._ended = asyncio.Event()
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="xml_pipeline stdout", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> Awaitable[None] | None:
        """Queue ``data``; return an awaitable to wait on when the buffer is full.

        Raises:
            OSError: an earlier write failed (BrokenPipeError: the reader is gone).
        """
        if self.error is not None:
            raise type(self.error)(self.error.errno, self.error.strerror)
        with self._lock:
            self._chunks.append(data)
            self._buffered += len(data)
            full = self._buffered > self._high
            if full and not self._blocked:
                self._blocked = True
                self._room.clear()
            self._wake.notify()
        return self._wait_for_room() if full else None

    async def _wait_for_room(self) -> None:
        await self._room.wait()
        if self.error is not None:
            raise type(self.error)(self.error.errno, self.error.strerror)

    def close(self) -> None:
        """Let the thread write what is queued and end; do not wait for it."""
        with self._lock:
            self._closing = True
            self._wake.notify()

    async def aclose(self) -> None:
        """Write everything queued, then end the thread."""
        self.close()
        await self._ended.wait()

    def _run(self) -> None:
        error: OSError | None = None
        try:
            while True:
                with self._lock:
                    while not self._chunks and not self._closing:
                        self._wake.wait()
                    if not self._chunks:
                        return
                    chunks, self._chunks = self._chunks, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._write_all(data)
                with self._lock:
                    self._buffered -= len(data)
                    room = self._blocked and self._buffered <= self._low
                    if room:
                        self._blocked = False
                if room:
                    self._call(self._open_room)
        except OSError as exc:
            error = exc
        finally:
            self._call(self._end, error)

    def _open_room(self) -> None:
        # On the loop: write() may have filled the buffer again since the thread
        # decided there was room, so decide again, under the lock.
        with self._lock:
            if not self._blocked:
                self._room.set()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                # Someone made the shared description non-blocking (the loop's stdin
                # reader does, when stdin and stdout are one terminal): wait for room.
                select.select([], [self._fd], [])
                continue
            view = view[written:]

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(fn, *args)

    def _end(self, error: OSError | None) -> None:
        if error is not None:
            self.error = error
            self._room.set()
            self._on_error(error)
        self._ended.set()
