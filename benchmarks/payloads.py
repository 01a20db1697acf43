"""Large payloads benchmark: 100 KB of text and 5,000-element payloads through one listener.

One listener, ``echo``, answers each message with the payload it got
(``HandlerResponse.respond(payload)``), and the egress callback serializes every
reply envelope (``Reply.to_xml()``), as a server writing it back to a socket must. So
each message is parsed and checked at ingress, decoded into its model, recorded in
two frames' histories (serialized once each way), encoded back and written out.

Cases, one summary line each (msg/s, MB/s of input, ratio to its floor):

- ``text 100 KB``: a flat :class:`~xml_pipeline.Payload` with one ~100 KB ``str``
  field (prose with the odd ``&`` and ``<`` to escape).
- ``5,000 elements``: a flat ``Payload`` with a ``list[int]`` field of 5,000 items,
  i.e. 5,000 child elements (~85 KB); the pump's default ``max_elements`` is 10,000.
- ``5,000 elements (pydantic-xml)``: the same shape as a ``pydantic_xml.BaseXmlModel``.

Each case has its own floor, on the same bytes: parse (hardened parser, envelope
check) → look up → the handler echoes the payload element → build the reply envelope.
``ratio`` is the case's msg/s over its floor's.

Histories are capped (``max_threads`` 256) and ``queue_size`` is 64: a full queue of
100 KB messages, each with its history, would otherwise hold gigabytes.

    python benchmarks/payloads.py
    python benchmarks/payloads.py --messages 500 --element-messages 100 --loop asyncio
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Floor, aim, emit, organism_of, parser, run_on, running, write_report
from lxml import etree
from pydantic import BaseModel
from pydantic_xml import BaseXmlModel, element

from xml_pipeline import (
    HandlerMetadata,
    HandlerResponse,
    Listener,
    Organism,
    Payload,
    Reply,
    build_envelope,
    codec_for,
)

NS = "https://example.org/payloads"
DISTINCT = 16  # distinct messages per case, cycled (keeps the input's memory small)


class Text(Payload):
    xml_ns = NS
    seq: int
    text: str


class Items(Payload):
    xml_ns = NS
    seq: int
    item: list[int]


class XItems(BaseXmlModel, tag="XItems", ns="", nsmap={"": NS}):
    seq: int = element()
    item: list[int] = element()


async def echo(payload: BaseModel, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(payload)


def organism(cls: type[BaseModel]) -> Organism:
    listener = Listener(name="echo", payloads=(cls,), handler=echo)
    return organism_of("payloads", [listener], queue_size=64, max_threads=256)


def prose(seed: int, size: int) -> str:
    rng = random.Random(seed)
    words = ["pump", "listener", "envelope", "frame", "history", "slot", "route", "a", "the"] * 4
    words += ["R&D", "x<y", "café"]  # characters to escape, and one to encode
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:size]


def envelope(model: BaseModel) -> bytes:
    return build_envelope(sender="bench", to="echo", payload=codec_for(type(model)).encode(model))


def make(kind: str, seq: int, elements: int) -> BaseModel:
    if kind == "text":
        return Text(seq=seq, text=prose(seq, 100_000))
    values = [(seq * 7919 + i) % 100_000 for i in range(elements)]
    return Items(seq=seq, item=values) if kind == "items" else XItems(seq=seq, item=values)


async def throughput(org: Organism, messages: list[bytes]) -> dict[str, Any]:
    """Every message injected as fast as the pump admits it; every reply serialized."""
    n = len(messages)
    out_bytes = 0
    count = 0
    done = asyncio.Event()

    def egress(reply: Reply) -> None:
        nonlocal out_bytes, count
        out_bytes += len(reply.to_xml())
        count += 1
        if count == n:
            done.set()

    async with running(org, egress=egress) as pump:
        gc.collect()
        start = time.perf_counter()
        for data in messages:
            await pump.inject(data)
        await done.wait()
        elapsed = time.perf_counter() - start
        stats = pump.statistics()
    if stats.dead_letters or stats.rejected:
        raise SystemExit(f"benchmark run had errors: {stats}")
    in_bytes = sum(len(m) for m in messages)
    return {
        "messages": n,
        "seconds": elapsed,
        "msgs_per_s": n / elapsed,
        "hops_per_s": n / elapsed,
        "mb_per_s": in_bytes / elapsed / 1e6,
        "bytes_in": in_bytes // n,
        "bytes_out": out_bytes // n,
    }


def echo_element(payload: etree._Element) -> etree._Element:
    return payload


CASES: dict[str, tuple[str, type[BaseModel]]] = {
    "text": ("text 100 KB", Text),
    "items": ("5,000 elements", Items),
    "xitems": ("5,000 elements (pydantic-xml)", XItems),
}


def main() -> int:
    ap = parser(__doc__, "payloads")
    ap.add_argument("--messages", type=int, default=2000, help="messages of the text case")
    ap.add_argument("--element-messages", type=int, default=500, help="messages per list case")
    ap.add_argument("--elements", type=int, default=5000, help="items in a list payload")
    ap.add_argument("--cases", default="text,items,xitems", help="of: " + ", ".join(CASES))
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the best is kept")
    args = ap.parse_args()

    cases: list[dict[str, Any]] = []
    floors: dict[str, dict[str, Any]] = {}
    for kind in args.cases.split(","):
        label, cls = CASES[kind]
        n = args.messages if kind == "text" else args.element_messages
        distinct = [envelope(make(kind, seq, args.elements)) for seq in range(DISTINCT)]
        messages = [distinct[i % DISTINCT] for i in range(n)]
        floor = Floor(messages, echo_element, label=f"floor {label}")
        org = organism(cls)
        runs = []
        for _ in range(args.repeat):
            floor.run()
            runs.append(run_on(args.loop, throughput, org, messages))
        floor.run()
        fb = floors[kind] = floor.best
        floor_mb = fb["msgs_per_s"] * runs[0]["bytes_in"] / 1e6
        r: dict[str, Any] = max(runs, key=lambda x: x["msgs_per_s"])
        ratio = floor.ratio(r["msgs_per_s"])
        emit(
            cases,
            f"payloads/{kind}/{args.loop}",
            f"payload {label:<30} {args.loop:<8} {n:>5} msgs  {r['msgs_per_s']:>7,.0f} msg/s  "
            f"{r['mb_per_s']:6.1f} MB/s in ({r['bytes_in'] / 1024:.0f} KiB/msg)  ratio {ratio:.2f}"
            f"  (floor {fb['msgs_per_s']:,.0f} msg/s, {floor_mb:.1f} MB/s)",
            loop=args.loop,
            ratio=ratio,
            floor=fb,
            msgs_per_s_runs=[x["msgs_per_s"] for x in runs],
            # The aim for a large pydantic-xml payload: 0.15 of the floor.
            aims=[aim("ratio", ratio, ">=", 0.15)] if kind == "xitems" else [],
            **r,
        )
    write_report(args.json, "payloads", args, cases, None, floors=floors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
