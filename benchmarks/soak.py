"""Soak: 1,000,000 messages through the relay (3 hops) with history limits; nothing may grow.

The organism is organisms/relay.yaml's chain (3 hops down, 5 deliveries per message)
on the memory backend, with history limits set (``max_threads`` 10,000,
``max_slots_per_thread`` 64), fed by one producer as fast as the pump admits. Every
``--every`` messages the producer waits until the pump is idle, runs ``gc.collect()``
and samples the process: RSS, asyncio tasks, threads, open file descriptors, and the
backend's frame and registry counts. One compact line per sample.

Summary line: throughput (msg/s, hops/s, ratio to the floor measured in the same run),
the ratio sustained over the whole run as a share of a short run's (20,000 messages
first, same organism and producer; aim at least 0.9), RSS growth from the sample after
the first 100,000 messages to the last (aim: less than 10%), and the change in tasks,
threads and open files over the same span (aim 0).

    python benchmarks/soak.py                       # 1,000,000 messages: a few minutes
    python benchmarks/soak.py --messages 200000 --every 50000 --loop asyncio
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    Floor,
    aim,
    emit,
    hop_envelope,
    parser,
    relay_organism,
    run_on,
    running,
    write_report,
)

from xml_pipeline import HistoryLimits, Organism, Reply

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def sample(messages: int, elapsed: float, info: dict[str, int], in_pump: int) -> dict[str, Any]:
    return {
        "messages": messages,
        "seconds": elapsed,
        "rss_mb": rss_mb(),
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "in_pump": in_pump,
        "frames": info.get("buffer_threads"),
        "registry": info.get("registry_entries"),
        "evicted": info.get("threads_evicted"),
    }


def line(s: dict[str, Any], rate: float | None) -> str:
    speed = f"  {rate:>7,.0f} msg/s" if rate is not None else ""
    return (
        f"soak sample {s['messages']:>9,} msgs  rss {s['rss_mb']:7.1f} MB  tasks {s['tasks']}  "
        f"threads {s['threads']}  fds {s['fds']}  frames {s['frames']}  "
        f"registry {s['registry']}{speed}"
    )


async def soak(org: Organism, total: int, every: int) -> dict[str, Any]:
    template = hop_envelope(0, 3)
    head, _, tail = template.partition(b"<seq>0</seq>")
    assert tail, "the template must hold <seq>0</seq>"
    replies = 0

    def egress(reply: Reply) -> None:
        nonlocal replies
        replies += 1

    samples: list[dict[str, Any]] = []
    async with running(org, egress=egress) as pump:
        gc.collect()
        samples.append(sample(0, 0.0, await pump.backend.info(), 0))
        print(line(samples[-1], None), flush=True)
        start = time.perf_counter()
        sent = 0
        last_t, last_n = start, 0
        while sent < total:
            stop = min(total, sent + every)
            for seq in range(sent, stop):
                await pump.inject(b"%s<seq>%d</seq>%s" % (head, seq, tail))
            sent = stop
            await pump.wait_idle()
            now = time.perf_counter()
            gc.collect()
            stats = pump.statistics()
            s = sample(sent, now - start, await pump.backend.info(), stats.in_pump)
            samples.append(s)
            print(line(s, (sent - last_n) / (now - last_t)), flush=True)
            last_t, last_n = time.perf_counter(), sent
        elapsed = time.perf_counter() - start
        stats = pump.statistics()
    if stats.dead_letters or stats.rejected or replies != total:
        raise SystemExit(f"soak run had errors ({replies} replies of {total}): {stats}")
    hops = sum(s.handled for s in stats.listeners.values())
    return {
        "messages": total,
        "hops": hops,
        "seconds": elapsed,
        "msgs_per_s": total / elapsed,
        "hops_per_s": hops / elapsed,
        "samples": samples,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
    }


def main() -> int:
    ap = parser(__doc__, "soak")
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000, help="messages between samples")
    ap.add_argument("--max-threads", type=int, default=10_000, help="history: max_threads")
    ap.add_argument("--max-slots", type=int, default=64, help="history: max_slots_per_thread")
    ap.add_argument("--floor-messages", type=int, default=20_000)
    ap.add_argument(
        "--short-messages",
        type=int,
        default=20_000,
        help="messages of the short run the sustained ratio is compared with",
    )
    args = ap.parse_args()
    if args.messages < 2 * args.every:
        raise SystemExit("--messages must be at least twice --every (two samples to compare)")

    history = HistoryLimits(max_threads=args.max_threads, max_slots_per_thread=args.max_slots)
    org = relay_organism(3, history)
    floor = Floor([hop_envelope(i, 3) for i in range(args.floor_messages)])
    floor.run()
    # The same organism and producer over a short run: the sustained ratio's reference.
    short = run_on(args.loop, soak, org, args.short_messages, args.short_messages // 2)
    floor.run()
    r = run_on(args.loop, soak, org, args.messages, args.every)
    floor.run()
    print(floor.summary("floor"), flush=True)

    first, end = r["samples"][1], r["samples"][-1]
    growth = (end["rss_mb"] - first["rss_mb"]) / first["rss_mb"] * 100
    deltas = {k: end[k] - first[k] for k in ("tasks", "threads", "fds")}
    ratio = floor.ratio(r["hops_per_s"])
    short_ratio = floor.ratio(short["hops_per_s"])
    sustained = ratio / short_ratio
    cases: list[dict[str, Any]] = []
    emit(
        cases,
        f"soak/{args.loop}",
        f"soak {args.messages:,} msgs relay 3 hops {args.loop}: {r['msgs_per_s']:,.0f} msg/s  "
        f"{r['hops_per_s']:,.0f} hops/s  ratio {ratio:.2f}  RSS {first['rss_mb']:.1f} MB at "
        f"{first['messages']:,} -> {end['rss_mb']:.1f} MB ({growth:+.1f}%)  "
        f"tasks {deltas['tasks']:+d} threads {deltas['threads']:+d} fds {deltas['fds']:+d}  "
        f"sustained {sustained:.2f} of a {args.short_messages:,}-message run's ratio "
        f"{short_ratio:.2f}",
        loop=args.loop,
        ratio=ratio,
        rss_growth_pct=growth,
        deltas=deltas,
        short_ratio=short_ratio,
        sustained=sustained,
        aims=[
            aim("sustained / short", sustained, ">=", 0.9),
            aim("RSS change %", abs(growth), "<", 10.0),
            aim("tasks change", abs(deltas["tasks"]), "<=", 0),
            aim("threads change", abs(deltas["threads"]), "<=", 0),
            aim("fds change", abs(deltas["fds"]), "<=", 0),
        ],
        **r,
    )
    write_report(args.json, "soak", args, cases, floor.best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
