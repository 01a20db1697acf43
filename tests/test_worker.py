"""cpu_bound listeners: handlers in worker processes, and every way a worker can fail."""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
import worker_handlers as wh
from support import Ping, Pong, ping_xml, pong

from xml_pipeline import (
    ConfigError,
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
    Organism,
    ProcessPoolSettings,
    Reply,
    StreamPump,
    worker,
)
from xml_pipeline.backends import Slot
from xml_pipeline.backends.memory import MemoryBackend

POOL = ProcessPoolSettings(workers=2)


def offloaded(handler: Any = wh.faulty, name: str = "cpu", **options: Any) -> Listener:
    options.setdefault("concurrency", 64)
    return Listener(name=name, payloads=(Ping, Huh), handler=handler, cpu_bound=True, **options)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(pump: StreamPump) -> set[int]:
    stats = pump.statistics().pool
    assert stats is not None
    return set(stats.pids)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Return once ``condition()`` holds (polled); fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.01)


def started(folder: Path) -> list[str]:
    """The ``<n>.<pid>`` files of the wh.marked handlers that started."""
    return sorted(p.name for p in folder.iterdir())


def huh_of(reply: Reply) -> Huh:
    assert isinstance(reply.payload, Huh), reply.payload
    return reply.payload


async def dead_codes(pump: StreamPump) -> list[str]:
    return [letter.code for letter in await pump.backend.deadletter_list()]


# -- results ---------------------------------------------------------------------------


@pytest.mark.parametrize("handler", [wh.echo, wh.echo_async], ids=["sync", "async"])
async def test_handler_runs_in_a_worker_process(run_pump: Any, handler: Any) -> None:
    async with run_pump([offloaded(handler)], process_pool=POOL) as h:
        replies = await asyncio.gather(*(h.pump.request(ping_xml(i), to="cpu") for i in range(200)))
        assert sorted(r.payload.n for r in replies) == list(range(200))
        pids = {int(r.payload.text.split()[-1]) for r in replies}
        assert os.getpid() not in pids
        assert pids <= worker_pids(h.pump)
        assert all(r.payload.by == "cpu" for r in replies)
        if handler is wh.echo_async:
            assert all(r.payload.text.startswith("async ") for r in replies)
        stats = h.pump.statistics()
        assert stats.pool is not None
        assert stats.pool.tasks == 200 and stats.pool.crashes == 0
        assert stats.pool.batches < 200  # batched
        assert stats.listeners["cpu"].handled == 200


async def test_an_unordered_fan_out_runs_on_every_worker_at_once(
    run_pump: Any, tmp_path: Path
) -> None:
    # One call sends 8 messages to the cpu_bound listener: they share a frame, and
    # being unordered they run at once; each waits until both workers have started
    # one of them (wh.rendezvous), which happens only if they run side by side.
    got: dict[str, list[Pong]] = {}

    async def fan(payload: Ping | Pong, meta: HandlerMetadata) -> object:
        if isinstance(payload, Ping):
            text = f"{tmp_path}|2"
            return [HandlerResponse(Ping(n=i, text=text), to="cpu") for i in range(8)]
        got.setdefault(meta.thread_id, []).append(payload)
        if len(got[meta.thread_id]) == 8:
            return HandlerResponse.respond(Pong(n=8, by="fan"))
        return None

    listeners = [
        Listener("fan", (Ping, Pong), fan),
        offloaded(wh.rendezvous, concurrency=8, ordered=False),
    ]
    async with run_pump(listeners, process_pool=POOL) as h:
        reply = await h.pump.request(ping_xml(0), to="fan", timeout=30)
        assert reply.payload == Pong(n=8, by="fan")
        [pongs] = got.values()
        assert sorted(p.n for p in pongs) == list(range(8))
        assert "gave-up" not in os.listdir(tmp_path)
        ran_on = {p.text.split()[0] for p in pongs}
        assert len(ran_on) == 2 and ran_on <= {str(pid) for pid in worker_pids(h.pump)}
        assert all(len(p.text.split()) == 3 for p in pongs)  # its pid, then both


async def test_an_unordered_listener_below_the_worker_count_is_reported(
    run_pump: Any, caplog: pytest.LogCaptureFixture
) -> None:
    listener = offloaded(wh.echo, concurrency=1, ordered=False)
    async with run_pump([listener], process_pool=POOL) as h:
        reply = await h.pump.request(ping_xml(1), to="cpu", timeout=30)
        assert reply.payload.n == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # Only this one about the listener (a slow machine may log a blocked loop besides).
    assert [w for w in warnings if "ordered: false" in w] == [
        "listener cpu is ordered: false, but its concurrency (1) is below "
        "process_pool.workers (2): one frame's fan-out uses at most 1 of them at once"
    ]


async def test_worker_responses_route_like_any_other(run_pump: Any) -> None:
    # inline "front" -> cpu_bound "cpu" forwards to inline "next", whose answer comes back.
    async def front(payload: Ping | Pong, meta: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Pong):
            return HandlerResponse.respond(payload)
        return HandlerResponse(payload, to="cpu")

    async def relay_back(payload: Pong, meta: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse.respond(payload)

    listeners = [
        Listener(name="front", payloads=(Ping, Pong), handler=front),
        Listener(name="cpu", payloads=(Ping, Pong), handler=wh.forward, cpu_bound=True),
        Listener(name="next", payloads=(Ping,), handler=pong),
    ]
    async with run_pump(listeners, process_pool=POOL) as h:
        replies = await asyncio.gather(
            *(h.pump.request(ping_xml(i), to="front") for i in range(50))
        )
        assert sorted(r.payload.n for r in replies) == list(range(1, 51))
        assert all(r.payload.by == "next" for r in replies)
        stats = h.pump.statistics()
        assert stats.listeners["cpu"].handled == 100  # each Ping, then each Pong


async def test_payload_invalid_in_the_worker_is_a_validation_huh(run_pump: Any) -> None:
    bad = b'<Ping xmlns="https://example.org/test"><n>not a number</n></Ping>'
    async with run_pump([offloaded()], process_pool=POOL) as h:
        reply = await h.pump.request(bad, to="cpu")
        huh = huh_of(reply)
        assert huh.code == "validation"
        assert "n" in huh.message
        assert await dead_codes(h.pump) == ["validation"]
        ok = await h.pump.request(ping_xml(1), to="cpu")
        assert isinstance(ok.payload, Pong)


RECORDS = [
    worker.Task(
        "cpu",
        b"<Ping/>",
        worker.Meta("t", "api", "cpu", "m-1", False, 2, True),
        [Slot(0, "in", "api", "cpu", "{urn:x}Ping", "m-1", 1.5, b"<Ping/>")],
    ),
    worker.Output(None, True, "{urn:x}Pong", "support:Pong", b"<Pong/>"),
    worker.Failure("validation", "PayloadInvalid", "cpu accepts Ping", ""),
    worker.Answer(
        0.25,
        [[worker.Output("a", False, "{urn:x}P", "m:P", b"")], worker.Failure("x", "E", "m", "tb")],
    ),
    worker.Ping(12, {"cpu": "cannot import"}),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_cross_the_process_boundary_as_themselves(record: tuple[Any, ...]) -> None:
    # The executor pickles with multiprocessing's pickler, which has a reducer of its own
    # for these records; plain pickle uses NamedTuple's.
    for data in (bytes(ForkingPickler.dumps(record)), pickle.dumps(record)):
        back = pickle.loads(data)
        assert back == record
        assert type(back) is type(record)
        assert [type(f) for f in back] == [type(f) for f in record]


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("raise", "handler-error", "ValueError: bad number 7"),
        ("bad-return", "invalid-return", "returned str"),
        ("control-char", "invalid-return", "XML cannot carry"),
    ],
)
async def test_handler_errors_in_a_worker(run_pump: Any, text: str, code: str, words: str) -> None:
    async with run_pump([offloaded()], process_pool=POOL) as h:
        pids = worker_pids(h.pump)
        reply = await h.pump.request(ping_xml(7, text), to="cpu")
        huh = huh_of(reply)
        assert huh.code == code
        assert words in huh.message
        assert await dead_codes(h.pump) == [code]
        assert worker_pids(h.pump) == pids  # the worker survived
        stats = h.pump.statistics()
        assert stats.pool is not None and stats.pool.crashes == 0


async def test_one_bad_answer_fails_only_its_own_message(run_pump: Any) -> None:
    pool = ProcessPoolSettings(workers=1)
    async with run_pump([offloaded(wh.unencodable)], process_pool=pool) as h:
        replies = await asyncio.gather(*(h.pump.request(ping_xml(i), to="cpu") for i in range(10)))
        kinds = {r.payload.n if isinstance(r.payload, Pong) else "huh" for r in replies}
        assert kinds == {0, 1, 2, 4, 5, 6, 7, 8, 9, "huh"}
        huh = next(huh_of(r) for r in replies if isinstance(r.payload, Huh))
        assert huh.code == "handler-error" and "TypeError" in huh.message


@pytest.mark.parametrize("text", ["exit", "kill", "segfault"])
async def test_a_message_that_kills_its_worker_is_isolated(run_pump: Any, text: str) -> None:
    async with run_pump([offloaded()], process_pool=POOL) as h:
        innocents = [h.pump.request(ping_xml(i, "sleep"), to="cpu") for i in range(20)]
        culprit = h.pump.request(ping_xml(99, text), to="cpu")
        replies = await asyncio.gather(culprit, *innocents)
        huh = huh_of(replies[0])
        assert huh.code == "worker-crashed"
        assert "died" in huh.message
        assert sorted(r.payload.n for r in replies[1:]) == list(range(20))
        assert all(isinstance(r.payload, Pong) for r in replies[1:])
        assert await dead_codes(h.pump) == ["worker-crashed"]
        stats = h.pump.statistics()
        assert stats.pool is not None
        assert stats.pool.crashes == POOL.max_crashes
        # The pump keeps serving with fresh workers.
        again = await asyncio.gather(*(h.pump.request(ping_xml(i), to="cpu") for i in range(10)))
        assert all(isinstance(r.payload, Pong) for r in again)


async def test_kill_9_a_worker_under_load_loses_nothing(run_pump: Any) -> None:
    total = 2000
    async with run_pump(
        [offloaded(concurrency=256)],
        process_pool=ProcessPoolSettings(workers=2, batch_max=16),
        max_in_pump=10_000,
        queue_size=4096,
    ) as h:
        pending = [
            asyncio.ensure_future(h.pump.request(ping_xml(i, "busy"), to="cpu"))
            for i in range(total)
        ]
        victims: list[int] = []
        for _ in range(3):
            while sum(f.done() for f in pending) < len(victims) * 400 + 200:
                await asyncio.sleep(0.01)
            victim = sorted(worker_pids(h.pump))[0]
            os.kill(victim, signal.SIGKILL)
            victims.append(victim)
        replies = await asyncio.gather(*pending)
        counted = Counter(r.payload.n for r in replies)
        assert sorted(counted) == list(range(total))
        assert set(counted.values()) == {1}
        # The killed worker's tasks were innocent: every message was answered.
        assert all(isinstance(r.payload, Pong) for r in replies)
        assert await dead_codes(h.pump) == []
        stats = h.pump.statistics()
        assert stats.pool is not None and stats.pool.crashes >= len(victims)
        assert stats.egress == total and stats.in_pump == 0
        for victim in victims:
            assert not alive(victim)
        more = await h.pump.request(ping_xml(1), to="cpu")
        assert isinstance(more.payload, Pong)


async def test_a_hung_handler_is_killed_at_its_timeout(run_pump: Any) -> None:
    async with run_pump([offloaded(timeout_s=0.5)], process_pool=POOL) as h:
        before = worker_pids(h.pump)
        started = time.monotonic()
        hung, *others = await asyncio.gather(
            h.pump.request(ping_xml(0, "hang"), to="cpu"),
            *(h.pump.request(ping_xml(i, "sleep"), to="cpu") for i in range(1, 11)),
        )
        assert time.monotonic() - started < 5
        huh = huh_of(hung)
        assert huh.code == "timeout"
        assert "0.5 s" in huh.message
        assert all(isinstance(r.payload, Pong) for r in others)
        assert await dead_codes(h.pump) == ["timeout"]
        stats = h.pump.statistics()
        assert stats.pool is not None and stats.pool.timeouts == 1
        # The hung worker is gone; new ones serve.
        await wait_until(
            lambda: not any(alive(pid) for pid in before - worker_pids(h.pump)),
            "the workers of the broken executor are gone",
        )
        assert before - worker_pids(h.pump), "the hung worker was replaced"
        reply = await h.pump.request(ping_xml(5), to="cpu")
        assert isinstance(reply.payload, Pong)


async def test_workers_are_recycled_after_recycle_after_tasks(run_pump: Any) -> None:
    pool = ProcessPoolSettings(workers=1, recycle_after=5)
    async with run_pump([offloaded(wh.echo)], process_pool=pool) as h:
        pids = []
        for i in range(23):
            reply = await h.pump.request(ping_xml(i), to="cpu")
            pids.append(int(reply.payload.text))
        stats = h.pump.statistics()
        assert stats.pool is not None
        assert stats.pool.recycles == 4
        assert len(set(pids)) == 5
        assert pids[:5] == [pids[0]] * 5  # each process served its five tasks
        await wait_until(
            lambda: sum(alive(pid) for pid in set(pids)) == 1, "the retired workers exited"
        )
        assert worker_pids(h.pump) == {pids[-1]}


async def test_worker_cpu_never_goes_down_while_a_slot_is_claimed_again(run_pump: Any) -> None:
    async with run_pump([offloaded(wh.echo)], process_pool=POOL) as h:
        for i in range(20):
            await h.pump.request(ping_xml(i), to="cpu")
        pool = h.pump._pool
        assert pool is not None

        def cpu() -> float:
            stats = h.pump.statistics().pool
            assert stats is not None
            return stats.worker_cpu_s

        before = cpu()
        assert before > 0
        # What a worker starting in a used slot does (worker.initialize): two steps
        # under the workers' lock, made here by another thread (the lock is reentrant),
        # with a read after each.
        lock = pool._control.get_lock()
        shared = pool._control.get_obj()
        slot = pool._status[0]
        steps = (
            lambda: setattr(shared, "retired_cpu_ns", shared.retired_cpu_ns + slot.cpu_ns),
            lambda: setattr(slot, "cpu_ns", 0),
        )
        todo: queue.Queue[Callable[[], None] | None] = queue.Queue()
        done: queue.Queue[bool] = queue.Queue()

        def reclaim() -> None:
            if not lock.acquire(timeout=5):
                done.put(False)
                return
            try:
                while (step := todo.get(timeout=10)) is not None:
                    step()
                    done.put(True)
            finally:
                lock.release()

        holder = threading.Thread(target=reclaim)
        holder.start()
        readings = []
        try:
            for step in steps:
                todo.put(step)
                assert await asyncio.to_thread(done.get, timeout=10)
                readings.append(cpu())
        finally:
            todo.put(None)
            await asyncio.to_thread(holder.join, 10)
        readings.append(cpu())
        assert readings == sorted(readings) and readings[0] >= before, readings
        assert readings[-1] == pytest.approx(before, abs=0.5), readings


async def test_memory_limit_gives_the_handler_a_memory_error(run_pump: Any) -> None:
    pool = ProcessPoolSettings(workers=1, memory_limit_mb=1024)
    async with run_pump([offloaded()], process_pool=pool) as h:
        reply = await h.pump.request(ping_xml(1, "memory"), to="cpu")
        huh = huh_of(reply)
        assert huh.code == "handler-error"
        assert "MemoryError" in huh.message
        ok = await h.pump.request(ping_xml(2), to="cpu")
        assert isinstance(ok.payload, Pong)
        stats = h.pump.statistics()
        assert stats.pool is not None and stats.pool.crashes == 0


# -- history ---------------------------------------------------------------------------


@pytest.mark.parametrize("handler", [wh.read_history, wh.read_history_async], ids=["sync", "async"])
async def test_history_snapshot_in_a_worker(run_pump: Any, handler: Any) -> None:
    listener = offloaded(handler, history_snapshot=True)
    async with run_pump([listener], process_pool=POOL) as h:
        reply = await h.pump.request(ping_xml(1), to="cpu")
        assert reply.payload.text == "in:api"


async def test_history_without_a_snapshot_says_how_to_get_one(run_pump: Any) -> None:
    async with run_pump([offloaded(wh.read_history)], process_pool=POOL) as h:
        huh = huh_of(await h.pump.request(ping_xml(1), to="cpu"))
        assert huh.code == "handler-error"
        assert "history_snapshot: true" in huh.message


async def test_history_from_redis_in_a_worker(redis_server: Any) -> None:
    organism = Organism(
        name="t",
        listeners=(offloaded(wh.read_history),),
        backend=redis_server.url,
        process_pool=POOL,
    )
    async with StreamPump(organism) as pump:
        first = await pump.request(ping_xml(1), to="cpu")
        assert first.payload.text == "in:api"
        again = await pump.request(ping_xml(2), to="cpu", thread=first.thread_id)
        assert again.payload.text == "in:api,out:cpu,in:api"


# -- configuration and shutdown --------------------------------------------------------


def test_a_local_function_cannot_be_cpu_bound() -> None:
    from xml_pipeline.offload import worker_spec

    def local(payload: Ping, meta: HandlerMetadata) -> None:
        return None

    organism = Organism(name="t", listeners=(offloaded(local),))
    with pytest.raises(ConfigError, match="importable by module path"):
        worker_spec(organism)


async def test_a_handler_workers_cannot_import_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "parent_only.py").write_text(
        "import multiprocessing\n"
        "from worker_handlers import echo\n"
        "if multiprocessing.parent_process() is not None:\n"
        "    raise ImportError('this module refuses to load in a worker')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import parent_only

    organism = Organism(
        name="t",
        listeners=(offloaded(parent_only.echo, handler_path="parent_only:echo"),),
        process_pool=ProcessPoolSettings(workers=1),
    )
    with pytest.raises(ConfigError, match="refuses to load in a worker"):
        async with StreamPump(organism):
            pass


def test_a_handler_without_a_module_level_name_needs_handler_path() -> None:
    import functools

    from xml_pipeline.offload import worker_spec

    organism = Organism(name="t", listeners=(offloaded(functools.partial(wh.echo)),))
    with pytest.raises(ConfigError, match="handler_path"):
        worker_spec(organism)


def test_history_snapshot_needs_cpu_bound() -> None:
    with pytest.raises(ConfigError, match="cpu_bound listeners only"):
        Listener(name="x", payloads=(Ping,), handler=pong, history_snapshot=True)


def test_process_pool_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="start_method"):
        ProcessPoolSettings(start_method="fork")
    with pytest.raises(ConfigError, match="batch_max"):
        ProcessPoolSettings(batch_max=0)
    assert ProcessPoolSettings().worker_count == (os.cpu_count() or 1)


async def test_spawn_start_method_works(run_pump: Any) -> None:
    pool = ProcessPoolSettings(workers=1, start_method="spawn")
    async with run_pump([offloaded(wh.echo)], process_pool=pool) as h:
        reply = await h.pump.request(ping_xml(3), to="cpu")
        assert reply.payload.n == 3


async def test_closing_the_pump_stops_every_worker(tmp_path: Path) -> None:
    backend = MemoryBackend()
    listener = offloaded(wh.marked, timeout_s=60)
    organism = Organism(name="t", listeners=(listener,), process_pool=POOL)
    async with StreamPump(organism, backend=backend) as pump:
        pids = worker_pids(pump)
        assert len(pids) == 2
        for i in range(4):
            await pump.inject(ping_xml(i, f"{tmp_path}|hang"), to="cpu")
        await wait_until(lambda: len(started(tmp_path)) == 2, "both workers run a message")
    assert not any(alive(pid) for pid in pids)
    # What was running or queued is dead-lettered, not lost.
    letters = await backend.deadletter_list()
    assert sorted(letter.code for letter in letters) == ["shutdown"] * 4


# -- the command line: signals drain offloaded work, and no process is left -----------

CPU_HANDLERS = """
import time
from pathlib import Path
from xml_pipeline import Payload, HandlerResponse

class Ping(Payload):
    xml_ns = "urn:t"
    n: int

def echo(payload, meta):
    if payload.n < 0:
        (Path(__file__).parent / f"started{payload.n}").touch()
        time.sleep(-payload.n)
    return HandlerResponse.respond(payload)
"""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Return once ``condition()`` holds (polled); fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.01)


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_drains_offloaded_work_and_leaves_no_process(tmp_path: Path, signum: int) -> None:
    (tmp_path / "cpuhandlers.py").write_text(CPU_HANDLERS)
    (tmp_path / "cpu.yaml").write_text(
        "organism: {name: cpu}\n"
        "pump: {drain_timeout_s: 3}\n"
        "process_pool: {workers: 2}\n"
        "listeners: [{name: e, payload: cpuhandlers:Ping, handler: cpuhandlers:echo, "
        "cpu_bound: true}]\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", str(tmp_path / "cpu.yaml"), "--input", "-",
         "--to", "e", "--stats"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'<Ping xmlns="urn:t"><n>1</n></Ping>\n')
        proc.stdin.flush()
        assert b"<n>1</n>" in proc.stdout.readline()  # up, and workers serve
        proc.stdin.write(b'<Ping xmlns="urn:t"><n>-1</n></Ping>\n')  # finishes in the drain
        proc.stdin.write(b'<Ping xmlns="urn:t"><n>-60</n></Ping>\n')  # does not
        proc.stdin.flush()
        wait_for(
            lambda: {p.name for p in tmp_path.glob("started*")} == {"started-1", "started-60"},
            "both workers run their message",
        )
        family = descendants(proc.pid)
        assert len(family) >= 3  # the fork server and two workers at least
        began = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.returncode >= 0, err  # (not killed by a signal)
    assert b"<n>-1</n>" in out, "offloaded work in flight was drained"
    assert b"<n>-60</n>" not in out
    assert b"dead-letter" in err and b"Traceback" not in err
    assert elapsed < 15
    wait_for(lambda: not any(alive(pid) for pid in family), "every process of the pump exits")
