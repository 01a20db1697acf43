"""Offload benchmark: cpu_bound listeners in worker processes versus running inline.

Cases (one summary line each, JSON to ``benchmarks/results/offload.json``):

- ``trivial``: a handler that does nothing, offloaded vs inline (an async handler on
  the loop). ``overhead_us`` is the extra cost per message of the round trip through
  a worker at saturation: 1e6/offloaded_rate - 1e6/inline_rate.
- ``heavy``: a handler doing ~2 ms of SHA-256 per message (calibrated at start),
  inline vs 1 and 2 workers; ``speedup`` is 2 workers over 1.
- ``responsive``: while the heavy listener is saturated (2 workers, a backlog), a
  plain listener answers one request every 5 ms; its latency p50/p99 show whether
  the event loop stays free.

    python benchmarks/offload.py
    python benchmarks/offload.py --messages 50000 --heavy-messages 2000 --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import percentile  # noqa: E402
from _offload_handlers import NS, Job, heavy, heavy_async, trivial, trivial_async, work  # noqa: E402

from xml_pipeline import (  # noqa: E402
    Listener,
    Organism,
    ProcessPoolSettings,
    PumpSettings,
    Reply,
    StreamPump,
)


def job(seq: int, rounds: int = 0) -> bytes:
    return (f'<Job xmlns="{NS}"><seq>{seq}</seq><rounds>{rounds}</rounds></Job>').encode()


def organism(handler: Any, *, cpu_bound: bool, workers: int = 2, batch_max: int = 64,
             extra: tuple[Listener, ...] = ()) -> Organism:  # fmt: skip
    listener = Listener(
        name="work", payloads=(Job,), handler=handler, cpu_bound=cpu_bound, concurrency=1024
    )
    return Organism(
        name="offload",
        listeners=(listener, *extra),
        settings=PumpSettings(queue_size=4096, max_in_pump=100_000),
        process_pool=ProcessPoolSettings(workers=workers, batch_max=batch_max),
    )


async def throughput(org: Organism, messages: int, rounds: int = 0) -> dict[str, Any]:
    """Messages/s through one listener, the queue kept full."""
    done = asyncio.Event()
    count = 0

    def egress(reply: Reply) -> None:
        nonlocal count
        count += 1
        if count == messages:
            done.set()

    async with StreamPump(org, egress=egress) as pump:
        cpu0 = time.process_time()
        start = time.perf_counter()
        for i in range(messages):
            await pump.inject(job(i, rounds), to="work")
        await done.wait()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        stats = pump.statistics()
    pool = stats.pool
    return {
        "messages": messages,
        "seconds": elapsed,
        "msg_per_s": messages / elapsed,
        "pump_cpu_us_per_msg": cpu / messages * 1e6,
        "batches": pool.batches if pool else None,
        "failed": stats.listeners["work"].failed,
    }


async def responsiveness(org: Organism, heavy_messages: int, rounds: int) -> dict[str, Any]:
    """Latency of a plain listener while the cpu_bound one is saturated."""
    async with StreamPump(org) as pump:
        backlog = [
            asyncio.ensure_future(pump.request(job(i, rounds), to="work"))
            for i in range(heavy_messages)
        ]
        await asyncio.sleep(0.2)
        latencies = []
        while not all(f.done() for f in backlog[: len(backlog) * 3 // 4]):
            t0 = time.perf_counter()
            await pump.request(job(0), to="plain")
            latencies.append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(0.005)
        await asyncio.gather(*backlog)
    return {
        "probes": len(latencies),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
    }


def calibrate(target_ms: float) -> int:
    rounds = 1000
    while True:
        t0 = time.perf_counter()
        work(rounds, 1)
        ms = (time.perf_counter() - t0) * 1e3
        if ms > 20:
            return max(1, int(rounds * target_ms / ms))
        rounds *= 2


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = calibrate(args.heavy_ms)
    results = []
    inline = await throughput(organism(trivial_async, cpu_bound=False), args.messages)
    off = await throughput(organism(trivial, cpu_bound=True, batch_max=args.batch_max),
                           args.messages)  # fmt: skip
    overhead = 1e6 / off["msg_per_s"] - 1e6 / inline["msg_per_s"]
    results.append({"case": "trivial", "inline": inline, "offloaded": off,
                    "overhead_us": overhead, "aim_us": 30})  # fmt: skip
    print(f"trivial     inline {inline['msg_per_s']:>9,.0f} msg/s  offloaded (2 workers) "
          f"{off['msg_per_s']:>9,.0f} msg/s  overhead {overhead:6.1f} us/msg "
          f"(pump CPU {off['pump_cpu_us_per_msg']:.1f} us/msg; aim <= 30)", flush=True)  # fmt: skip

    n = args.heavy_messages
    inline_h = await throughput(organism(heavy_async, cpu_bound=False), n, rounds)
    one = await throughput(organism(heavy, cpu_bound=True, workers=1), n, rounds)
    two = await throughput(organism(heavy, cpu_bound=True, workers=2), n, rounds)
    speedup = two["msg_per_s"] / one["msg_per_s"]
    results.append({"case": "heavy", "rounds": rounds, "target_ms": args.heavy_ms,
                    "inline": inline_h, "workers_1": one, "workers_2": two,
                    "speedup_2_over_1": speedup, "aim": 1.7})  # fmt: skip
    print(f"heavy       ~{args.heavy_ms:g} ms/msg: inline {inline_h['msg_per_s']:>7,.0f} msg/s  "
          f"1 worker {one['msg_per_s']:>7,.0f}  2 workers {two['msg_per_s']:>7,.0f}  "
          f"speedup {speedup:.2f}x (aim >= 1.7)", flush=True)  # fmt: skip

    plain = Listener(name="plain", payloads=(Job,), handler=trivial_async)
    org = organism(heavy, cpu_bound=True, workers=2, extra=(plain,))
    resp = await responsiveness(org, n, rounds)
    results.append({"case": "responsive", **resp, "aim_p99_ms": 5})
    print(f"responsive  plain listener while cpu_bound saturated: p50 {resp['p50_ms']:.2f} ms  "
          f"p99 {resp['p99_ms']:.2f} ms  max {resp['max_ms']:.2f} ms over {resp['probes']} "
          "probes (aim p99 < 5)", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="trivial-case messages")
    parser.add_argument("--heavy-messages", type=int, default=1_000)
    parser.add_argument("--heavy-ms", type=float, default=2.0, help="CPU per heavy message")
    parser.add_argument("--batch-max", type=int, default=64)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "offload.json"
    )
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        results = runner.run(run(args))
    report = {
        "benchmark": "offload",
        "loop": args.loop,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
