"""Memory: what each live 3-hop conversation keeps on the memory backend.

The organism is organisms/relay.yaml's chain (3 hops down, 5 deliveries per message)
on the memory backend with limits high enough that nothing is trimmed or evicted, so
every conversation stays live: its 4 frames (the root and one per listener), their
registry entries and their history slots. One producer injects ``N`` messages (each
opens a conversation) as fast as the pump admits them, waits until the pump is idle and
runs ``gc.collect()``; what the process gained since a warm-up, divided by ``N``, is the
cost of one conversation:

- ``rss B/conv``: resident set size (``/proc/self/statm``), in a run without tracemalloc;
- ``traced B/conv``: bytes held by Python allocations (``tracemalloc``), in a second run
  in its own process (tracemalloc's own bookkeeping would inflate the RSS);
- ``tracked/msg``: objects the cyclic garbage collector tracks (``gc.get_objects()``),
  per message, after a full collection: what every generation-2 collection scans again.

Aims (issue 15): ≤ 2,500 bytes RSS per conversation, ≤ 2 tracked objects per message.
One summary line per size.

    python benchmarks/memory.py                          # 20,000 and 200,000 conversations
    python benchmarks/memory.py --conversations 20000 --no-tracemalloc
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
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
WARMUP = 2_000  # conversations before the baseline: caches, code paths, free lists


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure() -> dict[str, int]:
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    return {"rss": rss_bytes(), "traced": traced, "tracked": len(gc.get_objects())}


async def conversations(org: Organism, n: int, trace: bool) -> dict[str, Any]:
    template = hop_envelope(0, 3)
    head, _, tail = template.partition(b"<seq>0</seq>")
    replies = 0

    def egress(reply: Reply) -> None:
        nonlocal replies
        replies += 1

    async with running(org, egress=egress) as pump:
        for seq in range(WARMUP):
            await pump.inject(b"%s<seq>%d</seq>%s" % (head, seq, tail))
        await pump.wait_idle()
        if trace:
            tracemalloc.start()
        before = measure()
        start = time.perf_counter()
        for seq in range(WARMUP, WARMUP + n):
            await pump.inject(b"%s<seq>%d</seq>%s" % (head, seq, tail))
        await pump.wait_idle()
        seconds = time.perf_counter() - start
        after = measure()
        if trace:
            tracemalloc.stop()
        info = await pump.backend.info()
        stats = pump.statistics()
    if stats.dead_letters or stats.rejected or replies != WARMUP + n:
        raise SystemExit(f"run had errors ({replies} replies of {WARMUP + n}): {stats}")
    if info.get("threads_evicted") or info.get("slots_trimmed"):
        raise SystemExit(f"conversations were evicted or trimmed: {info}")
    return {
        "conversations": n,
        "seconds": seconds,
        "frames": info.get("buffer_threads"),
        "registry": info.get("registry_entries"),
        **{f"{k}_delta": after[k] - before[k] for k in before},
    }


def one_run(n: int, loop: str, trace: bool) -> dict[str, Any]:
    """One measurement in this process (a fresh interpreter keeps runs independent)."""
    limits = HistoryLimits(max_threads=8 * (n + WARMUP) + 1024, max_slots_per_thread=64)
    return run_on(loop, conversations, relay_organism(3, limits), n, trace)  # type: ignore[no-any-return]


def in_subprocess(n: int, loop: str, trace: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", str(n), "--loop", loop]
    if trace:
        cmd.append("--trace")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:])} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = parser(__doc__, "memory", loop="asyncio")
    ap.add_argument(
        "--conversations", default="20000,200000", help="live conversations, comma-separated"
    )
    ap.add_argument(
        "--no-tracemalloc", action="store_true", help="skip the tracemalloc run (faster)"
    )
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args.one, args.loop, args.trace)))
        return 0

    cases: list[dict[str, Any]] = []
    for n in (int(x) for x in args.conversations.split(",")):
        r = in_subprocess(n, args.loop, False)
        traced = None
        if not args.no_tracemalloc:
            traced = in_subprocess(n, args.loop, True)["traced_delta"] / n
        rss = r["rss_delta"] / n
        tracked = r["tracked_delta"] / n
        traced_text = f"{traced:,.0f}" if traced is not None else "-"
        emit(
            cases,
            f"memory/{n}/{args.loop}",
            f"memory {n:>7,} conversations relay 3 hops {args.loop}: rss {rss:,.0f} B/conv  "
            f"traced {traced_text} B/conv  tracked {tracked:.2f}/msg  "
            f"({r['frames']:,} frames, {n / r['seconds']:,.0f} msg/s)",
            loop=args.loop,
            rss_bytes_per_conversation=rss,
            traced_bytes_per_conversation=traced,
            tracked_per_message=tracked,
            aims=[
                aim("RSS B/conv", rss, "<=", 2500),
                aim("tracked objects/msg", tracked, "<=", 2),
            ],
            **r,
        )
    write_report(args.json, "memory", args, cases, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
