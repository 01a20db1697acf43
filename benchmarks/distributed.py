"""Distributed benchmark: the 3-hop relay on the Redis Streams transport with 1, 2 and
3 node processes on one redis-server, against the same relay in one process.

    python benchmarks/distributed.py
    python benchmarks/distributed.py --messages 2000 --nodes 1,2 --concurrency 128

The script starts a ``redis-server`` (no persistence) on a free loopback port and,
for each case, N node processes (``python -m xml_pipeline run organisms/relay.yaml
--transport URL --backend URL --node nK``, every node serving every listener). A
``Client`` in this process sends ``--messages`` Hops with ``--concurrency`` requests
in flight and waits for every ``Done``; a message is 5 deliveries (relay.1 → relay.2 →
relay.3 and back), each ending in one commit. Cases, one line each:

- ``memory``: the same relay in one process on the in-process transport, for scale;
- ``N node(s)``: deliveries/s, the ratio to 1 node measured in the same run (**aim:
  2 nodes >= 1.6 times 1 node**), and CPU seconds per 1,000 deliveries of the nodes, of
  redis-server and of the client, which says where the ceiling is on this machine;
- ``latency``: one node, one request at a time: per-message p50/p99 (5 hops through
  Redis) and per hop.

Between cases the Redis database is flushed. Needs Debian's ``redis-server``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    aim,
    emit,
    hop_envelope,
    parser,
    percentile,
    redis_server,
    relay_organism,
    run_on,
    running,
    write_report,
)

from xml_pipeline import Client, load_organism  # noqa: E402
from xml_pipeline.cli import gc_tuning  # noqa: E402

RELAY = ROOT / "organisms" / "relay.yaml"
HOPS = 5  # deliveries per message with 3 listeners


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def nodes(url: str, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` node processes serving the whole relay; yields once each runs."""
    with ExitStack() as stack:
        procs = []
        for i in range(count):
            proc = subprocess.Popen(
                [sys.executable, "-m", "xml_pipeline", "run", str(RELAY), "--transport", url,
                 "--backend", url, "--node", f"n{i + 1}", "--no-boot", "--log-level", "info"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
            )  # fmt: skip
            stack.callback(_stop, proc)
            procs.append(proc)
        for proc in procs:
            assert proc.stderr is not None
            while b"is running" not in (line := proc.stderr.readline()):
                if not line:
                    raise RuntimeError("a node did not start")
            threading_drain(proc)
        yield procs


def threading_drain(proc: subprocess.Popen[bytes]) -> None:
    """Read a node's stderr in the background so that its pipe never fills."""
    import threading

    assert proc.stderr is not None
    stderr = proc.stderr
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _drive(url: str, messages: int, concurrency: int) -> tuple[float, float]:
    """Send ``messages`` Hops through a Client; (seconds, client CPU seconds)."""
    organism = load_organism(RELAY, backend=url)
    async with Client(url, organism) as client:
        await client.request(hop_envelope(0, 3), timeout=60)  # warm: connections, frames
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                await client.request(hop_envelope(i, 3), timeout=120)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(1, messages + 1)))
        return time.perf_counter() - t0, time.process_time() - cpu0


async def _drive_faststream(url: str, messages: int, concurrency: int) -> tuple[float, float]:
    """The same load through the FastStream relay; (seconds, driver CPU seconds)."""
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(url, logger=None)  # its log lines are not the benchmark's
    done = asyncio.Event()
    room = asyncio.Semaphore(concurrency)
    answered = 0

    @broker.subscriber(stream=StreamSub("out", group="driver", consumer="d",
                                        polling_interval=1000))  # fmt: skip
    async def out(msg: dict[str, Any]) -> None:
        nonlocal answered
        answered += 1
        room.release()
        if answered == messages:
            done.set()

    await broker.start()
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(messages):
            await room.acquire()
            await broker.publish({"seq": i}, stream="r1")
        await asyncio.wait_for(done.wait(), 300)
        return time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await broker.stop()


@contextmanager
def faststream_relay(url: str) -> Iterator[subprocess.Popen[bytes]]:
    script = Path(__file__).with_name("_faststream_relay.py")
    proc = subprocess.Popen([sys.executable, str(script), url, "f1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    try:
        assert proc.stderr is not None
        while b"is running" not in (line := proc.stderr.readline()):
            if not line:
                raise RuntimeError("the FastStream relay did not start")
        threading_drain(proc)
        yield proc
    finally:
        _stop(proc)


async def _latency(url: str, messages: int) -> list[float]:
    organism = load_organism(RELAY, backend=url)
    async with Client(url, organism) as client:
        await client.request(hop_envelope(0, 3), timeout=60)
        samples = []
        for i in range(1, messages + 1):
            t0 = time.perf_counter()
            await client.request(hop_envelope(i, 3), timeout=60)
            samples.append(time.perf_counter() - t0)
        return samples


async def _memory(messages: int, concurrency: int) -> float:
    organism = relay_organism(3)
    async with running(organism) as pump:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                await pump.request(hop_envelope(i, 3), timeout=120)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(messages)))
        return time.perf_counter() - t0


def main() -> int:
    ap = parser(__doc__, "distributed")
    ap.add_argument("--messages", type=int, default=3000, help="messages per case")
    ap.add_argument("--nodes", default="1,2,3", help="node counts to run")
    ap.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    ap.add_argument("--latency-messages", type=int, default=300)
    args = ap.parse_args()
    counts = [int(n) for n in args.nodes.split(",") if n]
    cases: list[dict[str, Any]] = []
    with gc_tuning(None):
        seconds = run_on(args.loop, _memory, args.messages, args.concurrency)
        memory_rate = args.messages * HOPS / seconds
        emit(cases, "memory", f"memory (1 process)  {args.messages} msgs  "
             f"{memory_rate:10,.0f} deliveries/s", deliveries_per_s=memory_rate)  # fmt: skip
        with redis_server() as (url, redis_proc):
            one_node: float | None = None
            for count in counts:
                subprocess.run(["redis-cli", "-u", url, "flushall"], capture_output=True,
                               check=True)  # fmt: skip
                with nodes(url, count) as procs:
                    node_cpu0 = [_cpu_s(p.pid) for p in procs]
                    redis_cpu0 = _cpu_s(redis_proc.pid)
                    elapsed, client_cpu = run_on(
                        args.loop, _drive, url, args.messages, args.concurrency
                    )
                    node_cpu = sum(_cpu_s(p.pid) - c for p, c in zip(procs, node_cpu0,
                                                                      strict=True))  # fmt: skip
                    redis_cpu = _cpu_s(redis_proc.pid) - redis_cpu0
                deliveries = args.messages * HOPS
                rate = deliveries / elapsed
                one_node = one_node or (rate if count == 1 else None)
                ratio = rate / one_node if one_node else None
                per_k = 1000 / deliveries
                aims = [aim("2 nodes / 1 node", ratio, ">=", 1.6)] if count == 2 else []
                emit(
                    cases, f"{count} nodes",
                    f"{count} node(s)          {args.messages} msgs  {rate:10,.0f} deliveries/s"
                    f"  vs 1 node {ratio or 0:.2f}  vs memory {rate / memory_rate:.2f}  CPU s per "
                    f"1k deliveries: nodes {node_cpu * per_k:.3f}  redis {redis_cpu * per_k:.3f}"
                    f"  client {client_cpu * per_k:.3f}",
                    deliveries_per_s=rate, vs_one_node=ratio, node_cpu_s=node_cpu,
                    redis_cpu_s=redis_cpu, client_cpu_s=client_cpu, aims=aims,
                )  # fmt: skip
            try:
                import faststream  # noqa: F401  (the benchmark's own optional dependency)
            except ImportError:
                print("faststream: not installed (pip install 'faststream[redis]'): skipped")
            else:
                subprocess.run(["redis-cli", "-u", url, "flushall"], capture_output=True,
                               check=True)  # fmt: skip
                with faststream_relay(url) as proc:
                    fs_cpu0, redis_cpu0 = _cpu_s(proc.pid), _cpu_s(redis_proc.pid)
                    elapsed, client_cpu = run_on(
                        args.loop, _drive_faststream, url, args.messages, args.concurrency
                    )
                    fs_cpu = _cpu_s(proc.pid) - fs_cpu0
                    redis_cpu = _cpu_s(redis_proc.pid) - redis_cpu0
                deliveries = args.messages * HOPS
                rate = deliveries / elapsed
                per_k = 1000 / deliveries
                emit(
                    cases, "faststream",
                    f"FastStream 1 process {args.messages} msgs  {rate:10,.0f} deliveries/s"
                    f"  1 node vs it {(one_node or 0) / rate:.2f}  CPU s per 1k deliveries: "
                    f"process {fs_cpu * per_k:.3f}  redis {redis_cpu * per_k:.3f}  driver "
                    f"{client_cpu * per_k:.3f}  (at-least-once; no XML, history or commit)",
                    deliveries_per_s=rate, one_node_vs_faststream=(one_node or 0) / rate,
                )  # fmt: skip
            subprocess.run(["redis-cli", "-u", url, "flushall"], capture_output=True, check=True)
            with nodes(url, 1):
                samples = run_on(args.loop, _latency, url, args.latency_messages)
            p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
            emit(
                cases, "latency",
                f"latency, 1 node      {len(samples)} msgs one at a time  p50 {p50:.2f} ms  "
                f"p99 {p99:.2f} ms  per hop p50 {p50 / HOPS:.2f} ms  p99 {p99 / HOPS:.2f} ms",
                p50_ms=p50, p99_ms=p99,
            )  # fmt: skip
    write_report(args.json, "distributed", args, cases, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
