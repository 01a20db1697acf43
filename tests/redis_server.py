"""Real servers for the Redis tests: a redis-server process, and a proxy that loses a reply.

Nothing here mocks Redis: :class:`RedisServer` runs Debian's ``redis-server`` on a free
loopback port in a temporary directory, and :class:`LossyProxy` sits on the wire between
a client and that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

__all__ = ["LossyProxy", "RedisServer", "closed_port", "free_port", "running_redis"]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


closed_port = free_port
"""A port where connecting is refused (nothing listens there)."""


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` in ``directory``, stopped on exit; fails the test
    (never skips it) when the server cannot be started."""
    server = RedisServer(directory)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start redis-server: {exc}")
    try:
        yield server
    finally:
        server.stop()


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, its files in ``directory``.

    Args:
        directory: working directory (``--dir``) and the log file.
        persistent: ``--appendonly yes --appendfsync always`` (every acknowledged write
            is on disk), else no persistence at all.
    """

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 15.0) -> None:
        """Start the server (on the same port as before, if it ran already).

        Raises:
            RuntimeError: redis-server is missing, exits, or does not answer in time.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/test installs it)")
        self.directory.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.port else 3  # a free port may be taken before we bind it
        for attempt in range(attempts):
            port = self.port or free_port()
            try:
                self._start(binary, port, timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
            else:
                self.port = port
                return

    def _start(self, binary: str, port: int, timeout: float) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no",
        ]  # fmt: skip
        args = [
            binary,
            "--save", "",
            *persistence,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                self.process = None
                raise RuntimeError(f"redis-server exited on port {port}: {' | '.join(tail)}")
            if _answers(port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {port} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown save) and wait for it."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class LossyProxy:
    """A TCP proxy to ``127.0.0.1:target`` that can lose or hold back one reply.

    Requests always reach the server. After :meth:`drop_next_reply`, the next bytes the
    server sends are thrown away and that client connection is closed, as if the
    network failed after the command ran; after :meth:`stall_next_reply` they are held
    back for good (the client has to time out). Use as an async context manager.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.connections = 0
        self.dropped = 0
        self._armed = False
        self._stall = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_next_reply(self) -> None:
        self._armed = True

    def stall_next_reply(self) -> None:
        self._stall = True

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()  # the connections' tasks see end of file and finish
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
            self._writers.add(server_w)
            up = asyncio.create_task(self._pump(client_r, server_w, lossy=False))
            down = asyncio.create_task(self._pump(server_r, client_w, lossy=True))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except OSError:
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, lossy: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if lossy and self._armed:
                    self._armed = False
                    self.dropped += 1
                    return  # the reply is lost and the connection closes
                if lossy and self._stall:
                    self._stall = False
                    self.dropped += 1
                    await asyncio.Event().wait()  # until the client gives up and hangs up
                writer.write(data)
                await writer.drain()
