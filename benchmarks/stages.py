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
- ``egress``: building the reply envelope around the payload's bytes;
- ``ingress``: the whole way in, ``StreamPump.inject`` of one envelope's bytes on the
  memory backend: parse, envelope check, root frame, its ``out`` slot, the child frame
  and the delivery queued in ``relay.1``'s inbox (``--number`` of them in a row, with
  ``queue_size`` above that, so nothing is handled while they are timed).

The ``ingress`` aim compares it with ``--before-ingress-us``, the figure of the
pump before ingress was made cheaper (CHANGELOG, docs/performance.md): measured on
the 2-core reference machine with this script on the code before that change. Pass
your own before-figure on another machine.

    python benchmarks/stages.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "organisms"))

from _common import aim, emit, hop_envelope, relay_organism, running, write_report  # noqa: E402
from relay import Hop, hop  # noqa: E402

from xml_pipeline import HandlerMetadata, Slot, codec_for  # noqa: E402
from xml_pipeline.backends.memory import MemoryBackend  # noqa: E402
from xml_pipeline.envelope import _envelope_around, envelope_from_element  # noqa: E402
from xml_pipeline.frame import Frame, FrameRegistry  # noqa: E402
from xml_pipeline.parser import parse_bytes  # noqa: E402


def per_call_us(fn: Any, number: int) -> float:
    """Best of 5 runs of ``number`` calls, in µs per call."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


async def ingress(n: int, repeat: int = 3, burst: int = 1000) -> float:
    """µs per ``inject`` of an envelope's bytes: best of ``repeat`` runs of ``n``.

    Injected in bursts of ``burst`` (below relay.yaml's ``queue_size``, so none
    waits for room and nothing is handled while a burst is timed), the pump left to
    handle each burst untimed before the next: the regime of a running pump, whose
    inboxes never hold more than ``queue_size`` messages.
    """
    org = relay_organism(3)
    org = dataclasses.replace(org, settings=dataclasses.replace(org.settings, blocked_loop_s=None))
    if burst >= org.settings.queue_size:
        raise ValueError(f"a burst must stay below queue_size {org.settings.queue_size}")
    messages = [hop_envelope(i, 3) for i in range(n)]
    bursts = [messages[i : i + burst] for i in range(0, n, burst)]
    best = float("inf")
    async with running(org, egress=lambda reply: None) as pump:
        for _ in range(repeat):
            spent = 0.0
            for chunk in bursts:
                began = time.perf_counter()
                for data in chunk:
                    await pump.inject(data)
                spent += time.perf_counter() - began
                queued = pump.statistics().listeners["relay.1"].queued
                if queued != len(chunk):  # something was handled meanwhile
                    raise RuntimeError(f"{len(chunk) - queued} messages handled while timed")
                await pump.wait_idle()
            best = min(best, spent)
    return best / n * 1e6


# µs per ingress before it was made cheaper (same script, reference machine,
# 2026-12-05: best of 3 in each of 3 runs, the median run; see docs/performance.md).
BEFORE_INGRESS_US = 45.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "stages.json"
    )
    parser.add_argument(
        "--before-ingress-us",
        type=float,
        default=BEFORE_INGRESS_US,
        help="the ingress figure to compare with (default: the reference machine's)",
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
        "ingress": loop.run_until_complete(ingress(n)),
    }
    loop.close()
    total = sum(v for k, v in stages.items() if k != "ingress")  # ingress holds some of them
    cases: list[dict[str, Any]] = []
    ratio = stages["ingress"] / args.before_ingress_us
    emit(
        cases,
        "stages",
        "stages  " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
        + f"  (us; sum without ingress {total:.1f}; ingress {ratio:.2f} of before)",
        aims=[aim("ingress after/before", ratio, "<=", 0.5)],
        us=stages,
        sum_us=total,
    )  # fmt: skip
    write_report(args.json, "stages", args, cases, None, number=n, us=stages, sum_us=total)


if __name__ == "__main__":
    main()
