"""Store stalls: the longest single call of the memory store under the relay's writes.

The memory backend's store (``xml_pipeline/backends/store.py``) alone, without the pump:
for each of ``--messages`` single-hop conversations it makes the calls the relay makes
(the root frame's registry entry and ``out`` slot, the child frame's registry entry,
its ``in`` and ``out`` slots, the root's ``in`` slot), timing each message's calls
together. Its dicts grow past ``max_threads`` frames, then evict. A call that stops
for milliseconds stops the event loop as long: this is the part of the latency tail
(``relay.py --latency-messages 200000``) that the store makes. The collector is
disabled while it runs (what it costs is measured by ``relay.py`` and ``memory.py``).

    python benchmarks/store_stalls.py                        # 200,000 messages
    python benchmarks/store_stalls.py --messages 400000 --max-threads 100000
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, parser, write_report

from xml_pipeline.backends.base import HistoryLimits, Slot
from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.backends.store import Store
from xml_pipeline.frame import FrameRegistry

XML = b'<Hop xmlns="https://example.org/relay"><seq>21999</seq><last>1</last></Hop>'
HOP = "{https://example.org/relay}Hop"
DONE = "{https://example.org/relay}Done"


def run(messages: int, max_threads: int) -> dict[str, Any]:
    store = Store(HistoryLimits(max_threads=max_threads))
    new_uuid = FrameRegistry(MemoryBackend()).new_uuid
    clock = time.perf_counter
    stalls: list[tuple[float, int]] = []  # (seconds, frames) of each message over 1 ms
    longest = 0.0
    began = clock()
    gc.disable()
    try:
        for i in range(messages):
            t = clock()
            root, child = new_uuid(), new_uuid()
            store.registry_set(f'["bench","{root}"]', root)
            store.buffer_append(root, Slot(0, "out", "bench", "relay.1", HOP, f"m{i}", t, XML))
            store.registry_setdefault(f'["bench","{root}","relay.1"]', child)
            store.buffer_append(child, Slot(0, "in", "bench", "relay.1", HOP, f"m{i}", t, XML))
            store.buffer_append(child, Slot(0, "out", "relay.1", "bench", DONE, f"n{i}", t, XML))
            store.buffer_append(root, Slot(0, "in", "relay.1", "bench", DONE, f"n{i}", t, XML))
            spent = clock() - t
            if spent > 0.001:
                stalls.append((spent, store.info()["buffer_threads"]))
            longest = max(longest, spent)
    finally:
        gc.enable()
    seconds = clock() - began
    return {
        "messages": messages,
        "max_threads": max_threads,
        "seconds": seconds,
        "us_per_message": seconds / messages * 1e6,
        "longest_ms": longest * 1e3,
        "stalls_over_1ms": len(stalls),
        "stalled_ms": sum(s for s, _ in stalls) * 1e3,
        "worst": [
            {"ms": round(s * 1e3, 2), "frames": f} for s, f in sorted(stalls, reverse=True)[:8]
        ],
    }


def main() -> int:
    ap = parser(__doc__, "store_stalls", loop=None)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--max-threads", type=int, default=HistoryLimits().max_threads)
    args = ap.parse_args()
    r = run(args.messages, args.max_threads)
    cases: list[dict[str, Any]] = []
    worst = ", ".join(f"{w['ms']:g} ms at {w['frames']:,}" for w in r["worst"][:4])
    emit(
        cases,
        f"store_stalls/{args.messages}",
        f"store stalls {args.messages:>7,} msgs (max_threads {args.max_threads:,}): "
        f"{r['us_per_message']:.1f} us/msg  longest {r['longest_ms']:.1f} ms  "
        f"{r['stalls_over_1ms']} over 1 ms ({r['stalled_ms']:.0f} ms)  worst: {worst}",
        **r,
    )
    write_report(args.json, "store_stalls", args, cases, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
