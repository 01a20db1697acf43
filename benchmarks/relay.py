"""Relay benchmark: messages down a chain of listeners and back, versus the floor.

Each message enters ``relay.1`` as an envelope, travels down to ``relay.<last>``
and the answer travels back up and out: with 3 hops down that is 5 deliveries to a
listener (relay.1, relay.2, relay.3, relay.2, relay.1), with 10 hops down 19, plus
one parse at ingress. A *hop* below is one delivery to a listener. The chain is
organisms/relay.yaml's (its handler ``relay:hop`` serves any ``relay.N``), built with
``last`` listeners.

Cases, one summary line each:

- ``floor``: parse → look up → call → build the reply envelope, per message, no pump
  (see _common.py); ``ratio`` of every other case is its hops/s over this.
- ``relay <last> hops <loop>``: the chain at saturation (``queue_size`` 2048 kept full
  by one producer); p50/p99 are latencies *at saturation*, dominated by queueing.
- ``relay 1 hop <loop>``: a one-listener chain that answers at once, at saturation:
  the peak msg/s of a single hop.
- ``latency 1 hop <loop>``: the same organism fed at half that peak, in small bursts
  every millisecond; latency from ``inject()`` to the reply at egress, p50/p99/max,
  and the collector's pauses seen meanwhile. Aims: p99 < 2 ms, max < 10 ms.

    python benchmarks/relay.py                      # 3 and 10 hops, asyncio and uvloop
    python benchmarks/relay.py --last 10 --loops uvloop --messages 5000 --profile
    python benchmarks/relay.py --last 1 --repeat 1 --gc-threshold none   # the collector untuned
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import io
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    Floor,
    GcPauses,
    aim,
    emit,
    hop_envelope,
    loop_factory,
    parser,
    percentile,
    relay_organism,
    run_on,
    running,
    scrape,
    write_report,
)

from xml_pipeline import Organism, Reply


def hops_of(last: int) -> int:
    """Deliveries per message: down to relay.<last> and back up to relay.1."""
    return 2 * last - 1


class _Replies:
    """Latency of each reply (by its ``seq``) from the time its message was injected."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.starts = [0.0] * n
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    def egress(self, reply: Reply) -> None:
        self.latencies.append(time.perf_counter() - self.starts[reply.payload.seq])  # type: ignore[attr-defined]
        if len(self.latencies) == self.n:
            self.done.set()


def _watch_events(address: tuple[str, int], stop: threading.Event) -> None:
    """What one open dashboard page does: read the event stream until ``stop``."""
    import http.client

    while not stop.is_set():
        conn = http.client.HTTPConnection(*address, timeout=5)
        try:
            conn.request("GET", "/api/events")
            response = conn.getresponse()
            while not stop.is_set() and response.readline():
                pass
        except OSError:
            stop.wait(0.1)
        finally:
            conn.close()


async def saturated(
    org: Organism, messages: list[bytes], hops: int, metrics: bool = False, web: str = ""
) -> dict[str, Any]:
    """Every message injected as fast as the pump admits it; the best case for hops/s.

    ``metrics``: served as ``run --metrics`` serves them (histograms, backend calls
    timed, the probe task, the HTTP server on a free loopback port), scraped once at
    the end. ``web``: "served" adds the dashboard, "page" one open page's event stream."""
    n = len(messages)
    replies = _Replies(n)
    starts, latencies, done = replies.starts, replies.latencies, replies.done

    served: list[tuple[str, int]] | None = [] if metrics or web else None
    stop_page = threading.Event()
    async with running(org, egress=replies.egress, metrics=served, web=bool(web)) as pump:
        if web == "page" and served:
            threading.Thread(target=_watch_events, args=(served[0], stop_page),
                             daemon=True).start()  # fmt: skip
        gc.collect()
        start = time.perf_counter()
        for seq, data in enumerate(messages):
            starts[seq] = time.perf_counter()
            await pump.inject(data)
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - start
        stats = pump.statistics()
        stop_page.set()
        if served:
            await asyncio.to_thread(scrape, served[0])
    if stats.dead_letters or stats.rejected:
        raise SystemExit(f"benchmark run had errors: {stats}")
    handled = sum(s.handled for s in stats.listeners.values())
    assert handled == n * hops, (handled, n, hops)
    return {
        "messages": n,
        "hops": handled,
        "seconds": elapsed,
        "msgs_per_s": n / elapsed,
        "hops_per_s": handled / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


async def paced(org: Organism, messages: list[bytes], rate: float) -> dict[str, Any]:
    """Messages injected at ``rate`` per second: a burst every millisecond of what is due."""
    n = len(messages)
    replies = _Replies(n)
    starts, latencies, done = replies.starts, replies.latencies, replies.done

    async with running(org, egress=replies.egress) as pump:
        gc.collect()
        with GcPauses() as pauses:
            start = time.perf_counter()
            sent = 0
            while sent < n:
                due = min(n, int((time.perf_counter() - start) * rate) + 1)
                while sent < due:
                    starts[sent] = time.perf_counter()
                    await pump.inject(messages[sent])
                    sent += 1
                await asyncio.sleep(0.001)
            offered = time.perf_counter() - start
            await asyncio.wait_for(done.wait(), 600)
        stats = pump.statistics()
    if stats.dead_letters or stats.rejected:
        raise SystemExit(f"benchmark run had errors: {stats}")
    return {
        "messages": n,
        "target_msgs_per_s": rate,
        "offered_msgs_per_s": n / offered,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "gc": pauses.summary(),
        "gc_text": pauses.text(),
    }


def run_saturated(
    org: Organism,
    messages: list[bytes],
    hops: int,
    loop_name: str,
    profile: bool,
    metrics: bool = False,
    web: str = "",
) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        if not profile:
            return runner.run(saturated(org, messages, hops, metrics, web))  # type: ignore[no-any-return]
        profiler = cProfile.Profile()
        profiler.enable()
        result = runner.run(saturated(org, messages, hops, metrics, web))
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue(), file=sys.stderr)
        return result  # type: ignore[no-any-return]


def tuned(org: Organism, gc_threshold: str) -> Organism:
    """``org`` with the collector's threshold of ``--gc-threshold``."""
    if gc_threshold == "organism":
        return org
    threshold = None if gc_threshold == "none" else int(gc_threshold)
    return dataclasses.replace(
        org, settings=dataclasses.replace(org.settings, gc_threshold=threshold)
    )


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    result = dict(max(runs, key=lambda r: r["hops_per_s"]))
    result["hops_per_s_runs"] = [r["hops_per_s"] for r in runs]
    return result


VARIANTS = {  # name: (metrics, web)
    "none": (False, ""),
    "metrics": (True, ""),
    "served": (True, "served"),
    "page": (True, "page"),
}
# What the dashboard may cost against --metrics alone (issue aims): no page open 2 %,
# one page open 5 %.
VARIANT_AIMS = {"served": 0.98, "page": 0.95}


def compare_variants(args: argparse.Namespace) -> int:
    """``--variants``: the variants run one after another in each round (the order
    rotating), so a burst of load from elsewhere hits them alike; each is reported by
    its best run and by the median over rounds of its throughput over the baseline's
    (the first variant) in the same round."""
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or len(names) < 2:
        raise SystemExit(f"--variants: two or more of {', '.join(VARIANTS)}")
    last = int(args.last.split(",")[0])
    loop_name = args.loop or args.loops.split(",")[0]
    messages = [hop_envelope(i, last) for i in range(args.messages)]
    org = relay_organism(last)
    floor = Floor(messages)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(args.repeat):
        floor.run()
        for name in names[i % len(names) :] + names[: i % len(names)]:
            metrics, web = VARIANTS[name]
            runs[name].append(run_saturated(org, messages, hops_of(last), loop_name, False,
                                            metrics, web))  # fmt: skip
    base = names[0]
    cases: list[dict[str, Any]] = []
    print(floor.summary("floor"), flush=True)
    for name in names:
        paired = [
            r["hops_per_s"] / b["hops_per_s"] for r, b in zip(runs[name], runs[base], strict=True)
        ]
        relative = statistics.median(paired)
        r = best(runs[name])
        aims = []
        if name in VARIANT_AIMS and base == "metrics":
            aims.append(aim(f"{name}/{base}", relative, ">=", VARIANT_AIMS[name]))
        emit(
            cases,
            f"relay/{last}/{loop_name}/{name}",
            f"relay {last} hops {loop_name:<8} {name:<8} {r['hops_per_s']:>9,.0f} hops/s (best "
            f"of {len(paired)})  median {relative:.3f} of {base} "
            f"(rounds {min(paired):.3f}-{max(paired):.3f})  "
            f"ratio {floor.ratio(r['hops_per_s']):.2f}",
            last=last,
            loop=loop_name,
            variant=name,
            baseline=base,
            relative_median=relative,
            relative_rounds=paired,
            ratio=floor.ratio(r["hops_per_s"]),
            aims=aims,
            **r,
        )
    write_report(args.json, "relay", args, cases, floor.best)
    return 0


def main() -> int:
    ap = parser(__doc__, "relay", loop=None)
    ap.add_argument("--messages", type=int, default=20_000, help="messages per run")
    ap.add_argument("--last", default="3,10", help="hops down the chain, comma-separated")
    ap.add_argument("--loops", default="asyncio,uvloop", help="event loops, comma-separated")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), help="one loop only (--loops NAME)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    ap.add_argument(
        "--latency-messages", type=int, default=20_000, help="paced messages (0: no latency case)"
    )
    ap.add_argument("--load", type=float, default=0.5, help="paced rate as a share of the peak")
    ap.add_argument("--profile", action="store_true", help="cProfile top 25 to stderr")
    ap.add_argument(
        "--metrics",
        action="store_true",
        help="serve Prometheus metrics during the saturated runs, as run --metrics does "
        "(needs prometheus-client)",
    )
    ap.add_argument(
        "--web",
        choices=("served", "page"),
        help="also serve the dashboard (run --metrics ... --web): 'served' with no page "
        "open, 'page' with one page's event stream open",
    )
    ap.add_argument(
        "--variants",
        help="compare ways of serving, interleaved in each round (comma-separated, the "
        "first is the baseline: none, metrics, served, page): each variant's median "
        "over rounds of its hops/s over the baseline's in the same round",
    )
    ap.add_argument(
        "--gc-threshold",
        default="organism",
        help="the collector's generation-0 threshold while the pump runs: 'organism' "
        "(relay.yaml's pump.gc_threshold, applied as run applies it), 'none' (Python's "
        "own, untuned) or a number",
    )
    args = ap.parse_args()
    if args.variants:
        return compare_variants(args)

    lasts = [int(x) for x in args.last.split(",")]
    loops = [args.loop] if args.loop else args.loops.split(",")
    messages = {last: [hop_envelope(i, last) for i in range(args.messages)] for last in lasts}
    organisms = {last: tuned(relay_organism(last), args.gc_threshold) for last in lasts}
    floor = Floor(messages[lasts[0]])
    # Floor and pump runs are interleaved, and the best of each is kept, so a burst
    # of load from elsewhere on the machine cannot skew one side of the ratio only.
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for i in range(args.repeat):
        floor.run()
        for last in lasts:
            for loop_name in loops:
                profile = args.profile and i == 0
                result = run_saturated(
                    organisms[last], messages[last], hops_of(last), loop_name, profile,
                    args.metrics, args.web or "",
                )  # fmt: skip
                runs.setdefault((last, loop_name), []).append(result)
    single: dict[str, list[dict[str, Any]]] = {}
    if args.latency_messages:
        org1 = tuned(relay_organism(1), args.gc_threshold)
        msgs1 = [hop_envelope(i, 1) for i in range(max(args.messages, args.latency_messages))]
        for _ in range(args.repeat):
            for loop_name in loops:
                result = run_saturated(org1, msgs1[: args.messages], 1, loop_name, False)
                single.setdefault(loop_name, []).append(result)
        floor.run()

    cases: list[dict[str, Any]] = []
    print(floor.summary("floor"), flush=True)
    for (last, loop_name), case_runs in runs.items():
        r = best(case_runs)
        ratio = floor.ratio(r["hops_per_s"])
        emit(
            cases,
            f"relay/{last}/{loop_name}",
            f"relay {last} hops {loop_name:<8} {r['messages']:>7} msgs  "
            f"{r['msgs_per_s']:>9,.0f} msg/s  {r['hops_per_s']:>9,.0f} hops/s  "
            f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  ratio {ratio:.2f}",
            last=last,
            loop=loop_name,
            hops_per_message=hops_of(last),
            ratio=ratio,
            **r,
        )
    for loop_name, case_runs in single.items():
        r = best(case_runs)
        ratio = floor.ratio(r["hops_per_s"])
        emit(
            cases,
            f"relay/1/{loop_name}",
            f"relay 1 hop  {loop_name:<8} {r['messages']:>7} msgs  "
            f"{r['msgs_per_s']:>9,.0f} msg/s (the peak)  "
            f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  ratio {ratio:.2f}",
            last=1,
            loop=loop_name,
            hops_per_message=1,
            ratio=ratio,
            **r,
        )
        rate = r["msgs_per_s"] * args.load
        p = run_on(loop_name, paced, org1, msgs1[: args.latency_messages], rate)
        emit(
            cases,
            f"latency/1/{loop_name}",
            f"latency 1 hop {loop_name:<8} {p['messages']:>6} msgs at {args.load:.0%} of peak "
            f"({p['offered_msgs_per_s']:,.0f} msg/s): p50 {p['p50_ms']:.3f} ms  "
            f"p99 {p['p99_ms']:.3f} ms  max {p['max_ms']:.2f} ms  ({p['gc_text']})",
            loop=loop_name,
            load=args.load,
            peak_msgs_per_s=r["msgs_per_s"],
            aims=[aim("p99 ms", p["p99_ms"], "<", 2.0), aim("max ms", p["max_ms"], "<", 10.0)],
            **p,
        )
    write_report(args.json, "relay", args, cases, floor.best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
