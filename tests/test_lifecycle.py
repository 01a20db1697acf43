"""The pump's lifetime: every way out of ``async with StreamPump`` stops everything.

Each test leaves the pump while it is busy (an inline handler waiting, a sync
handler in its thread, a cpu_bound handler in a worker process) and checks what is
left: no worker process, no pump task, the garbage collector as it was, and every
accepted message answered or dead-lettered (in batches, within a deadline).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import worker_handlers as wh
from support import Ping, ping_xml, pong

from xml_pipeline import (
    DeadLetter,
    Huh,
    Listener,
    Organism,
    ProcessPoolSettings,
    PumpClosed,
    PumpError,
    PumpSettings,
    StreamPump,
)
from xml_pipeline.backends.memory import MemoryBackend

_started = threading.Event()


def _blocking(payload: Ping, meta: Any) -> None:
    _started.set()
    time.sleep(0.2)


async def _forever(payload: Ping, meta: Any) -> None:
    await asyncio.Event().wait()


def _organism(**settings: Any) -> Organism:
    return Organism(
        name="life",
        listeners=(
            Listener("inline", (Ping,), _forever, concurrency=4),
            Listener("sync", (Ping,), _blocking, concurrency=2),
            Listener("cpu", (Ping, Huh), wh.faulty, cpu_bound=True, concurrency=4, timeout_s=30),
            Listener("echo", (Ping,), pong),
        ),
        settings=PumpSettings(drain_timeout_s=5, **settings),
        process_pool=ProcessPoolSettings(workers=2),
    )


def _descendants() -> set[int]:
    """Pids of this process's live descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier}
        frontier = children - found
        found |= children
    return found


def _pump_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().startswith(("listener ", "xml_pipeline"))
    ]


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def _busy(pump: StreamPump) -> set[int]:
    """Give every kind of listener work that is still running; return the workers' pids."""
    _started.clear()
    for i in range(3):
        await pump.inject(ping_xml(i), to="inline")
        await pump.inject(ping_xml(i), to="sync")
        await pump.inject(ping_xml(i, "hang"), to="cpu")
    for i in range(20):
        await pump.inject(ping_xml(100 + i), to="inline")  # queued behind the others
    await _wait_for(lambda: _started.is_set() and pump.statistics().listeners["cpu"].in_flight > 0)
    pool = pump.statistics().pool
    workers = set(pool.pids) if pool is not None else set()
    if not workers or not workers <= _descendants():
        raise AssertionError(f"the worker processes {workers} are not running")
    return workers


async def _check_nothing_left(workers: set[int], thresholds: tuple[int, int, int]) -> None:
    await _wait_for(lambda: not (workers & _descendants()), timeout=5)
    assert _pump_tasks() == []
    assert gc.get_threshold() == thresholds


async def _leave(way: str, pump_box: list[StreamPump], workers: list[set[int]]) -> None:
    """Leave a busy pump the way named."""

    async def body(pump: StreamPump) -> None:
        pump_box.append(pump)
        workers.append(await _busy(pump))

    if way == "move_on_after":
        with anyio.move_on_after(60) as scope:
            async with StreamPump(_organism()) as pump:
                await body(pump)
                scope.cancel()
                await anyio.sleep_forever()
    elif way == "asyncio.timeout":
        with pytest.raises(TimeoutError):  # noqa: PT012 - leaving the blocks is the test
            async with asyncio.timeout(60) as timeout:
                async with StreamPump(_organism()) as pump:
                    await body(pump)
                    timeout.reschedule(asyncio.get_running_loop().time())
                    await asyncio.Event().wait()
    elif way == "second cancel":
        busy = asyncio.Event()

        async def run() -> None:
            async with StreamPump(_organism()) as pump:
                await body(pump)
                busy.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(run())
        await busy.wait()
        task.cancel()
        # Cancel again while the pump is cleaning up.
        await _wait_for(lambda: pump_box[0]._state != "running")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif way == "failing sibling":

        async def fail_when(event: anyio.Event) -> None:
            await event.wait()
            raise ValueError("sibling failed")

        ready = anyio.Event()
        with pytest.raises(ExceptionGroup) as info:  # noqa: PT012
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail_when, ready)
                async with StreamPump(_organism()) as pump:
                    await body(pump)
                    ready.set()
                    await anyio.sleep_forever()
        assert info.group_contains(ValueError, match="sibling failed")
    else:
        raise ValueError(way)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "way", ["move_on_after", "asyncio.timeout", "second cancel", "failing sibling"]
)
async def test_every_way_out_stops_everything(way: str) -> None:
    thresholds = gc.get_threshold()
    pumps: list[StreamPump] = []
    workers: list[set[int]] = []
    await _leave(way, pumps, workers)
    await _check_nothing_left(workers[0], thresholds)
    pump = pumps[0]
    stats = pump.statistics()
    # Everything accepted and not answered was dead-lettered: 3 running and 20 queued
    # inline, 3 sync (running or queued), 3 cpu_bound.
    assert stats.abandoned == 29
    letters = await pump.backend.deadletter_list()
    assert sum(1 for letter in letters if letter.code == "shutdown") == 29
    with pytest.raises(PumpClosed):
        await pump.inject(ping_xml(1), to="echo")


async def test_a_pump_runs_once() -> None:
    pump = StreamPump(_organism())
    with pytest.raises(PumpClosed):
        await pump.inject(ping_xml(1), to="echo")
    async with pump:
        with pytest.raises(PumpError, match="running already"):
            await pump.__aenter__()
        reply = await pump.request(ping_xml(1), to="echo", timeout=10)
        assert reply.payload.n == 1  # type: ignore[attr-defined]
    with pytest.raises(PumpError, match="closed"):
        async with pump:
            pass


async def test_an_error_in_the_body_reaches_the_caller_as_it_is() -> None:
    with pytest.raises(KeyError):
        async with StreamPump(Organism("t", (Listener("echo", (Ping,), pong),))):
            raise KeyError("mine")


async def test_aclose_inside_the_body_does_not_cancel_it() -> None:
    organism = Organism("t", (Listener("echo", (Ping,), pong),))
    async with StreamPump(organism) as pump:
        await pump.aclose()
        await asyncio.sleep(0)  # a checkpoint: the body goes on
        await pump.aclose()  # idempotent
    assert _pump_tasks() == []


class _CountingBackend(MemoryBackend):
    """Counts dead-letter writes; can be made slow."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.single = 0
        self.batches: list[int] = []
        self.delay = delay

    async def deadletter_add(self, letter: DeadLetter) -> str:
        self.single += 1
        return await super().deadletter_add(letter)

    async def deadletter_add_many(self, letters: Any) -> list[str]:
        self.batches.append(len(letters))
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().deadletter_add_many(letters)


def _queue_organism(drain_timeout_s: float = 5) -> Organism:
    return Organism(
        "t",
        (Listener("inline", (Ping,), _forever, concurrency=1),),
        settings=PumpSettings(drain_timeout_s=drain_timeout_s, queue_size=5000),
    )


async def test_shutdown_dead_letters_in_batches() -> None:
    backend = _CountingBackend()
    async with StreamPump(_queue_organism(), backend=backend) as pump:
        for i in range(1200):
            await pump.inject(ping_xml(i), to="inline")
        await _wait_for(lambda: pump.statistics().listeners["inline"].in_flight == 1)
    assert pump.statistics().abandoned == 1200
    assert backend.single == 0
    assert sum(backend.batches) == 1200 and len(backend.batches) == 3
    assert len(await backend.deadletter_list()) == min(1200, backend.limits.max_dead_letters)


@pytest.mark.timeout(30)
async def test_shutdown_is_bounded_when_the_backend_hangs(caplog: pytest.LogCaptureFixture) -> None:
    backend = _CountingBackend(delay=3600)
    started = time.monotonic()
    async with StreamPump(_queue_organism(drain_timeout_s=0.5), backend=backend) as pump:
        for i in range(10):
            await pump.inject(ping_xml(i), to="inline")
        await _wait_for(lambda: pump.statistics().listeners["inline"].in_flight == 1)
    assert time.monotonic() - started < 10
    assert pump.statistics().abandoned == 10
    assert any("could not write 10 dead letter(s)" in r.getMessage() for r in caplog.records)


async def test_a_waiting_request_gets_abandoned_at_shutdown() -> None:
    from xml_pipeline import Abandoned

    organism = _queue_organism()
    async with StreamPump(organism) as pump:
        request = asyncio.ensure_future(pump.request(ping_xml(1), to="inline"))
        await _wait_for(lambda: pump.statistics().listeners["inline"].in_flight == 1)
    with pytest.raises(Abandoned):
        await request
    assert pump._waiters == {}
