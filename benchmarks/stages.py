"""Per-stage costs: what each step of one delivery costs, in µs, timed in isolation.

The stages a message goes through in the pump (DESIGN §12), each timed with
``timeit`` on the relay organism's ``Hop`` payload:

- ``parse``: the hardened parser on one envelope (bytes → element tree);
- ``envelope``: checking the parsed envelope (from/to/thread/id, one payload);
- ``route``: looking up the listeners of the payload's qualified name;
- ``decode``: payload element → validated model (flat codec);
- ``history``: recording one slot in the memory backend (a ``Slot`` + ``buffer_append``);
- ``frame``: a new child frame id and chain, registered in the memory backend;
- ``handler``: calling an async handler that returns a ``HandlerResponse``;
- ``encode``: model → payload bytes (the fast flat serializer);
- ``egress``: building the reply envelope around the payload's bytes.

    python benchmarks/stages.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "organisms"))

from _common import hop_envelope  # noqa: E402
from relay import Hop, hop  # noqa: E402

from xml_pipeline import HandlerMetadata, Slot, codec_for  # noqa: E402
from xml_pipeline.backends.memory import MemoryBackend  # noqa: E402
from xml_pipeline.envelope import _envelope_around, envelope_from_element  # noqa: E402
from xml_pipeline.frame import Frame, FrameRegistry  # noqa: E402
from xml_pipeline.parser import parse_bytes  # noqa: E402


def per_call_us(fn: Any, number: int) -> float:
    """Best of 5 runs of ``number`` calls, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "stages.json"
    )
    args = parser.parse_args()
    n = args.number

    data = hop_envelope(1, 3)
    root = parse_bytes(data)
    env = envelope_from_element(root)
    codec = codec_for(Hop)
    model = codec.decode(env.payload)
    routes = {codec.qname: ("relay.1",)}
    loop = asyncio.new_event_loop()
    backend = MemoryBackend()
    registry = FrameRegistry(backend)
    parent = Frame("root-uuid", "bench", "root-uuid", ())
    meta = HandlerMetadata("t", "bench", "relay.3", "m1", False, 1, True, lambda: None)  # type: ignore[arg-type]
    xml = codec.encode_bytes(model)
    counter = iter(range(10**9))

    async def history() -> None:
        i = next(counter)
        slot = Slot(0, "in", "bench", "relay.1", codec.qname, f"m{i}", time.time(), xml)
        await backend.buffer_append(f"t{i % 1000}", slot)

    async def frame() -> None:
        await registry.child(parent, f"l{next(counter)}")

    async def handler() -> None:
        await hop(model, meta)

    async def timed(fn: Any) -> float:
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(n):
                await fn()
            best = min(best, time.perf_counter() - began)
        return best / n * 1e6

    def egress() -> None:  # the pump has the payload's bytes (from its history record)
        _envelope_around(xml, sender="relay.1", to="bench", thread="r", id="m1")

    stages = {
        "parse": per_call_us(lambda: parse_bytes(data), n),
        "envelope": per_call_us(lambda: envelope_from_element(root), n),
        "route": per_call_us(lambda: routes.get(codec.qname), n),
        "decode": per_call_us(lambda: codec.decode(env.payload), n),
        "history": loop.run_until_complete(timed(history)),
        "frame": loop.run_until_complete(timed(frame)),
        "handler": loop.run_until_complete(timed(handler)),
        "encode": per_call_us(lambda: codec.encode_bytes(model), n),
        "egress": per_call_us(egress, n),
    }
    loop.close()
    total = sum(stages.values())
    print("stages  " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
          + f"  (us; sum {total:.1f})")  # fmt: skip
    report = {
        "benchmark": "stages",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "number": n,
        "us": stages,
        "sum_us": total,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
