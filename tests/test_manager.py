"""The manager backend: conformance, several processes, failures, the wire format, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import pytest
from cli_process import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from xml_pipeline.backends import (
    Backend,
    BackendUnavailable,
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_from_bytes,
    dead_letter_from_obj,
    dead_letter_to_bytes,
    open_backend,
    slot_from_bytes,
    slot_from_obj,
    slot_to_bytes,
)
from xml_pipeline.backends.manager import (
    AUTHKEY_ENV,
    ManagerBackend,
    ManagerServer,
)
from xml_pipeline.backends.manager.client import TASK_NAME
from xml_pipeline.backends.manager.protocol import (
    FrameBuffer,
    decode_rows,
    encode_rows,
    frame,
    loads,
)
from xml_pipeline.exceptions import BackendError
from xml_pipeline.testing import CHECKS, Check, backend_state_machine, run_check

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "organisms" / "shared.yaml"
KEY = "test-manager-key"
SHARED_KEY = "shared-example-not-a-secret"  # organisms/shared.yaml's example authkey


def _slot(mid: str, thread_note: str = "") -> Slot:
    return Slot(0, "in", "a", "b", "{urn:x}P", mid, 1.5, f"<P>{thread_note}</P>".encode())


@asynccontextmanager
async def served(limits: HistoryLimits) -> AsyncIterator[Backend]:
    """A fresh store served by this process at a free port, and its client."""
    backend = ManagerBackend.from_url("manager://127.0.0.1:0", limits, authkey=KEY, serve=True)
    try:
        await backend.ping()
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
def server() -> Iterator[ManagerServer]:
    """A standalone server (threads in this process) at a free port."""
    with ManagerServer(("127.0.0.1", 0), KEY.encode(), handshake_timeout_s=1.0) as s:
        yield s


def client(server: ManagerServer, **options: Any) -> ManagerBackend:
    host, port = server.address
    options.setdefault("authkey", KEY)
    return ManagerBackend.from_url(f"manager://{host}:{port}", **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- conformance ---------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
async def test_conformance(check: Check) -> None:
    await run_check(served, check)


TestManagerStateMachine = backend_state_machine(served).TestCase
TestManagerStateMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


async def test_is_a_backend_and_hides_its_authkey(server: ManagerServer) -> None:
    backend = client(server)
    try:
        assert isinstance(backend, Backend)
        assert KEY not in repr(backend) and repr(backend).startswith("<ManagerBackend manager://")
        await backend.ping()
        assert backend.statistics().connects == 1
    finally:
        await backend.aclose()


async def test_open_backend_passes_the_organism_options(server: ManagerServer) -> None:
    host, port = server.address
    backend = open_backend(
        f"manager://{host}:{port}", None, authkey=KEY, serve=False, connect_timeout_s=2.0
    )
    try:
        assert isinstance(backend, ManagerBackend)
        assert await backend.buffer_append("t", _slot("m")) == 0
    finally:
        await backend.aclose()


@given(
    slot=st.builds(
        Slot,
        st.integers(0, 2**40),
        st.sampled_from(["in", "out"]),
        st.text(),
        st.none() | st.text(),
        st.text(),
        st.text(),
        st.floats(allow_nan=False),
        st.binary(),
    ),
    letter=st.builds(
        DeadLetter,
        st.text(),
        st.floats(allow_nan=False),
        st.text(),
        st.text(),
        st.none() | st.text(),
        st.none() | st.text(),
        st.none() | st.text(),
        st.binary(),
    ),
)
def test_wire_objects_are_base_formats(slot: Slot, letter: DeadLetter) -> None:
    # Frames are parsed once, so slots and dead letters arrive as dicts: reading
    # them must agree with base.py's slot_from_bytes / dead_letter_from_bytes.
    data = slot_to_bytes(slot)
    assert slot_from_obj(json.loads(data)) == slot_from_bytes(data) == slot
    data = dead_letter_to_bytes(letter)
    assert dead_letter_from_obj(json.loads(data)) == dead_letter_from_bytes(data) == letter


# -- batching, order, several processes ------------------------------------------------------


async def test_concurrent_calls_share_round_trips() -> None:
    async with served(HistoryLimits()) as backend:
        assert isinstance(backend, ManagerBackend)
        before = backend.statistics()
        indexes = await asyncio.gather(
            *(backend.buffer_append("t", _slot(f"m{i}")) for i in range(100))
        )
        assert indexes == list(range(100)), "calls made in order run in order"
        after = backend.statistics()
        assert after.calls - before.calls == 100
        assert after.round_trips - before.round_trips < 50, after  # typically 2


async def test_a_batch_of_dead_letters_is_one_call_and_one_round_trip() -> None:
    async with served(HistoryLimits(max_dead_letters=150)) as backend:
        assert isinstance(backend, ManagerBackend)
        letters = [DeadLetter("", 1.0, "shutdown", f"r{i}", "l", "t", f"m{i}", b"<x/>")
                   for i in range(200)]  # fmt: skip
        before = backend.statistics()
        ids = await backend.deadletter_add_many(letters)
        after = backend.statistics()
        assert (after.calls - before.calls, after.round_trips - before.round_trips) == (1, 1)
        assert len(set(ids)) == 200
        assert [x.id for x in await backend.deadletter_list()] == ids[50:]
        before = backend.statistics()
        assert await backend.deadletter_add_many([]) == []
        assert backend.statistics() == before, "an empty batch sends nothing"


def _append_many(url: str, worker: int, count: int) -> None:
    """One process's share of the 4 x 2,000 test (top level: spawned processes import it)."""

    async def main() -> None:
        backend = ManagerBackend.from_url(url)  # the authkey comes from the environment
        try:
            for start in range(0, count, 50):  # 50 at a time: batched, still in order
                await asyncio.gather(
                    *(
                        backend.buffer_append("shared", _slot(f"w{worker}-{i}"))
                        for i in range(start, min(start + 50, count))
                    )
                )
        finally:
            await backend.aclose()

    asyncio.run(main())


def test_four_processes_append_to_one_thread(
    server: ManagerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AUTHKEY_ENV, KEY)
    host, port = server.address
    url = f"manager://{host}:{port}"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(url, w, 2000)) for w in range(4)]
    for process in workers:
        process.start()
    try:
        for process in workers:
            process.join(50)
        assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
                process.join()

    async def read() -> list[Slot]:
        backend = client(server)
        try:
            return await backend.buffer_get_thread("shared")
        finally:
            await backend.aclose()

    slots = asyncio.run(read())
    assert len(slots) == 8000
    assert [s.index for s in slots] == list(range(8000))
    ids = [s.message_id for s in slots]
    assert len(set(ids)) == 8000, "no duplicates"
    for w in range(4):
        mine = [int(m.partition("-")[2]) for m in ids if m.startswith(f"w{w}-")]
        assert mine == list(range(2000)), f"process {w}'s order is kept"


# -- failures: one clear line, in bounded time ------------------------------------------------


async def test_wrong_authkey(server: ManagerServer) -> None:
    backend = client(server, authkey="not-the-key")
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match="authentication failed") as info:
            await backend.ping()
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert "\n" not in message and KEY not in message and "not-the-key" not in message
    finally:
        await backend.aclose()


async def test_refused_address() -> None:
    port = free_port()
    backend = ManagerBackend.from_url(f"manager://127.0.0.1:{port}", authkey=KEY)
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match="connection refused"):
            await backend.ping()
        assert time.monotonic() - start < 5
    finally:
        await backend.aclose()


async def test_unreachable_address_is_bounded() -> None:
    # A non-routable address: either the SYN goes nowhere (connect times out) or
    # the network is unreachable at once; never a hang.
    backend = ManagerBackend.from_url(
        "manager://10.255.255.1:9", authkey=KEY, connect_timeout_s=0.5
    )
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"manager://10\.255\.255\.1:9: "):
            await backend.ping()
        assert time.monotonic() - start < 3
    finally:
        await backend.aclose()


@contextmanager
def silent_peer() -> Iterator[int]:
    """A plain TCP server that accepts connections and never says anything."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        done.set()
        thread.join()
        for sock in accepted:
            sock.close()
        listener.close()


async def test_silent_peer_is_bounded() -> None:
    with silent_peer() as port:
        backend = ManagerBackend.from_url(
            f"manager://127.0.0.1:{port}", authkey=KEY, connect_timeout_s=0.5
        )
        try:
            start = time.monotonic()
            with pytest.raises(BackendUnavailable, match=r"no answer within 0\.5s"):
                await backend.ping()
            assert time.monotonic() - start < 3
        finally:
            await backend.aclose()


async def test_a_silent_client_neither_blocks_the_server_nor_stays(server: ManagerServer) -> None:
    with socket.create_connection(server.address) as silent:
        backend = client(server)
        try:
            await backend.ping()  # served while the silent client is connected
        finally:
            await backend.aclose()
        silent.settimeout(5)
        data = b""
        start = time.monotonic()
        while chunk := silent.recv(4096):  # the challenge, then EOF after the timeout
            data += chunk
        assert b"#CHALLENGE#" in data
        assert time.monotonic() - start < 4


def test_no_authkey_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTHKEY_ENV, raising=False)
    with pytest.raises(BackendUnavailable, match=AUTHKEY_ENV):
        ManagerBackend.from_url("manager://127.0.0.1:50555")


async def test_authkey_from_the_environment(
    server: ManagerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AUTHKEY_ENV, KEY)
    host, port = server.address
    backend = ManagerBackend.from_url(f"manager://{host}:{port}")
    try:
        await backend.ping()
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("manager://user:s3cret@127.0.0.1:1", "carry no credentials"),
        ("manager://127.0.0.1", "expected manager://HOST:PORT"),
        ("manager://127.0.0.1:1/db", "expected manager://HOST:PORT"),
        ("manager://127.0.0.1:0", "port 0"),
        ("manager://127.0.0.1:1?timeout=3", "unknown URL option"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(BackendUnavailable, match=match) as info:
        ManagerBackend.from_url(url, authkey=KEY)
    assert "s3cret" not in str(info.value)


async def test_serving_an_address_in_use(server: ManagerServer) -> None:
    host, port = server.address
    backend = ManagerBackend.from_url(f"manager://{host}:{port}?serve=1", authkey=KEY)
    try:
        with pytest.raises(BackendUnavailable, match="address already in use"):
            await backend.ping()
    finally:
        await backend.aclose()


async def test_aclose_stops_the_served_store() -> None:
    async with served(HistoryLimits()) as backend:
        assert isinstance(backend, ManagerBackend)
        url = backend.url
        await backend.buffer_append("t", _slot("m"))
    with pytest.raises(BackendUnavailable, match="closed"):
        await backend.buffer_thread_len("t")
    other = ManagerBackend.from_url(url, authkey=KEY)
    try:
        with pytest.raises(BackendUnavailable, match="connection refused"):
            await other.ping()
    finally:
        await other.aclose()


async def test_a_lost_server_fails_calls_then_a_new_one_is_used() -> None:
    first = ManagerServer(("127.0.0.1", 0), KEY.encode())
    first.start()
    address = first.address
    backend = ManagerBackend.from_url(f"manager://{address[0]}:{address[1]}", authkey=KEY)
    try:
        await backend.buffer_append("t", _slot("m"))
        first.close()
        with pytest.raises(BackendUnavailable):  # noticed while idle, or by this call
            await backend.buffer_thread_len("t")
        with ManagerServer(address, KEY.encode()):
            assert await backend.buffer_thread_len("t") == 0, "a new, empty store"
        assert backend.statistics().connects == 2
    finally:
        first.close()
        await backend.aclose()


async def test_a_silent_server_times_out_the_request() -> None:
    # A server that answers the handshake and hello, then never again.
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[Connection[Any, Any]] = []

    def serve() -> None:
        sock, _ = listener.accept()
        conn: Connection[Any, Any] = Connection(sock.detach())
        conns.append(conn)
        deliver_challenge(conn, KEY.encode())
        answer_challenge(conn, KEY.encode())
        conn.recv_bytes()
        conn.send_bytes(b'[[0,{"protocol":1,"limits":{}}]]')

    thread = threading.Thread(target=serve)
    thread.start()
    port = listener.getsockname()[1]
    backend = ManagerBackend.from_url(
        f"manager://127.0.0.1:{port}", authkey=KEY, request_timeout_s=0.5
    )
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"no answer within 0\.5s"):
            await backend.ping()
        assert time.monotonic() - start < 3
    finally:
        await backend.aclose()
        thread.join()
        for conn in conns:
            conn.close()
        listener.close()


async def test_server_limits_differing_from_the_clients_are_logged(
    server: ManagerServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = client(server, limits=HistoryLimits(max_slots_per_thread=5))
    try:
        await backend.ping()
    finally:
        await backend.aclose()
    assert "the server's limits apply: max_slots_per_thread 10000 (not 5)" in caplog.text


# -- the wire format -------------------------------------------------------------------------


def test_the_wire_format(server: ManagerServer) -> None:
    with socket.create_connection(server.address) as sock:
        conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
        try:
            answer_challenge(conn, KEY.encode())
            deliver_challenge(conn, KEY.encode())
            slot = slot_to_bytes(_slot("m1"))
            conn.send_bytes(
                b'[["hello",1],["buffer_append","t",' + slot + b'],["buffer_get_thread","t"],'
                b'["nope"],["buffer_get_slot","t","0"],["registry_list_all",1],["hello",3]]'
            )
            replies = json.loads(conn.recv_bytes())
            assert replies[0] == [  # a client of protocol 1 is still served
                0,
                {
                    "protocol": 2,
                    "max_request_bytes": 8 << 20,
                    "limits": {
                        "max_slots_per_thread": 10000,
                        "max_threads": 100000,
                        "ttl_s": 86400.0,
                        "max_dead_letters": 10000,
                        "dead_letter_bytes": 65536,
                        "dead_letter_budget_bytes": 64 << 20,
                        "dead_letter_ttl_s": 604800.0,
                    },
                },
            ]
            assert replies[1] == [0, 0]
            assert replies[2] == [0, [json.loads(slot)]], "slots in base.py's JSON format"
            assert replies[3][0] == 1 and "unknown call" in replies[3][1]
            assert replies[4][0] == 1 and "buffer_get_slot: bad argument" in replies[4][1]
            assert replies[5][0] == 1 and "expected 0 argument(s)" in replies[5][1]
            assert replies[6][0] == 1 and "protocol 3 is not supported" in replies[6][1]
            conn.send_bytes(b'{"not": "an array"}')  # not a request: the server hangs up
            with pytest.raises(EOFError):
                conn.recv_bytes()
        finally:
            conn.close()


def test_the_wire_format_of_a_batch_of_dead_letters(server: ManagerServer) -> None:
    letter = DeadLetter("", 1.5, "shutdown", "r", None, "t", "m", b"<x/>")
    with socket.create_connection(server.address) as sock:
        conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
        try:
            answer_challenge(conn, KEY.encode())
            deliver_challenge(conn, KEY.encode())
            data = dead_letter_to_bytes(letter)
            given = dead_letter_to_bytes(dataclasses.replace(letter, id="mine"))
            conn.send_bytes(
                b'[["deadletter_add_many",[' + data + b"," + given + b"]],"
                b'["deadletter_add_many",[1]],["deadletter_add_many",[]],["deadletter_list",null]]'
            )
            replies = json.loads(conn.recv_bytes())
            assert replies[0] == [0, ["dl-1", "mine"]], "one call, the ids in order"
            assert replies[1][0] == 1 and "deadletter_add_many: bad argument" in replies[1][1]
            assert replies[2] == [0, []]
            stored = [dict(json.loads(data), id="dl-1"), json.loads(given)]
            assert replies[3] == [0, stored], "letters in base.py's JSON format"
        finally:
            conn.close()


async def test_server_errors_are_backend_errors(server: ManagerServer) -> None:
    backend = client(server)
    try:
        with pytest.raises(BackendError, match="bad argument"):
            await backend.buffer_get_slot("t", "zero")  # type: ignore[arg-type]
        assert await backend.buffer_thread_len("t") == 0, "the connection is still fine"
    finally:
        await backend.aclose()


# -- the command line and the example organism ------------------------------------------------


def _read_line(process: subprocess.Popen[bytes], timeout: float = 20) -> bytes:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "the manager did not print its URL in time"
    return process.stdout.readline().strip()


@contextmanager
def manager_cli(authkey: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = dict(os.environ, **{AUTHKEY_ENV: authkey})
    process = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "manager", "--address", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        url = _read_line(process).decode()
        assert re.fullmatch(r"manager://127\.0\.0\.1:\d+", url), url
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serves_until_a_signal(signum: int) -> None:
    with manager_cli(KEY, "--max-slots-per-thread", "2") as (process, url):

        async def use() -> list[Slot]:
            backend = ManagerBackend.from_url(url, authkey=KEY)
            try:
                for i in range(3):
                    await backend.buffer_append("t", _slot(f"m{i}"))
                return await backend.buffer_get_thread("t")
            finally:
                await backend.aclose()

        slots = asyncio.run(use())
        assert [s.message_id for s in slots] == ["m1", "m2"], "the server's limits apply"
        process.send_signal(signum)
        assert process.wait(timeout=10) == 0
        assert process.stderr is not None
        assert b"Traceback" not in process.stderr.read()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "xml_pipeline", "manager", *args],
        capture_output=True,
        timeout=30,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_cli_errors_are_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != AUTHKEY_ENV}
    result = _cli("--address", "127.0.0.1:0", env=env)
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1 and AUTHKEY_ENV in result.stderr.decode()
    result = _cli("--address", "127.0.0.1:0", "--authkey-env", "MY_KEY", env=env)
    assert result.returncode == 2 and b"MY_KEY" in result.stderr
    env[AUTHKEY_ENV] = KEY
    result = _cli("--address", "nowhere", env=env)
    assert result.returncode == 2 and result.stderr.count(b"\n") == 1
    with ManagerServer(("127.0.0.1", 0), KEY.encode()) as busy:
        host, port = busy.address
        result = _cli("--address", f"{host}:{port}", env=env)
    assert result.returncode == 1
    assert (
        result.stderr
        == f"xml_pipeline: error: cannot serve at {host}:{port}: address already in use\n".encode()
    )


def test_two_pumps_share_one_store() -> None:
    with manager_cli(SHARED_KEY) as (_, url):
        pumps = [
            subprocess.Popen(
                [sys.executable, "-m", "xml_pipeline", str(SHARED), "--backend", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=ROOT,
            )
            for _ in range(2)
        ]
        outputs = [pump.communicate(timeout=45) for pump in pumps]
        for pump, (out, err) in zip(pumps, outputs, strict=True):
            assert pump.returncode == 0, err
            assert len(out.splitlines()) == 2 and b"<huh" not in out, out
            assert f"<pid>{pump.pid}</pid>".encode() in out

        async def read() -> tuple[set[int], dict[str, int]]:
            backend = ManagerBackend.from_url(url, authkey=SHARED_KEY)
            try:
                pids = set()
                for thread in await backend.buffer_list_threads():
                    for slot in await backend.buffer_get_thread(thread):
                        if slot.payload == "{https://example.org/shared}Noted":
                            pids.update(int(p) for p in re.findall(rb"<pid>(\d+)</pid>", slot.xml))
                return pids, await backend.info()
            finally:
                await backend.aclose()

        pids, info = asyncio.run(read())
        assert pids == {pump.pid for pump in pumps}, "both pumps wrote histories to the store"
        assert info["buffer_threads"] >= 4 and info["registry_entries"] >= 4


# -- the client on asyncio streams ------------------------------------------------------------


def _connections_to(port: int) -> int:
    """This process's TCP sockets connected to ``port`` (open, in any state)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[9] in inodes:
                    count += 1
    return count


def _watchers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == TASK_NAME and not t.done()]


async def test_the_connection_and_its_task_end_with_aclose(server: ManagerServer) -> None:
    port = server.address[1]
    backend = client(server)
    await backend.ping()
    assert _connections_to(port) == 1
    assert len(_watchers()) == 1, "one idle task per connection, named"
    await backend.aclose()
    assert _connections_to(port) == 0
    assert _watchers() == []


async def test_a_lost_connection_is_noticed_while_idle() -> None:
    server = ManagerServer(("127.0.0.1", 0), KEY.encode())
    server.start()
    port = server.address[1]
    backend = client(server)
    try:
        await backend.ping()
        [watcher] = _watchers()
        server.close()
        await asyncio.wait_for(asyncio.wait([watcher]), 5)  # EOF, noticed while idle
        assert watcher.exception() is None
        assert _connections_to(port) == 0
        with pytest.raises(BackendUnavailable, match="connection refused"):
            await backend.ping()
    finally:
        server.close()
        await backend.aclose()
    assert _watchers() == []


async def test_a_cancelled_connection_task_fails_its_calls_and_the_next_call_reconnects(
    server: ManagerServer,
) -> None:
    backend = client(server)
    try:
        await backend.ping()
        [watcher] = _watchers()
        # A 4 MiB request: the server takes milliseconds to read it, so it cannot be
        # answered before the watcher is cancelled (a small call could be, under load).
        big = _slot("big")._replace(xml=b"<P>" + b"x" * (4 << 20) + b"</P>")
        call = asyncio.ensure_future(backend.buffer_append("t", big))
        await asyncio.sleep(0)  # written, not answered yet
        watcher.cancel()
        with pytest.raises(BackendUnavailable):
            await call
        assert await backend.buffer_thread_len("other") == 0
        assert backend.statistics().connects == 2
    finally:
        await backend.aclose()
    assert _watchers() == []


async def test_a_connection_reset_mid_call_fails_the_call_and_the_next_call_reconnects(
    server: ManagerServer,
) -> None:
    backend = client(server)
    try:
        await backend.ping()
        call = asyncio.ensure_future(backend.buffer_thread_len("t"))
        await asyncio.sleep(0)  # written, not answered yet
        assert backend._conn is not None
        backend._conn._transport.abort()  # as a reset connection would
        with pytest.raises(BackendUnavailable, match="connection lost"):
            await call
        assert await backend.buffer_thread_len("t") == 0
        assert backend.statistics().connects == 2
    finally:
        await backend.aclose()


async def test_a_garbled_answer_fails_the_call_and_the_next_call_reconnects(
    server: ManagerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = client(server, request_timeout_s=30)
    try:
        await backend.ping()
        with monkeypatch.context() as patch:
            patch.setattr(server, "_run", lambda data: b"not json")
            with pytest.raises(BackendUnavailable, match="does not match the request"):
                await asyncio.wait_for(backend.ping(), 10)  # failed at once, not timed out
        await backend.ping()
        assert backend.statistics().connects == 2
    finally:
        await backend.aclose()


async def test_aclose_does_not_wait_for_a_stalled_server(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    # a cap above the 22 MiB request below, which stays buffered in the client
    server = ManagerServer(("127.0.0.1", 0), KEY.encode(), max_request_bytes=64 << 20)
    server.start()
    run = server._run

    def stalled(data: bytes) -> bytes:
        release.wait(30)
        return run(data)

    backend = client(server, request_timeout_s=0.5)
    try:
        await backend.ping()
        monkeypatch.setattr(server, "_run", stalled)
        big = Slot(0, "in", "a", None, "{urn:x}P", "m", 1.5, b"x" * (16 << 20))
        calls = [backend.ping(), backend.buffer_append("t", big)]  # the second one buffered
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            assert isinstance(outcome, BackendUnavailable), outcome
        start = time.monotonic()
        await asyncio.wait_for(backend.aclose(), 10)
        assert time.monotonic() - start < 2, "the connection is aborted, not drained"
    finally:
        release.set()
        await backend.aclose()
        server.close()


def test_a_client_that_does_not_read_its_answers_cannot_fill_the_servers_memory(
    server: ManagerServer,
) -> None:
    with socket.create_connection(server.address) as sock:
        conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
        try:
            answer_challenge(conn, KEY.encode())
            deliver_challenge(conn, KEY.encode())
            big = slot_to_bytes(_slot("m1")).replace(b"PFA+PC9QPg==", b"A" * (1 << 20))
            conn.send_bytes(b'[["buffer_append","t",' + big + b"]]")
            conn.recv_bytes()
            # ~10 KB of requests, each answered with ~0.75 MiB, none of it read
            sock.sendall(frame(b'[["buffer_get_rows","t"]]') * 400)
            wait_until(
                lambda: any(session._paused for session in list(server._sessions)),
                "the server pausing its reads",
                10,
            )
            [session] = server._sessions
            assert session._transport is not None
            buffered = session._transport.get_write_buffer_size()
            assert buffered < 8 << 20, f"{buffered >> 20} MiB of answers held for the client"
        finally:
            conn.close()


async def test_a_cancelled_call_leaves_the_connection_usable(server: ManagerServer) -> None:
    backend = client(server)
    try:
        await backend.ping()
        calls = [
            asyncio.ensure_future(backend.buffer_append("t", _slot(f"m{i}"))) for i in range(3)
        ]
        calls[1].cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert done[0] == 0 and isinstance(done[1], asyncio.CancelledError)
        # The cancelled call may have been sent: the answers stay matched either way.
        assert await backend.buffer_thread_len("t") == done[2] + 1
    finally:
        await backend.aclose()


async def test_calls_are_pipelined_on_one_connection(
    server: ManagerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = client(server)
    gate = threading.Event()
    run = server._run

    def held(data: bytes) -> bytes:
        gate.wait(10)  # the first frame stays in flight until the others are made
        return run(data)

    try:
        await backend.ping()
        monkeypatch.setattr(server, "_run", held)
        first = asyncio.ensure_future(backend.buffer_append("t", _slot("m0")))
        await asyncio.sleep(0)  # its frame is written: the next ones go behind it
        before = backend.statistics()
        rest = [
            asyncio.ensure_future(backend.buffer_append("t", _slot(f"m{i}"))) for i in (1, 2, 3)
        ]
        await asyncio.sleep(0)  # all three made while the first is in flight
        gate.set()
        assert await asyncio.gather(first, *rest) == [0, 1, 2, 3]
        after = backend.statistics()
        assert after.round_trips - before.round_trips == 2, "one frame, then the next tick's"
        assert after.connects == 1
    finally:
        gate.set()
        await backend.aclose()


def test_one_backend_used_from_one_loop_then_another(server: ManagerServer) -> None:
    backend = client(server)
    assert asyncio.run(backend.buffer_append("t", _slot("m0"))) == 0
    assert asyncio.run(backend.buffer_append("t", _slot("m1"))) == 1, "connects again there"
    asyncio.run(backend.aclose())
    assert backend.statistics().connects == 2


def test_history_reads_as_rows(server: ManagerServer) -> None:
    with socket.create_connection(server.address) as sock:
        conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
        try:
            answer_challenge(conn, KEY.encode())
            deliver_challenge(conn, KEY.encode())
            conn.send_bytes(
                b'[["buffer_append","t",' + slot_to_bytes(_slot("m1")) + b"],"
                b'["buffer_get_rows","t"],["buffer_get_rows","none"],["buffer_get_rows"]]'
            )
            replies = json.loads(conn.recv_bytes())
            row = [0, "in", "a", "b", "{urn:x}P", "m1", 1.5, "<P></P>"]
            assert replies[:3] == [[0, 0], [0, [row]], [0, []]], "Slot's order, XML as text"
            assert replies[3][0] == 1 and "expected 1 argument(s)" in replies[3][1]
        finally:
            conn.close()


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_frames_survive_any_cutting_of_the_stream(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    buffer = FrameBuffer(limit=300)
    got = []
    for start, end in itertools.pairwise(points):
        buffer.feed(stream[start:end])
        while (data := buffer.next()) is not None:
            assert type(data) is bytes
            got.append(data)
    assert got == payloads and len(buffer) == 0


def test_a_frame_past_the_limit_is_refused_from_its_header() -> None:
    buffer = FrameBuffer(limit=256)
    buffer.feed(frame(b"x" * 257)[:4])  # the header alone says too much
    with pytest.raises(ValueError, match="a frame of 257 bytes"):
        buffer.next()
    long = FrameBuffer(limit=1 << 40)
    long.feed(struct.pack("!iQ", -1, 3) + b"abc")  # the 8-byte length of frames past 2 GiB
    assert long.next() == b"abc"


@settings(max_examples=50, deadline=None)
@given(xml=st.binary(max_size=64))
def test_rows_carry_any_bytes(xml: bytes) -> None:
    slot = Slot(3, "out", "a", None, "{urn:x}P", "m1", 2.5, xml)
    assert decode_rows(loads(encode_rows([slot]))) == [slot]
    assert decode_rows(json.loads(encode_rows([slot]))) == [slot], "any JSON parser"


async def test_a_server_without_rows_is_read_with_buffer_get_thread(
    server: ManagerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(server._calls, "buffer_get_rows")  # as a server from before it
    backend = client(server)
    try:
        await backend.buffer_append("t", _slot("m1"))
        for _ in range(2):
            [slot] = await backend.buffer_get_thread("t")
            assert slot == _slot("m1")
        assert backend.statistics().calls == 4, "asked once with rows, then never again"
    finally:
        await backend.aclose()


@contextmanager
def modern_handshake_server() -> Iterator[int]:
    """A server speaking the handshake of Python 3.12+ (``{sha256}`` challenges)."""
    import hashlib
    import hmac

    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[Connection[Any, Any]] = []

    def serve() -> None:
        sock, _ = listener.accept()
        conn: Connection[Any, Any] = Connection(sock.detach())
        conns.append(conn)
        key = KEY.encode()
        message = b"{sha256}" + os.urandom(40)
        conn.send_bytes(b"#CHALLENGE#" + message)
        answer = conn.recv_bytes(256)
        expected = b"{sha256}" + hmac.new(key, message, hashlib.sha256).digest()
        conn.send_bytes(b"#WELCOME#" if answer == expected else b"#FAILURE#")
        challenge = conn.recv_bytes(256)[len(b"#CHALLENGE#") :]
        assert challenge.startswith(b"{sha256}")
        conn.send_bytes(b"{sha256}" + hmac.new(key, challenge, hashlib.sha256).digest())
        assert conn.recv_bytes(256) == b"#WELCOME#"
        conn.recv_bytes()
        conn.send_bytes(b'[[0,{"protocol":1,"limits":{}}]]')
        conn.recv_bytes()
        conn.send_bytes(b"[[0,null]]")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        thread.join(10)
        for conn in conns:
            conn.close()
        listener.close()


async def test_the_handshake_of_newer_pythons() -> None:
    with modern_handshake_server() as port:
        backend = ManagerBackend.from_url(f"manager://127.0.0.1:{port}", authkey=KEY)
        try:
            await backend.ping()
        finally:
            await backend.aclose()


def _read_history_in_workers(url: str) -> tuple[str, str, str]:
    """A cpu_bound listener on the manager store, sync (history_blocking) and async."""
    import worker_handlers as wh
    from support import Ping, ping_xml

    from xml_pipeline import Huh, Listener, Organism, ProcessPoolSettings, StreamPump

    listeners = (
        Listener(name="sync", payloads=(Ping, Huh), handler=wh.read_history, cpu_bound=True),
        Listener(name="async", payloads=(Ping, Huh), handler=wh.read_history_async,
                 cpu_bound=True),
    )  # fmt: skip
    organism = Organism(
        name="t",
        listeners=listeners,
        backend=url,
        backend_options={"authkey": KEY},
        process_pool=ProcessPoolSettings(workers=1),
    )

    async def main() -> tuple[str, str, str]:
        async with StreamPump(organism) as pump:
            first = await pump.request(ping_xml(1), to="sync")
            again = await pump.request(ping_xml(2), to="sync", thread=first.thread_id)
            other = await pump.request(ping_xml(3), to="async")
            return first.payload.text, again.payload.text, other.payload.text

    return asyncio.run(main())


def test_history_from_the_manager_in_a_worker(server: ManagerServer) -> None:
    host, port = server.address
    first, again, other = _read_history_in_workers(f"manager://{host}:{port}")
    assert first == "in:api"
    assert again == "in:api,out:sync,in:api"
    assert other == "in:api"


def test_a_worker_reading_history_from_the_manager_exits_quietly(
    server: ManagerServer,
) -> None:
    # A cpu_bound worker keeps its backend, made on its own loop, for its whole life:
    # when it exits, no connection task may be reported destroyed while pending.
    host, port = server.address
    script = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_manager import _read_history_in_workers\n"
        "if __name__ == '__main__':\n"
        f"    print(_read_history_in_workers('manager://{host}:{port}')[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, cwd=ROOT, check=False
    )
    assert (result.returncode, result.stdout) == (0, b"in:api\n"), result.stderr
    assert b"destroyed" not in result.stderr and b"Traceback" not in result.stderr, result.stderr
