"""The manager store defends itself: request frames, calls a request and connections
are capped; the client keeps under the cap its server names; the server's threads are
a fixed number."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from cli_process import CliProcess, until

from xml_pipeline import RequestTooLarge
from xml_pipeline.backends import BackendUnavailable, DeadLetter, Slot
from xml_pipeline.backends.manager import (
    AUTHKEY_ENV,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_CALLS,
    ManagerBackend,
    ManagerServer,
)
from xml_pipeline.backends.manager.protocol import (
    HANDSHAKE_FRAME_BYTES,
    answer_challenge,
    deliver_challenge,
    dumps,
    frame,
    loads,
    read_frame,
)

KEY = "test-manager-caps-key"
MIB = 1 << 20


def _slot(mid: str, xml: bytes = b"<P/>") -> Slot:
    return Slot(0, "in", "a", "b", "{urn:x}P", mid, 1.5, xml)


def _proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (``VmRSS`` in KiB, ``Threads``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


@contextmanager
def manager_cli(*args: str) -> Iterator[tuple[CliProcess, tuple[str, int]]]:
    """``python -m xml_pipeline manager`` at a free port, and the address it serves."""
    env = dict(os.environ, **{AUTHKEY_ENV: KEY})
    with CliProcess("manager", "--address", "127.0.0.1:0", *args, env=env) as process:
        line = process.readline().decode().strip()
        found = re.fullmatch(r"manager://(127\.0\.0\.1):(\d+)", line)
        if found is None:
            raise RuntimeError(f"the manager did not print its URL: {line!r} {process.stderr!r}")
        yield process, (found[1], int(found[2]))


@asynccontextmanager
async def authenticated(
    address: tuple[str, int],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw connection that passed the handshake (the project's own helpers)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        read = functools.partial(read_frame, reader, HANDSHAKE_FRAME_BYTES)

        def write(data: bytes) -> None:
            writer.write(frame(data))

        await answer_challenge(read, write, KEY.encode())
        await deliver_challenge(read, write, KEY.encode())
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _until_disconnected(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read (and drop) what the server says until it hangs up.

    Raises:
        TimeoutError: it did not hang up within ``timeout`` seconds.
    """
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass


async def _flood(writer: asyncio.StreamWriter, size: int) -> None:
    """The header of a ``size``-byte frame, then its bytes until the server hangs up:
    ``[[],[],...``, millions of JSON values a MiB (what costs a decoder most)."""
    chunk = (b"[]," * (MIB // 3 + 1))[:MIB]
    writer.write(struct.pack("!i", size) + b"[" + chunk[:-1])
    with contextlib.suppress(ConnectionError):
        for _ in range(size // MIB - 1):
            await writer.drain()
            writer.write(chunk)
        await writer.drain()


# -- a frame over the cap --------------------------------------------------------------


def test_a_200_mib_frame_is_refused_from_its_header_and_the_others_are_served() -> None:
    size = 200 * MIB
    with manager_cli() as (process, address):
        pid = process.proc.pid
        peak = [_proc_status(pid, "VmRSS")]

        async def main() -> float:
            host, port = address
            other = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
            try:
                assert await other.buffer_append("t", _slot("m0")) == 0
                async with authenticated(address) as (reader, writer):
                    start = time.monotonic()
                    flood = asyncio.ensure_future(_flood(writer, size))
                    try:
                        while True:  # watch the server's memory while it is fed
                            peak[0] = max(peak[0], _proc_status(pid, "VmRSS"))
                            with contextlib.suppress(TimeoutError):
                                await _until_disconnected(reader, 0.01)
                                break
                            if time.monotonic() - start > 3:
                                raise TimeoutError("the server did not hang up within 3 s")
                        took = time.monotonic() - start
                    finally:
                        flood.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await flood
                async with asyncio.timeout(5):  # a well-behaved client is still served
                    assert await other.buffer_append("t", _slot("m1")) == 1
                    assert [s.message_id for s in await other.buffer_get_thread("t")] == [
                        "m0",
                        "m1",
                    ]
                return took
            finally:
                await other.aclose()

        took = asyncio.run(main())
        peak[0] = max(peak[0], _proc_status(pid, "VmRSS"))
        assert took < 2, f"the server took {took:.2f} s to hang up"
        assert peak[0] < 150 * 1024, f"the server's RSS reached {peak[0] >> 10} MiB"
        process.wait_for_stderr(
            f"request of {size} bytes is over the manager's cap of {MAX_REQUEST_BYTES} "
            "bytes (max_request_bytes)".encode(),
            timeout=10,
        )


async def test_a_frame_over_a_small_cap_disconnects_that_client_only() -> None:
    with ManagerServer(("127.0.0.1", 0), KEY.encode(), max_request_bytes=64 << 10) as server:
        host, port = server.address
        other = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
        try:
            await other.ping()
            async with authenticated(server.address) as (reader, writer):
                writer.write(frame(dumps([["ping"]])))
                assert loads(await read_frame(reader, 1 << 10)) == [[0, None]]
                writer.write(struct.pack("!i", (64 << 10) + 1))  # one byte over: the header
                await _until_disconnected(reader, 2)
            assert await other.buffer_thread_len("t") == 0
            assert len(server._sessions) == 1
        finally:
            await other.aclose()


async def test_a_request_of_too_many_calls_runs_none_of_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ManagerServer(("127.0.0.1", 0), KEY.encode()) as server:
        async with authenticated(server.address) as (reader, writer):
            slot = dumps(["buffer_append", "t", None])
            many = b"[" + b",".join([slot] * (MAX_REQUEST_CALLS + 1)) + b"]"
            writer.write(frame(many))
            await _until_disconnected(reader, 5)
        host, port = server.address
        backend = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
        try:
            assert await backend.buffer_thread_len("t") == 0
        finally:
            await backend.aclose()
    assert f"over the manager's cap of {MAX_REQUEST_CALLS} calls" in caplog.text


# -- the client keeps under the cap -----------------------------------------------------


@contextmanager
def recording(server: ManagerServer) -> Iterator[list[int]]:
    """The sizes of the request frames the server runs."""
    sizes: list[int] = []
    run = server._run

    def recorded(data: bytes) -> bytes:
        sizes.append(len(data))
        return run(data)

    server._run = recorded  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        del server._run


async def test_500_dead_letters_of_64_kib_land_in_full_in_requests_under_the_cap() -> None:
    letters = [
        DeadLetter("", 1.0, "handler-error", f"r{i}", "l", "t", f"m{i}", os.urandom(64 << 10))
        for i in range(500)
    ]  # ~44 MiB of JSON
    with ManagerServer(("127.0.0.1", 0), KEY.encode()) as server:
        host, port = server.address
        backend = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
        try:
            await backend.ping()
            with recording(server) as sizes:
                ids = await backend.deadletter_add_many(letters)
            assert len(sizes) >= 5, sizes
            assert max(sizes) <= MAX_REQUEST_BYTES, sizes
            assert len(set(ids)) == 500
            stored = await backend.deadletter_list()
            assert [x.id for x in stored] == ids
            assert [x.data for x in stored] == [x.data for x in letters]
            assert [x.message_id for x in stored] == [x.message_id for x in letters]
        finally:
            await backend.aclose()


async def test_a_call_over_the_cap_raises_without_being_sent() -> None:
    with ManagerServer(("127.0.0.1", 0), KEY.encode()) as server:
        host, port = server.address
        backend = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
        try:
            await backend.ping()
            before = backend.statistics()
            big = _slot("big", b"x" * MAX_REQUEST_BYTES)
            with pytest.raises(RequestTooLarge, match=r"over the manager's cap of 8388608 bytes"):
                await backend.buffer_append("t", big)
            letter = DeadLetter("", 1.0, "handler-error", "x" * MAX_REQUEST_BYTES, None, None,
                                None, b"")  # fmt: skip
            small = DeadLetter("", 1.0, "handler-error", "fine", None, None, None, b"")
            with pytest.raises(RequestTooLarge, match="--max-request-bytes"):
                await backend.deadletter_add_many([small, letter])
            assert backend.statistics() == before, "nothing was sent"
            assert await backend.buffer_thread_len("t") == 0, "the connection is still fine"
            assert await backend.deadletter_list() == []
        finally:
            await backend.aclose()


async def test_concurrent_calls_are_batched_under_a_small_cap() -> None:
    cap = 64 << 10
    with ManagerServer(("127.0.0.1", 0), KEY.encode(), max_request_bytes=cap) as server:
        host, port = server.address
        backend = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
        try:
            await backend.ping()
            with recording(server) as sizes:
                calls = [
                    backend.buffer_append("t", _slot(f"m{i}", b"y" * 3000)) for i in range(200)
                ]
                assert await asyncio.gather(*calls) == list(range(200))
            assert max(sizes) <= cap and len(sizes) >= 10, sizes
        finally:
            await backend.aclose()


async def test_a_protocol_1_server_is_still_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with ManagerServer(("127.0.0.1", 0), KEY.encode()) as server:

        def old_hello(protocol: int) -> dict[str, Any]:
            if protocol != 1:
                raise ValueError(f"protocol {protocol} is not supported (this server speaks 1)")
            return {"protocol": 1, "limits": {}}

        entry = server._calls["hello"]
        monkeypatch.setitem(server._calls, "hello", (old_hello, *entry[1:]))
        host, port = server.address
        backend = ManagerBackend.from_url(f"manager://{host}:{port}", authkey=KEY)
        try:
            assert await backend.buffer_append("t", _slot("m0")) == 0
            conn = backend._conn
            assert conn is not None and conn.max_request_bytes == 512 * MIB, "its old cap"
        finally:
            await backend.aclose()


# -- connections and threads --------------------------------------------------------------


def test_connections_past_the_cap_are_closed_at_once_and_threads_stay_fixed() -> None:
    with manager_cli("--max-connections", "4") as (process, address):
        pid = process.proc.pid
        threads = _proc_status(pid, "Threads")
        host, port = address
        url = f"manager://{host}:{port}"

        async def main() -> None:
            clients = [ManagerBackend.from_url(url, authkey=KEY) for _ in range(4)]
            try:
                for n, backend in enumerate(clients):
                    await backend.buffer_append("t", _slot(f"m{n}"))
                for _ in range(20):  # each closed at once, without a challenge
                    reader, writer = await asyncio.open_connection(host, port)
                    try:
                        async with asyncio.timeout(2):
                            with contextlib.suppress(ConnectionError):
                                assert await reader.read() == b""
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                assert _proc_status(pid, "Threads") == threads, "no thread per connection"
                for backend in clients:  # the four kept are served on
                    assert await backend.buffer_thread_len("t") == 4
                await clients.pop().aclose()
                late = ManagerBackend.from_url(url, authkey=KEY)
                clients.append(late)

                async def served() -> bool:
                    try:
                        return await late.buffer_thread_len("t") == 4
                    except Exception:
                        return False

                await until(served, "a connection accepted once one of the four left", 10)
            finally:
                for backend in clients:
                    await backend.aclose()

        asyncio.run(main())
        process.wait_for_stderr(b"its cap (max_connections)", timeout=10)
        refused = process.stderr.count(b"(max_connections)")
        assert 1 <= refused <= 2, f"the refusals are logged {refused} times, not once each"


def test_the_cli_rejects_caps_below_their_minimum() -> None:
    env = dict(os.environ, **{AUTHKEY_ENV: KEY})
    for args in (("--max-request-bytes", "1000"), ("--max-connections", "0")):
        with CliProcess("manager", "--address", "127.0.0.1:0", *args, env=env) as process:
            _, err = process.finish(timeout=30)
        assert process.returncode == 2 and err.count(b"\n") == 1, err
        assert args[0].encode() in err


def test_a_client_cannot_serve_with_caps_below_their_minimum() -> None:
    with pytest.raises(BackendUnavailable, match="max_connections at least 1"):
        ManagerBackend.from_url("manager://127.0.0.1:0", authkey=KEY, serve=True,
                                max_connections=0)  # fmt: skip
