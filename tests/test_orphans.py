"""Worker lifecycle: no process outlives the pump, signals drain instead of crashing.

Real processes and real signals: a command-line pump killed with ``kill -9``, a
SIGTERM sent to its whole process group, a worker sent SIGTERM on its own; and the
pool's own guarantees (a failure while answering a batch fails its tasks, ``aclose()``
is bounded and cancellable, the workers' CPU time is reported).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import worker_handlers as wh
from support import Pong, ping_xml
from test_worker import (
    POOL,
    alive,
    descendants,
    offloaded,
    started,
    wait_for,
    wait_until,
    worker_pids,
)

from xml_pipeline import HandlerFailed, Organism, ProcessPoolSettings, StreamPump
from xml_pipeline.offload import WorkerPool, worker_spec
from xml_pipeline.worker import Meta

ROOT = Path(__file__).resolve().parent.parent
META = Meta(
    thread_id="thread-1",
    from_id="api",
    own_name="cpu",
    message_id="m-1",
    is_self_call=False,
    depth=1,
    from_external=True,
)

# -- the command line ------------------------------------------------------------------

HANDLERS = """
import os
import time
from pathlib import Path

from xml_pipeline import HandlerResponse, Payload

HERE = Path(__file__).parent


class Ping(Payload):
    xml_ns = "urn:t"
    n: int


class Done(Payload):
    xml_ns = "urn:t"


def work(payload, meta):
    (HERE / f"worker.{os.getpid()}").touch()  # this worker is busy
    end = time.monotonic() + (60 if payload.n < 0 else 0.01)
    while time.monotonic() < end:  # computing, not sleeping
        pass
    return HandlerResponse.respond(payload)


async def done(payload, meta):
    (HERE / "ingested").touch()  # every line before this one was accepted
    return HandlerResponse.respond(payload)
"""


def organism(tmp_path: Path, start_method: str = "forkserver") -> Path:
    (tmp_path / "lifecycle.py").write_text(HANDLERS)
    path = tmp_path / "organism.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            organism: {{name: lifecycle}}
            pump: {{drain_timeout_s: 60}}
            process_pool: {{workers: 2, start_method: {start_method}}}
            listeners:
              - {{name: e, payload: lifecycle:Ping, handler: lifecycle:work, cpu_bound: true,
                 concurrency: 256}}
              - {{name: d, payload: lifecycle:Done, handler: lifecycle:done}}
            """
        )
    )
    return path


def start_cli(tmp_path: Path, path: Path, lines: list[bytes]) -> subprocess.Popen[bytes]:
    source = tmp_path / "input.xml"
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    return subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "run", str(path), "--input", str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,  # its own process group, for killpg
    )


def ping(n: int) -> bytes:
    return b'<Ping xmlns="urn:t"><n>%d</n></Ping>' % n


def busy_workers(tmp_path: Path) -> int:
    return len(list(tmp_path.glob("worker.*")))


def kill_all(proc: subprocess.Popen[bytes], family: set[int]) -> None:
    """Leave nothing behind, whatever the test found."""
    for pid in family:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_kill_9_of_the_pump_leaves_no_process(tmp_path: Path, start_method: str) -> None:
    proc = start_cli(tmp_path, organism(tmp_path, start_method), [ping(-1) for _ in range(4)])
    family: set[int] = set()
    try:
        wait_for(lambda: busy_workers(tmp_path) == 2, "both workers busy")
        family = descendants(proc.pid)
        # The workers, the resource tracker, and with forkserver the fork server.
        assert len(family) >= (4 if start_method == "forkserver" else 3), family
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 2
        while any(alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.01)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in family if alive(pid)}
        assert not left, f"processes outlived the pump by 2 s: {left}"
    finally:
        kill_all(proc, family)


def test_sigterm_to_the_process_group_drains_without_a_crash(tmp_path: Path) -> None:
    total = 200
    lines = [ping(n) for n in range(total)] + [b'<Done xmlns="urn:t"/>']
    proc = start_cli(tmp_path, organism(tmp_path), lines)
    family: set[int] = set()
    try:
        wait_for(lambda: (tmp_path / "ingested").exists(), f"the {total} messages accepted")
        wait_for(lambda: busy_workers(tmp_path) == 2, "both workers busy")
        family = descendants(proc.pid)
        assert len(family) >= 4, family  # two workers, the fork server, the resource tracker
        # As systemd (KillMode=control-group), `kill -- -PGID` or Ctrl-C do: every
        # process of the group gets the signal, the workers and the fork server too.
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {err!r}"
        answered = [int(n) for n in re.findall(rb"<n>(-?\d+)</n>", out)]
        assert sorted(answered) == list(range(total)), "every accepted message is answered"
        for word in (b"died", b"crash", b"Broken", b"Traceback", b"dead-letter"):
            assert word not in err, err
        wait_for(lambda: not any(alive(pid) for pid in family), "every process of the pump exits")
    finally:
        kill_all(proc, family)


# -- a pump in this process ------------------------------------------------------------


async def test_a_worker_ignores_sigterm(run_pump: Any, tmp_path: Path) -> None:
    async with run_pump([offloaded(wh.marked)], process_pool=POOL) as h:
        pids = worker_pids(h.pump)
        assert len(pids) == 2
        victim = min(pids)
        requests = asyncio.gather(
            *(h.pump.request(ping_xml(i, f"{tmp_path}|sleep"), to="cpu") for i in range(20))
        )
        await wait_until(
            lambda: any(name.endswith(f".{victim}") for name in started(tmp_path)),
            "the victim runs a message",
        )
        os.kill(victim, signal.SIGTERM)
        replies = await requests
        assert all(isinstance(r.payload, Pong) for r in replies)
        stats = h.pump.statistics().pool
        assert stats is not None
        assert stats.crashes == 0
        assert victim in stats.pids and alive(victim)


async def test_the_organism_folder_does_not_shadow_installed_modules(tmp_path: Path) -> None:
    (tmp_path / "tabnanny.py").write_text("# a module that shadows the standard library's\n")
    organism = Organism(
        name="t",
        listeners=(offloaded(wh.module_file),),
        process_pool=ProcessPoolSettings(workers=1),
        path=tmp_path / "organism.yaml",
    )
    async with StreamPump(organism) as pump:
        reply = await pump.request(ping_xml(1, "tabnanny"), to="cpu")
    assert isinstance(reply.payload, Pong)
    assert Path(reply.payload.text).parent != tmp_path


# -- the pool itself -------------------------------------------------------------------


def pool_of(handler: Any = wh.faulty, workers: int = 1) -> WorkerPool:
    organism = Organism(
        name="t",
        listeners=(offloaded(handler),),
        process_pool=ProcessPoolSettings(workers=workers),
    )
    return WorkerPool(organism.process_pool, worker_spec(organism))


async def test_a_failure_while_answering_a_batch_fails_its_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = pool_of()
    await pool.start()
    try:

        def broken(*args: Any) -> None:
            raise RuntimeError("injected fault")

        # The worker dies, and handling its broken executor fails in the pool: the
        # caller gets an error instead of waiting forever.
        monkeypatch.setattr(pool, "_on_break", broken)
        with anyio.fail_after(20), pytest.raises(HandlerFailed, match="injected fault"):
            await pool.run("cpu", ping_xml(1, "exit"), META, None, None)
    finally:
        with anyio.fail_after(20):
            await pool.aclose()


async def test_aclose_is_bounded_with_workers_that_ignore_signals(tmp_path: Path) -> None:
    pool = pool_of(wh.stubborn, workers=2)
    await pool.start()
    pids = pool.statistics().pids
    assert len(pids) == 2
    hung = [
        asyncio.ensure_future(pool.run("cpu", ping_xml(i, f"{tmp_path}|hang"), META, None, None))
        for i in range(2)
    ]
    await wait_until(lambda: len(started(tmp_path)) == 2, "both workers hang")
    began = time.monotonic()
    with anyio.fail_after(10):
        await pool.aclose()
    assert time.monotonic() - began < 5
    assert not [pid for pid in pids if alive(pid)]
    assert pool.statistics().pids == ()
    await asyncio.gather(*hung, return_exceptions=True)
    assert all(task.cancelled() for task in hung)


async def test_aclose_cut_short_by_its_deadline_still_stops_every_worker(tmp_path: Path) -> None:
    pool = pool_of(wh.stubborn, workers=2)
    await pool.start()
    pids = pool.statistics().pids
    hung = asyncio.ensure_future(pool.run("cpu", ping_xml(1, f"{tmp_path}|hang"), META, None, None))
    await wait_until(lambda: len(started(tmp_path)) == 1, "a worker hangs")
    # As a pump's cleanup does: shielded from the caller's cancellation, with a deadline.
    with anyio.CancelScope(shield=True, deadline=anyio.current_time()):
        await pool.aclose()
    await wait_until(lambda: not any(alive(pid) for pid in pids), "every worker killed", 2)
    with anyio.fail_after(10):
        await pool.aclose()  # again: nothing left to do
    assert pool.statistics().pids == ()
    await asyncio.gather(hung, return_exceptions=True)


async def test_worker_cpu_time_is_reported() -> None:
    pool = pool_of(workers=2)
    await pool.start()
    try:
        before = pool.statistics().worker_cpu_s
        await asyncio.gather(
            *(pool.run("cpu", ping_xml(30, "burn"), META, None, None) for _ in range(10))
        )
        stats = pool.statistics()
        assert stats.worker_cpu_s >= before + 0.3  # ten messages of 30 ms of CPU each
    finally:
        await pool.aclose()
    assert pool.statistics().worker_cpu_s == stats.worker_cpu_s  # kept once closed
