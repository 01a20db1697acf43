"""Broadcast benchmark: one sender fans each message out to 8 listeners (1 → 8).

The organism: ``sender`` accepts ``Fan`` and forwards each as an ``Item`` with
``HandlerResponse(item)`` (no ``to``), so the pump delivers it to every listener
accepting ``Item``: ``receiver.1`` … ``receiver.<k>``. Each receiver ends the branch
(returns None). A message with fan-out k costs 1 ingress (parse, root frame) + 1 sender
delivery + k receiver deliveries (each on its own child frame, with its history).

Cases, one summary line each:

- ``floor``: parse → look up → call → build the reply envelope, per message (_common.py).
- ``broadcast 1 → 1``: the same organism with one receiver: 2 deliveries per message.
- ``broadcast 1 → 8``: 8 receivers: 9 deliveries per message.

**Cost model.** The 1 → 1 run gives the pump's throughput in deliveries per second,
D1 (ingress cost spread over its 2 deliveries). If every delivery cost the same, a
1 → 8 message (9 deliveries) would run at D1 / 9 msg/s, i.e. 8 x D1 / 9 receiver
deliveries per second: 8 x the single-listener hops/s, scaled to what one message of
the broadcast costs. ``model`` = measured 1 → 8 deliveries/s over D1 (equivalently,
measured msg/s over D1 / 9). Aim: model ≥ 0.5. Above 1, a broadcast is cheaper per
delivery than a single send (the ingress is shared, the payload not re-parsed).

``ratio`` (to the floor) is the case's deliveries/s over the floor's hops/s.

    python benchmarks/broadcast.py
    python benchmarks/broadcast.py --receivers 16 --messages 5000 --loop asyncio
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Floor, aim, emit, organism_of, parser, run_on, running, write_report
from lxml import etree

from xml_pipeline import (
    HandlerMetadata,
    HandlerResponse,
    Listener,
    Organism,
    Payload,
    build_envelope,
)

NS = "https://example.org/broadcast"


class Fan(Payload):
    """What the sender receives from outside."""

    xml_ns = NS
    seq: int


class Item(Payload):
    """What the sender broadcasts to every receiver."""

    xml_ns = NS
    seq: int


async def send(payload: Fan, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse(Item(seq=payload.seq))  # no `to`: every listener accepting Item


async def receive(payload: Item, meta: HandlerMetadata) -> None:
    return None  # ends the branch


def organism(receivers: int) -> Organism:
    listeners = [Listener(name="sender", payloads=(Fan,), handler=send)]
    listeners += [
        Listener(name=f"receiver.{i}", payloads=(Item,), handler=receive)
        for i in range(1, receivers + 1)
    ]
    return organism_of(f"broadcast{receivers}", listeners, max_threads=200_000)


def fan_envelope(seq: int) -> bytes:
    payload = etree.Element(f"{{{NS}}}Fan", nsmap={None: NS})  # type: ignore[dict-item]
    etree.SubElement(payload, f"{{{NS}}}seq").text = str(seq)
    return build_envelope(sender="bench", to="sender", payload=payload)


async def throughput(org: Organism, messages: list[bytes]) -> dict[str, Any]:
    """Every message injected as fast as the pump admits it, then wait until idle."""
    async with running(org) as pump:
        gc.collect()
        start = time.perf_counter()
        for data in messages:
            await pump.inject(data)
        await pump.wait_idle()
        elapsed = time.perf_counter() - start
        stats = pump.statistics()
    if stats.dead_letters or stats.rejected:
        raise SystemExit(f"benchmark run had errors: {stats}")
    n = len(messages)
    deliveries = sum(s.handled for s in stats.listeners.values())
    receivers = len(org.listeners) - 1
    assert deliveries == n * (1 + receivers), (deliveries, n, receivers)
    return {
        "messages": n,
        "receivers": receivers,
        "deliveries": deliveries,
        "seconds": elapsed,
        "msgs_per_s": n / elapsed,
        "deliveries_per_s": deliveries / elapsed,
        "receiver_hops_per_s": n * receivers / elapsed,
    }


def main() -> int:
    ap = parser(__doc__, "broadcast")
    ap.add_argument("--messages", type=int, default=20_000, help="messages per run")
    ap.add_argument("--receivers", type=int, default=8, help="listeners a message fans out to")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    args = ap.parse_args()

    messages = [fan_envelope(i) for i in range(args.messages)]
    floor = Floor(messages)
    orgs = {1: organism(1), args.receivers: organism(args.receivers)}
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in orgs}
    for _ in range(args.repeat):
        floor.run()
        for k, org in orgs.items():
            runs[k].append(run_on(args.loop, throughput, org, messages))
    floor.run()
    best = {k: max(r, key=lambda x: x["deliveries_per_s"]) for k, r in runs.items()}

    cases: list[dict[str, Any]] = []
    print(floor.summary("floor"), flush=True)
    d1 = best[1]["deliveries_per_s"]
    for k, r in best.items():
        ratio = floor.ratio(r["deliveries_per_s"])
        model = r["deliveries_per_s"] / d1
        fields: dict[str, Any] = {}
        text = ""
        if k != 1:
            fields["aims"] = [aim("model", model, ">=", 0.5)]
            text = f"  model {model:.2f} (the cost model predicts {d1 / (k + 1):,.0f} msg/s)"
        emit(
            cases,
            f"broadcast/1-{k}/{args.loop}",
            f"broadcast 1 -> {k:<2} {args.loop:<8} {r['messages']:>7} msgs  "
            f"{r['msgs_per_s']:>9,.0f} msg/s  {r['deliveries_per_s']:>9,.0f} deliveries/s  "
            f"({r['receiver_hops_per_s']:,.0f} receiver hops/s)  ratio {ratio:.2f}{text}",
            loop=args.loop,
            ratio=ratio,
            model=model,
            deliveries_per_s_runs=[x["deliveries_per_s"] for x in runs[k]],
            **fields,
            **r,
        )
    write_report(args.json, "broadcast", args, cases, floor.best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
