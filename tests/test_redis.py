"""The Redis backend against a real redis-server: conformance, failures, the pump on it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from cli_process import until
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from redis_server import LossyProxy, RedisServer, closed_port

from xml_pipeline import (
    BackendCorrupted,
    BackendError,
    BackendUnavailable,
    Reply,
    StreamPump,
    load_organism,
)
from xml_pipeline.backends import (
    Backend,
    DeadLetter,
    HistoryLimits,
    Slot,
    dead_letter_to_bytes,
    open_backend,
    slot_to_bytes,
)
from xml_pipeline.backends.redis import RedisBackend
from xml_pipeline.testing import CHECKS, Check, backend_state_machine, run_check

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "organisms" / "hello.yaml"
GREETING = '<Greeting xmlns="https://example.org/hello"><name>{}</name></Greeting>'


def new_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def slot(mid: str, direction: str = "in", xml: bytes = b"<P/>") -> Slot:
    return Slot(0, direction, "a", "b", "{urn:x}P", mid, 1_700_000_000.5, xml)  # type: ignore[arg-type]


def factory_for(url: str, **options: Any) -> Callable[[HistoryLimits], Any]:
    """Fresh, empty backends (a new key prefix each), their keys removed afterwards."""

    @asynccontextmanager
    async def factory(limits: HistoryLimits) -> AsyncIterator[Backend]:
        prefix = new_prefix()
        backend = RedisBackend.from_url(url, limits, prefix=prefix, **options)
        try:
            yield backend
        finally:
            await backend.aclose()
            cleaner = RedisBackend.from_url(url, limits, prefix=prefix)
            await cleaner.buffer_clear()
            await cleaner.registry_clear()
            await cleaner.deadletter_purge()
            await cleaner.aclose()

    return factory


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, to look at what the backend stored."""
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


# -- conformance ---------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
async def test_conformance(redis_server: RedisServer, check: Check) -> None:
    await run_check(factory_for(redis_server.url), check)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_state_machine_matches_the_reference_store(redis_server: RedisServer, loop: str) -> None:
    loop_factory = None
    if loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    machine = backend_state_machine(factory_for(redis_server.url), loop_factory=loop_factory)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


async def test_open_backend_dispatches_redis_urls(redis_server: RedisServer) -> None:
    backend = open_backend(
        redis_server.url, HistoryLimits(ttl_s=60), prefix=new_prefix(), retries=1, outage_s=0,
        connect_timeout_s=1.0, socket_timeout_s=1.0,
    )  # fmt: skip
    assert isinstance(backend, RedisBackend)
    assert isinstance(backend, Backend)
    await backend.ping()
    await backend.aclose()
    await backend.close()  # idempotent


def test_a_bad_url_is_one_clear_error() -> None:
    with pytest.raises(BackendUnavailable, match="invalid Redis URL"):
        RedisBackend.from_url("redis://127.0.0.1:notaport/0")


def test_the_password_is_not_shown() -> None:
    backend = RedisBackend.from_url("redis://user:s3cret@127.0.0.1:6379/0")
    assert "s3cret" not in backend.url and "s3cret" not in repr(backend)


# -- what is stored, and how -----------------------------------------------------------


async def test_key_layout_formats_and_ttl(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    limits = HistoryLimits(ttl_s=100, max_slots_per_thread=2)
    backend = RedisBackend.from_url(redis_server.url, limits, prefix=prefix)
    chain = '["caller","root:with:colons","x.y"]'
    try:
        await backend.registry_set(chain, "frame:1")
        for i in range(3):
            await backend.buffer_append("frame:1", slot(f"m{i}", xml=b"<P>\xc3\xa9</P>"))
        await backend.deadletter_add(
            DeadLetter("", 1.5, "malformed", "why", None, None, None, b"<x")
        )
        assert await backend.buffer_list_threads() == ["frame:1"], "bare thread ids"
        async with raw_client(redis_server.url) as r:
            keys = sorted([k.decode() async for k in r.scan_iter(match=f"{prefix}:*")])
            assert keys == [
                f"{prefix}:chain:{chain}",
                f"{prefix}:dl:data",
                f"{prefix}:dl:ids",
                f"{prefix}:dl:seq",
                f"{prefix}:dl:ts",
                f"{prefix}:hidx:frame:1",
                f"{prefix}:hist:frame:1",
                f"{prefix}:stats",
                f"{prefix}:uuid:frame:1",
            ]
            stored = await r.lrange(f"{prefix}:hist:frame:1", 0, -1)
            expected = [slot(f"m{i}", xml=b"<P>\xc3\xa9</P>")._replace(index=i) for i in (1, 2)]
            assert stored == [slot_to_bytes(s) for s in expected], "the documented JSON"
            index = await r.hgetall(f"{prefix}:hidx:frame:1")
            assert index == {b"in:m1": b"1", b"#1": b"in:m1", b"in:m2": b"2", b"#2": b"in:m2",
                             b"next": b"3"}  # fmt: skip
            for key in ("hist:frame:1", "hidx:frame:1", "uuid:frame:1", f"chain:{chain}"):
                ttl = await r.pttl(f"{prefix}:{key}")
                assert 90_000 < ttl <= 100_000, key
            assert await r.pttl(f"{prefix}:dl:data") == -1, "dead letters expire one by one"
            [letter_id] = await r.zrange(f"{prefix}:dl:ids", 0, -1)
            [letter] = await backend.deadletter_list()
            assert letter_id.decode() == letter.id
            assert await r.hget(f"{prefix}:dl:data", letter_id) == dead_letter_to_bytes(letter)
            assert "cmdstat_keys" not in await r.info("commandstats"), "SCAN, never KEYS"
        info = await backend.info()
        size = len(dead_letter_to_bytes(letter))
        assert info == {"buffer_threads": 1, "registry_entries": 1, "dead_letters": 1,
                        "slots_trimmed": 1, "dead_letter_bytes": size, "dead_letters_dropped": 0,
                        "dead_letters_expired": 0, "dead_letters_over_budget": 0}  # fmt: skip
    finally:
        await backend.buffer_clear()
        await backend.registry_clear()
        await backend.deadletter_purge()
        await backend.aclose()


async def test_idle_frames_expire_and_writes_keep_them_alive(redis_server: RedisServer) -> None:
    backend = RedisBackend.from_url(redis_server.url, HistoryLimits(ttl_s=1), prefix=new_prefix())
    try:
        await backend.registry_set('["a","busy"]', "busy")
        await backend.registry_set('["a","idle"]', "idle")
        await backend.buffer_append("busy", slot("m0"))
        await backend.buffer_append("idle", slot("m0"))
        for i in range(1, 6):  # 1.5 s of writes to "busy" only
            await asyncio.sleep(0.3)
            await backend.buffer_append("busy", slot(f"m{i}"))
        assert await backend.buffer_list_threads() == ["busy"]
        assert await backend.registry_list_all() == {"busy": '["a","busy"]'}
        assert await backend.registry_get_uuid('["a","idle"]') is None
        assert await backend.buffer_thread_len("busy") == 6
    finally:
        await backend.aclose()


async def test_a_restarted_server_forgets_scripts_and_eval_takes_over(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend.from_url(redis_server.url, prefix=new_prefix())
    try:
        assert await backend.buffer_append("t", slot("m0")) == 0
        async with raw_client(redis_server.url) as r:
            await r.script_flush()
        assert await backend.buffer_append("t", slot("m1")) == 1
        assert await backend.buffer_append("t", slot("m0")) == 0
    finally:
        await backend.aclose()


async def test_a_closed_backend_refuses_calls(redis_server: RedisServer) -> None:
    backend = RedisBackend.from_url(redis_server.url, prefix=new_prefix())
    await backend.ping()
    await backend.aclose()
    with pytest.raises(BackendUnavailable, match="closed"):
        await backend.buffer_thread_len("t")


async def test_a_server_error_is_a_backend_error(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    backend = RedisBackend.from_url(redis_server.url, prefix=prefix)
    try:
        async with raw_client(redis_server.url) as r:
            await r.set(f"{prefix}:hist:t", b"not a list")
        with pytest.raises(BackendError, match="WRONGTYPE") as info:
            await backend.buffer_get_thread("t")
        assert not isinstance(info.value, BackendUnavailable)
        assert await backend.buffer_thread_len("u") == 0, "the connection is still usable"
    finally:
        await backend.aclose()


# -- round trips -----------------------------------------------------------------------


async def server_reads(url: str) -> int:
    async with raw_client(url) as r:
        return int((await r.info("stats"))["total_reads_processed"])


async def script_calls(url: str) -> int:
    """EVALSHA and EVAL calls the server ran so far (INFO commandstats)."""
    async with raw_client(url) as r:
        stats = await r.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


async def test_concurrent_appends_are_folded_into_one_script_call(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend.from_url(redis_server.url, prefix=new_prefix())
    try:
        await backend.buffer_append("warm", slot("m"))  # loads the script
        calls = await script_calls(redis_server.url)
        before = backend.statistics()
        reads = await server_reads(redis_server.url)
        indexes = await asyncio.gather(
            *(backend.buffer_append(f"t{i % 10}", slot(f"m{i}")) for i in range(100)),
            *(backend.registry_setdefault(f'["a","r{i}"]', f"u{i}") for i in range(20)),
        )
        reads = await server_reads(redis_server.url) - reads
        calls = await script_calls(redis_server.url) - calls
        after = backend.statistics()
        assert sorted(indexes[:100]) == sorted(list(range(10)) * 10)
        assert indexes[100:] == [f"u{i}" for i in range(20)]
        assert calls == 1, "120 writes of one loop tick: one script call"
        assert after.commands - before.commands == 1
        assert after.folded - before.folded == 120
        assert after.round_trips - before.round_trips == 1, "one pipeline for one loop tick"
        # The server's view: the INFO connections' own reads, plus a few for the call.
        assert reads <= 10, reads
        for t in range(10):
            history = await backend.buffer_get_thread(f"t{t}")
            assert [s.message_id for s in history] == [f"m{i}" for i in range(t, 100, 10)]
            assert [s.index for s in history] == list(range(10))

        before = backend.statistics()
        for i in range(10):
            await backend.buffer_append("seq", slot(f"m{i}"))
        assert backend.statistics().round_trips - before.round_trips == 10, "one each"
    finally:
        await backend.aclose()


async def test_concurrent_reads_are_pipelined(redis_server: RedisServer) -> None:
    backend = RedisBackend.from_url(redis_server.url, prefix=new_prefix())
    try:
        await backend.buffer_append("t", slot("m"))
        before = backend.statistics()
        lengths = await asyncio.gather(*(backend.buffer_thread_len("t") for _ in range(100)))
        after = backend.statistics()
        assert lengths == [1] * 100
        assert after.commands - before.commands == 100
        assert after.round_trips - before.round_trips == 1, "one pipeline for one loop tick"
        assert after.largest_batch == 100
    finally:
        await backend.aclose()


async def test_one_failing_item_does_not_fail_the_others(redis_server: RedisServer) -> None:
    """A frame Redis lost half of, and a key of the wrong type, fail their own writes
    only: the other writes of the same script call are made."""
    prefix = new_prefix()
    backend = RedisBackend.from_url(redis_server.url, prefix=prefix)
    try:
        async with raw_client(redis_server.url) as r:
            await r.rpush(f"{prefix}:hist:lost", b"x")  # its index is gone
            await r.set(f"{prefix}:hist:wrong", b"not a list")
            await r.set(f'{prefix}:chain:["a","half"]', b"u-half")  # no uuid key
        await backend.buffer_append("warm", slot("m"))
        before = backend.statistics()
        results = await asyncio.gather(
            backend.buffer_append("t", slot("m0")),
            backend.buffer_append("lost", slot("m1")),
            backend.buffer_append("t", slot("m2")),
            backend.buffer_append("wrong", slot("m3")),
            backend.registry_setdefault('["a","half"]', "u-new"),
            backend.registry_setdefault('["a","r"]', "u1"),
            backend.buffer_append("t", slot("m4")),
            return_exceptions=True,
        )
        assert backend.statistics().commands - before.commands == 1, "one script call"
        assert results[0] == 0 and results[2] == 1 and results[6] == 2
        assert results[5] == "u1"
        assert isinstance(results[1], BackendCorrupted), results[1]
        assert "lost" in str(results[1])
        assert isinstance(results[3], BackendError), results[3]
        assert not isinstance(results[3], BackendUnavailable)
        assert "WRONGTYPE" in str(results[3])
        assert isinstance(results[4], BackendCorrupted), results[4]
        assert [s.message_id for s in await backend.buffer_get_thread("t")] == ["m0", "m2", "m4"]
        assert await backend.buffer_thread_len("lost") == 1, "nothing written to it"
        assert await backend.registry_get_chain("u1") == '["a","r"]'
        assert await backend.buffer_append("t", slot("m5")) == 3, "the backend goes on"
    finally:
        await backend.aclose()


# -- failures --------------------------------------------------------------------------


async def test_a_lost_reply_is_retried_and_the_slot_recorded_once(
    redis_server: RedisServer,
) -> None:
    async with LossyProxy(redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, prefix=new_prefix(), retries=3, outage_s=0)
        try:
            await backend.ping()
            proxy.drop_next_reply()
            assert await backend.buffer_append("t", slot("m0")) == 0
            assert proxy.dropped == 1 and proxy.connections == 2, "it reconnected"
            assert backend.statistics().retries == 1
            assert [s.message_id for s in await backend.buffer_get_thread("t")] == ["m0"]

            proxy.drop_next_reply()
            assert await backend.registry_setdefault('["a","r"]', "u1") == "u1"
            assert await backend.registry_setdefault('["a","r"]', "u2") == "u1"

            proxy.drop_next_reply()
            letter = DeadLetter("", 1.0, "malformed", "lost once", None, None, None, b"")
            await backend.deadletter_add(letter)
            assert [x.reason for x in await backend.deadletter_list()] == ["lost once"]
            assert proxy.dropped == 3
        finally:
            await backend.aclose()


async def test_a_retried_script_call_writes_each_item_once(redis_server: RedisServer) -> None:
    """The reply to a call carrying a tick's appends and registry writes is lost: the
    whole call is sent again, and each slot is still recorded once, at its index."""
    async with LossyProxy(redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, prefix=new_prefix(), retries=3, outage_s=0)
        try:
            await backend.buffer_append("warm", slot("m"))
            before = backend.statistics()
            proxy.drop_next_reply()
            results = await asyncio.gather(
                *(backend.buffer_append(f"t{i % 4}", slot(f"m{i}")) for i in range(20)),
                *(backend.registry_setdefault(f'["a","r{i}"]', f"u{i}") for i in range(5)),
            )
            after = backend.statistics()
            assert proxy.dropped == 1 and after.retries - before.retries == 1
            assert after.commands - before.commands == 2, "one call, sent twice"
            assert results[:20] == [i // 4 for i in range(20)]
            assert results[20:] == [f"u{i}" for i in range(5)]
            for t in range(4):
                history = await backend.buffer_get_thread(f"t{t}")
                assert [s.message_id for s in history] == [f"m{i}" for i in range(t, 20, 4)]
                assert [s.index for s in history] == list(range(5))
            assert await backend.registry_list_all() == {f"u{i}": f'["a","r{i}"]' for i in range(5)}
        finally:
            await backend.aclose()


async def test_a_batch_of_dead_letters_is_one_command(redis_server: RedisServer) -> None:
    async with factory_for(redis_server.url)(HistoryLimits(max_dead_letters=150)) as backend:
        assert isinstance(backend, RedisBackend)
        await backend.ping()
        letters = [DeadLetter("", 1.0, "shutdown", f"r{i}", "l", "t", f"m{i}", b"<x/>")
                   for i in range(200)]  # fmt: skip
        before = backend.statistics()
        ids = await backend.deadletter_add_many(letters)
        after = backend.statistics()
        assert (after.commands - before.commands, after.round_trips - before.round_trips) == (1, 1)
        assert [x.id for x in await backend.deadletter_list()] == ids[50:]
        assert (await backend.info())["dead_letters_dropped"] == 50


async def test_a_lost_reply_to_a_batch_of_dead_letters_stores_it_once(
    redis_server: RedisServer,
) -> None:
    async with LossyProxy(redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, prefix=new_prefix(), retries=3, outage_s=0)
        try:
            await backend.ping()
            proxy.drop_next_reply()
            letters = [DeadLetter("", 1.0, "shutdown", f"r{i}", None, None, None, b"")
                       for i in range(3)]  # fmt: skip
            ids = await backend.deadletter_add_many(letters)
            assert proxy.dropped == 1 and backend.statistics().retries == 1
            stored = await backend.deadletter_list()
            assert [x.id for x in stored] == ids
            assert [x.reason for x in stored] == ["r0", "r1", "r2"]
            await backend.deadletter_purge()
        finally:
            await backend.aclose()


async def test_a_reply_too_slow_is_a_timeout_and_the_append_is_retried(
    redis_server: RedisServer,
) -> None:
    async with LossyProxy(redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, prefix=new_prefix(), socket_timeout_s=0.3)
        try:
            assert await backend.buffer_append("t", slot("m0")) == 0
            proxy.stall_next_reply()
            started = time.monotonic()
            assert await backend.buffer_append("t", slot("m1")) == 1
            assert 0.3 <= time.monotonic() - started < 2
            assert proxy.dropped == 1 and backend.statistics().retries == 1
            assert [s.message_id for s in await backend.buffer_get_thread("t")] == ["m0", "m1"]
        finally:
            await backend.aclose()


async def test_two_clients_share_one_store(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    one = RedisBackend.from_url(redis_server.url, prefix=prefix)
    two = RedisBackend.from_url(redis_server.url, prefix=prefix)
    try:
        indexes = await asyncio.gather(
            *(b.buffer_append("t", slot(f"m{i}")) for i in range(100) for b in (one, two))
        )
        assert sorted(set(indexes)) == list(range(100)), "each message once, whoever wrote it"
        winners = await asyncio.gather(
            *(b.registry_setdefault('["o","r"]', f"u{i}") for i in range(20) for b in (one, two))
        )
        assert len(set(winners)) == 1
        assert await two.buffer_get_thread("t") == await one.buffer_get_thread("t")
    finally:
        await one.buffer_clear()
        await one.registry_clear()
        await one.aclose()
        await two.aclose()


async def test_a_lost_reply_to_a_delete_is_not_retried(redis_server: RedisServer) -> None:
    async with LossyProxy(redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, prefix=new_prefix(), retries=3, outage_s=0)
        try:
            await backend.registry_set('["a","r"]', "u1")
            assert not await backend.registry_delete("u0")  # the server knows the script now
            proxy.drop_next_reply()
            with pytest.raises(BackendUnavailable, match="may or may not have been applied"):
                await backend.registry_delete("u1")
            assert backend.statistics().retries == 0
            assert await backend.registry_get_chain("u1") is None, "it was applied"
        finally:
            await backend.aclose()


async def test_ping_when_redis_is_down_is_quick_and_one_line() -> None:
    port = closed_port()
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", connect_timeout_s=2)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await backend.ping()
        assert time.monotonic() - started < 1.0
        assert str(info.value) == f"redis://127.0.0.1:{port}/0 is unreachable: Connection refused"
        assert info.value.__cause__ is not None, "chained to redis's exception"
    finally:
        await backend.aclose()


async def test_commands_give_up_after_the_bounded_retries() -> None:
    port = closed_port()
    # outage_s=0: the retries alone bound it.
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", retries=3, outage_s=0)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="unreachable: Connection refused"):
            await backend.buffer_append("t", slot("m"))
        elapsed = time.monotonic() - started
        # Backoff 0.1, 0.2, 0.4 s, each jittered to between half and all of it.
        assert 0.35 <= elapsed < 1.5, elapsed
        assert backend.statistics().retries == 3
    finally:
        await backend.aclose()


async def test_ping_to_a_server_that_never_answers_is_bounded() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, read, never answer
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await backend.ping()
        assert time.monotonic() - started < 1.0
    finally:
        await backend.aclose()
        server.close()
        await server.wait_closed()


async def test_ping_to_something_that_is_not_redis_is_one_line() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", connect_timeout_s=2)
    try:
        with pytest.raises(BackendUnavailable, match=r"is unreachable: .*Protocol error") as info:
            await backend.ping()
        assert "\n" not in str(info.value)
    finally:
        await backend.aclose()
        server.close()
        await server.wait_closed()


def test_cli_with_redis_down_says_one_line(tmp_path: Path) -> None:
    shutil.copy(ROOT / "organisms" / "hello.py", tmp_path / "hello.py")
    port = closed_port()
    yaml_text = HELLO.read_text() + f"\nbackend: redis://127.0.0.1:{port}/0\n"
    (tmp_path / "hello.yaml").write_text(yaml_text)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", str(tmp_path / "hello.yaml")],
        capture_output=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 15
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert f"redis://127.0.0.1:{port}/0 is unreachable: Connection refused" in lines[0]
    assert b"Traceback" not in result.stderr
    assert result.stdout == b""


# -- the pump on Redis -----------------------------------------------------------------


def hello_on(url: str, **options: Any) -> Any:
    organism = load_organism(HELLO, backend=url)
    return dataclasses.replace(organism, backend_options={"prefix": new_prefix(), **options})


async def greet(pump: StreamPump, name: str) -> Any:
    return await pump.request(GREETING.format(name), to="greeter", sender=f"caller-{name}",
                              timeout=30)  # fmt: skip


async def check_histories(pump: StreamPump, roots: set[str]) -> None:
    """Every conversation: its root, greeter's and shouter's frames, each recorded once."""
    backend = pump.backend
    chains = await backend.registry_list_all()
    threads = await backend.buffer_list_threads()
    assert len(threads) == 3 * len(roots)
    per_root: Counter[str] = Counter()
    for thread in threads:
        slots = await backend.buffer_get_thread(thread)
        frame = await pump._frames.resolve(thread)
        assert frame is not None and chains[thread] == frame.chain
        per_root[frame.root] += 1
        name = frame.origin.removeprefix("caller-").encode()
        keys = [(s.message_id, s.direction) for s in slots]
        assert len(keys) == len(set(keys)), "a message recorded twice on one frame"
        assert all(name.upper() in s.xml.upper() for s in slots), "a foreign message"
        assert [s.index for s in slots] == list(range(len(slots)))
        directions = [s.direction for s in slots]
        if not frame.hops:
            assert directions == ["out", "in"]
        elif frame.hops == ("greeter",):
            assert directions == ["in", "out", "in", "out"]
        else:
            assert frame.hops == ("greeter", "shouter") and directions == ["in", "out"]
    assert set(per_root) == roots and set(per_root.values()) == {3}


async def test_the_pump_end_to_end_on_redis(redis_server: RedisServer) -> None:
    replies: list[Any] = []
    calls = await script_calls(redis_server.url)
    async with StreamPump(hello_on(redis_server.url), egress=replies.append) as pump:
        assert isinstance(pump.backend, RedisBackend)
        names = [f"p{i}" for i in range(200)]
        results = await asyncio.gather(*(greet(pump, n) for n in names))
        await pump.wait_idle()
        stats = pump.backend.statistics()
        calls = await script_calls(redis_server.url) - calls
        assert [r.payload.text for r in results] == [f"HELLO, {n.upper()}!" for n in names]
        await check_histories(pump, {r.thread_id for r in results})
        # Each conversation writes 4 registry entries and 6 slots: folded, far fewer calls.
        assert stats.folded >= 10 * len(names), stats
        assert stats.commands < stats.folded / 4, stats
        # The server's view: the hops' writes reached it in few script calls.
        assert calls < stats.folded / 4, (calls, stats)
        await pump.backend.buffer_clear()
        await pump.backend.registry_clear()
    assert len(replies) == 200


async def test_the_pump_waits_through_an_outage_longer_than_its_retries(tmp_path: Path) -> None:
    """Redis down for 8 s (killed, restarted from its AOF) with 3,000 conversations
    in flight: the five retries alone last ~3 s, but commands keep being retried for
    redis.outage_s (default 120 s), so every conversation is answered, once."""
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    replies: list[Reply] = []
    try:
        async with StreamPump(hello_on(server.url), egress=replies.append) as pump:
            tasks = [asyncio.create_task(greet(pump, f"n{i}")) for i in range(3000)]
            await until(lambda: len(replies) >= 300, "300 replies before the outage")
            await asyncio.to_thread(server.kill)
            in_flight = sum(not task.done() for task in tasks)
            # The outage itself, the scenario under test (not a wait for something):
            # 8 s, well past what the 5 retries alone ride out (about 3 s).
            await asyncio.sleep(8)
            await asyncio.to_thread(server.start)
            results = await asyncio.gather(*tasks)
            await pump.wait_idle()
    finally:
        await asyncio.to_thread(server.stop)
    assert in_flight > 1000, in_flight
    assert [r.payload.text for r in results] == [f"HELLO, N{i}!" for i in range(3000)]
    assert sorted(Counter(r.re for r in replies).values()) == [1] * 3000, "each answered once"


async def test_the_pump_rides_out_a_redis_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.backends.redis")
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    try:
        # retries=8: up to 4.5 to 9 s of backoff, room for a slow restart on a busy machine.
        async with StreamPump(hello_on(server.url, retries=8)) as pump:
            backend = pump.backend
            first = await asyncio.gather(*(greet(pump, f"a{i}") for i in range(50)))
            await pump.wait_idle()
            acknowledged = {
                thread: await backend.buffer_get_thread(thread)
                for thread in await backend.buffer_list_threads()
            }
            assert len(acknowledged) == 150

            await asyncio.to_thread(server.kill)
            during = [asyncio.create_task(greet(pump, f"b{i}")) for i in range(50)]
            await asyncio.sleep(0.2)  # they meet the outage
            assert not any(task.done() for task in during)
            await asyncio.to_thread(server.start)
            second = await asyncio.gather(*during)
            third = await asyncio.gather(*(greet(pump, f"c{i}") for i in range(50)))
            await pump.wait_idle()

            for batch, letter in ((first, "A"), (second, "B"), (third, "C")):
                assert [r.payload.text for r in batch] == [
                    f"HELLO, {letter}{i}!" for i in range(50)
                ]
            for thread, slots in acknowledged.items():
                assert await backend.buffer_get_thread(thread) == slots, "a slot was lost"
            await check_histories(pump, {r.thread_id for r in (*first, *second, *third)})
            assert await backend.deadletter_list() == []
            assert backend.statistics().retries > 0
    finally:
        await asyncio.to_thread(server.stop)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert f"{server.url} is unreachable (" in messages[0], messages
    assert f"{server.url} is reachable again after" in messages[1], messages


async def test_dead_letters_kept_before_the_budget_are_counted_and_expire(
    redis_server: RedisServer,
) -> None:
    """Letters written by a release without the budget (no byte count, no time) are
    counted once by the first dead-letter script, and expire like the others; deleting
    them never drives the count below 0."""
    prefix = f"test-upgrade-{uuid.uuid4().hex[:12]}"
    limits = HistoryLimits(dead_letter_ttl_s=1.0)
    backend = RedisBackend.from_url(redis_server.url, limits, prefix=prefix)
    old = [DeadLetter(f"old-{i}", 1.0, "malformed", "r", None, None, None, b"x" * 100)
           for i in range(3)]  # fmt: skip
    try:
        async with raw_client(redis_server.url) as r:
            for i, letter in enumerate(old):
                await r.zadd(f"{prefix}:dl:ids", {letter.id: i + 1})
                await r.hset(f"{prefix}:dl:data", letter.id, dead_letter_to_bytes(letter))
        assert await backend.deadletter_delete("old-0")
        info = await backend.info()
        assert info["dead_letter_bytes"] == 2 * len(dead_letter_to_bytes(old[1])), info
        assert [x.id for x in await backend.deadletter_list()] == ["old-1", "old-2"]
        await until(lambda: _no_letters(backend), "the old letters expired", 10)
        info = await backend.info()
        assert (info["dead_letter_bytes"], info["dead_letters_expired"]) == (0, 2), info
    finally:
        await backend.deadletter_purge()
        await backend.aclose()


async def _no_letters(backend: RedisBackend) -> bool:
    return await backend.deadletter_list() == []
