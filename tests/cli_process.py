"""Run ``python -m xml_pipeline`` as a real process and wait for what it says, not for time.

Helpers here raise (``TimeoutError``, ``RuntimeError``) instead of asserting, so a
test that uses them fails with a message that says what did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Return once ``condition()`` is true; poll it every few milliseconds.

    Raises:
        TimeoutError: it stayed false for ``timeout`` seconds (``what`` says what).
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


async def until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30.0
) -> None:
    """:func:`wait_until` for async tests: ``condition`` may be a coroutine function
    (it is awaited); the event loop runs meanwhile.

    Raises:
        TimeoutError: it stayed false for ``timeout`` seconds (``what`` says what).
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen within {timeout:g} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    """Wait until ``path`` exists and is not empty; return its text."""
    wait_until(lambda: path.exists() and path.stat().st_size > 0, f"file {path}", timeout)
    return path.read_text()


class CliProcess:
    """``python -m xml_pipeline *args`` with stdin and stdout as pipes of the test.

    Its stderr is read by a thread as it comes, so the test can wait for a line
    (``wait_for_stderr``) without the pipe ever filling up.
    """

    def __init__(self, *args: str | Path, stdout: int | IO[bytes] = subprocess.PIPE,
                 **popen: Any) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xml_pipeline", *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            **popen,
        )
        self._stderr = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            raise RuntimeError("stderr is not a pipe")
        while chunk := stream.read1(65536):
            with self._changed:
                self._stderr += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stderr(self) -> bytes:
        """What the process wrote to stderr so far."""
        with self._changed:
            return bytes(self._stderr)

    def wait_for_stderr(self, needle: bytes, timeout: float = 30.0) -> None:
        """Return once ``needle`` appeared on stderr.

        Raises:
            TimeoutError: it did not, within ``timeout`` seconds or before stderr closed.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle not in self._stderr:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise TimeoutError(
                        f"{needle!r} not on stderr within {timeout:g} s; "
                        f"stderr: {bytes(self._stderr)!r}"
                    )
                self._changed.wait(min(left, 0.1))

    def send(self, data: bytes) -> None:
        """Write ``data`` to the process's stdin."""
        stdin = self.proc.stdin
        if stdin is None:
            raise RuntimeError("stdin is not a pipe")
        stdin.write(data)
        stdin.flush()

    def readline(self) -> bytes:
        """One line of the process's stdout (blocking)."""
        stdout = self.proc.stdout
        if stdout is None:
            raise RuntimeError("stdout is not a pipe")
        return stdout.readline()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 30.0) -> tuple[bytes, bytes]:
        """Close stdin, read stdout to its end and wait for the exit; (stdout, stderr)."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        out = b""
        if self.proc.stdout is not None:
            out = self.proc.stdout.read()
            self.proc.stdout.close()
        self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return out, self.stderr

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def __enter__(self) -> CliProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._reader.join(5)


def closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone (close it after use)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


SIGNALS = (signal.SIGINT, signal.SIGTERM)
