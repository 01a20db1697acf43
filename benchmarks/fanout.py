"""Fan-out benchmark: head-of-line blocking, and one call's fan-out over the workers.

Cases (one summary line each, JSON to ``benchmarks/results/fanout.json``):

- ``hol``: one listener (``concurrency`` 4, ordered) keeps one *slow* frame busy: a
  conversation whose messages each take ``--slow-ms`` in the handler (an
  ``asyncio.sleep``), sent one after the other for the whole run. Meanwhile
  ``--clients`` clients send ``--fast-messages`` requests that the handler answers at
  once, each on a conversation (so a frame) of its own. Latency from ``request()`` to
  its reply, p50/p99/max, with the slow frame and, as the reference, without it. A
  fast frame should never wait for the slow one while a worker is free. **Aim: p99
  with the slow frame < a fifth of ``--slow-ms``** (10 ms; a pump that chose a worker
  by frame would make about one fast frame in ``concurrency`` wait for the slow one,
  and its p99 would be about ``--slow-ms``).
- ``fanout``: one request to an inline listener that sends ``--width`` (64) messages
  to a ``cpu_bound`` listener in one call (one frame) and answers once every result
  is back; each message is ``--task-ms`` (2) of SHA-256 in a worker, ``--workers``
  (2) workers. The time of that request with the listener ordered (the default: the
  frame's messages run one after another) and with ``ordered: false``; ``speedup``
  is ordered over unordered. **Aim: speedup >= 1.7.** Each mode is timed in a pump
  of its own, best of ``--rounds`` requests, the modes alternated ``--repeat`` times;
  the best time of each mode counts (on a shared machine, another process taking a
  core makes a round of the unordered mode as slow as the ordered one).

Only the public API is used; ``--cases hol`` runs on a version without ``ordered``
too, to measure the ``hol`` case before and after.

    python benchmarks/fanout.py
    python benchmarks/fanout.py --cases hol --fast-messages 10000 --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import offload  # noqa: E402
from _common import aim, emit, parser, percentile, run_on, running, write_report  # noqa: E402
from _offload_handlers import NS, Done, Job, heavy, work  # noqa: E402

from xml_pipeline import (  # noqa: E402
    HandlerMetadata,
    HandlerResponse,
    Listener,
    Organism,
    ProcessPoolSettings,
    PumpSettings,
)

CASES = ("hol", "fanout")


def job(seq: int, rounds: int = 0) -> bytes:
    return f'<Job xmlns="{NS}"><seq>{seq}</seq><rounds>{rounds}</rounds></Job>'.encode()


def calibrate(target_ms: float) -> int:
    """SHA-256 rounds taking ``target_ms``, by the fastest of 5 timings (on a busy
    machine a timing can only come out too long, which would make the tasks short)."""
    rounds = offload.calibrate(target_ms)
    fastest = min(timeit.repeat(lambda: work(rounds, 1), number=1, repeat=5))
    return max(1, int(rounds * target_ms / 1e3 / fastest))


# -- hol: fast frames beside a slow one ------------------------------------------------


def hol_organism(slow_s: float, concurrency: int) -> Organism:
    async def serve(payload: Job, meta: HandlerMetadata) -> HandlerResponse:
        if payload.seq < 0:  # the slow frame's messages
            await asyncio.sleep(slow_s)
        return HandlerResponse.respond(Done(seq=payload.seq))

    listener = Listener(name="serve", payloads=(Job,), handler=serve, concurrency=concurrency)
    return Organism(name="hol", listeners=(listener,), settings=PumpSettings(queue_size=4096))


async def fast_latencies(args: argparse.Namespace, *, slow: bool) -> dict[str, Any]:
    """Latencies (ms) of the fast requests, with or without the slow frame busy."""
    org = hol_organism(args.slow_ms / 1e3, args.concurrency)
    latencies: list[float] = []
    async with running(org) as pump:
        for i in range(50):  # warm-up
            await pump.request(job(i), to="serve", sender=f"warm{i}")
        stop = asyncio.Event()
        slow_done = 0

        async def slow_frame() -> None:
            nonlocal slow_done
            first = await pump.request(job(-1), to="serve", sender="slow")
            slow_done += 1
            while not stop.is_set():
                await pump.request(job(-1), to="serve", sender="slow", thread=first.thread_id)
                slow_done += 1

        left = iter(range(args.fast_messages))

        async def client(c: int) -> None:
            for i in left:
                t0 = time.perf_counter()
                await pump.request(job(i), to="serve", sender=f"fast{c}-{i}")
                latencies.append((time.perf_counter() - t0) * 1e3)

        slow_task = asyncio.ensure_future(slow_frame()) if slow else None
        if slow_task is not None:
            while pump.statistics().listeners["serve"].in_flight == 0:
                await asyncio.sleep(0.001)  # the slow frame is in its handler
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        seconds = time.perf_counter() - start
        stop.set()
        if slow_task is not None:
            await slow_task
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "slow_messages": slow_done,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
    }


async def hol(args: argparse.Namespace) -> dict[str, Any]:
    alone = await fast_latencies(args, slow=False)
    beside = await fast_latencies(args, slow=True)
    return {"alone": alone, "beside_slow": beside}


# -- fanout: 1 -> N on a cpu_bound listener, ordered or not ----------------------------


def fanout_organism(args: argparse.Namespace, *, ordered: bool) -> Organism:
    width = args.width
    results: dict[str, int] = {}

    async def fan(payload: Job | Done, meta: HandlerMetadata) -> object:
        if isinstance(payload, Job):
            return [
                HandlerResponse(Job(seq=i, rounds=payload.rounds), to="work") for i in range(width)
            ]
        got = results[meta.thread_id] = results.get(meta.thread_id, 0) + 1
        if got < width:
            return None
        del results[meta.thread_id]
        return HandlerResponse.respond(Done(seq=width))

    options: dict[str, Any] = {} if ordered else {"ordered": False}
    return Organism(
        name="fanout",
        listeners=(
            Listener(name="fan", payloads=(Job, Done), handler=fan),
            Listener(name="work", payloads=(Job,), handler=heavy, cpu_bound=True, **options),
        ),
        settings=PumpSettings(queue_size=4096),
        process_pool=ProcessPoolSettings(workers=args.workers),
    )


async def time_fanout(
    args: argparse.Namespace, rounds: int, *, ordered: bool
) -> tuple[float, float]:
    """The best time (s) of ``--rounds`` fan-out requests, in a pump of their own, and
    the mean worker CPU time (s) of their tasks (the workers' start left out)."""
    best = float("inf")
    async with running(fanout_organism(args, ordered=ordered)) as pump:
        await pump.request(job(0, rounds), to="fan", timeout=120)  # warm-up
        before = pump.statistics().pool
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            reply = await pump.request(job(0, rounds), to="fan", timeout=120)
            best = min(best, time.perf_counter() - t0)
            if not (isinstance(reply.payload, Done) and reply.payload.seq == args.width):
                raise RuntimeError(f"the fan-out answered {reply.payload!r}")
        after = pump.statistics().pool
    if before is None or after is None or after.tasks == before.tasks:
        return best, float("nan")
    return best, (after.worker_cpu_s - before.worker_cpu_s) / (after.tasks - before.tasks)


async def fanout(args: argparse.Namespace, rounds: int) -> dict[str, Any]:
    ordered: list[float] = []
    unordered: list[float] = []
    cpu: list[float] = []
    for _ in range(args.repeat):
        for mode, times in ((True, ordered), (False, unordered)):
            seconds, task_cpu = await time_fanout(args, rounds, ordered=mode)
            times.append(seconds)
            cpu.append(task_cpu)
    return {"ordered_s": min(ordered), "unordered_s": min(unordered),
            "ordered_runs_s": ordered, "unordered_runs_s": unordered,
            "task_cpu_ms": sum(cpu) / len(cpu) * 1e3}  # fmt: skip


def main() -> None:
    ap = parser(__doc__, "fanout")
    ap.add_argument("--cases", default=",".join(CASES), help="cases to run, of hol,fanout")
    ap.add_argument("--fast-messages", type=int, default=5000, help="hol: fast requests")
    ap.add_argument("--clients", type=int, default=4, help="hol: fast requests in flight")
    ap.add_argument("--slow-ms", type=float, default=50.0, help="hol: a slow message's time")
    ap.add_argument("--concurrency", type=int, default=4, help="hol: the listener's workers")
    ap.add_argument("--width", type=int, default=64, help="fanout: messages per call")
    ap.add_argument("--task-ms", type=float, default=2.0, help="fanout: CPU per message")
    ap.add_argument("--workers", type=int, default=2, help="fanout: worker processes")
    ap.add_argument("--rounds", type=int, default=5, help="fanout: requests per pump")
    ap.add_argument("--repeat", type=int, default=5, help="fanout: pumps per mode")
    args = ap.parse_args()
    chosen = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)} (of {', '.join(CASES)})")
    cases: list[dict[str, Any]] = []
    if "hol" in chosen:
        r = run_on(args.loop, hol, args)
        a, b = r["alone"], r["beside_slow"]
        emit(cases, f"hol/{args.loop}",
             f"hol     {args.loop:<8} {b['requests']} fast requests, {args.clients} in flight, "
             f"concurrency {args.concurrency}: p50 / p99 / max {b['p50_ms']:.2f} / "
             f"{b['p99_ms']:.2f} / {b['max_ms']:.1f} ms beside a {args.slow_ms:g} ms frame "
             f"({b['slow_messages']} slow messages), {a['p50_ms']:.2f} / {a['p99_ms']:.2f} / "
             f"{a['max_ms']:.1f} ms alone",
             aims=[aim("p99 ms", b["p99_ms"], "<", args.slow_ms / 5)], **r)  # fmt: skip
    if "fanout" in chosen:
        rounds = calibrate(args.task_ms)
        r = run_on(args.loop, fanout, args, rounds)
        speedup = r["ordered_s"] / r["unordered_s"]
        serial_ms = args.width * args.task_ms
        emit(cases, f"fanout/{args.loop}",
             f"fanout  {args.loop:<8} 1 -> {args.width} x ~{args.task_ms:g} ms on "
             f"{args.workers} workers: ordered {r['ordered_s'] * 1e3:.1f} ms, unordered "
             f"{r['unordered_s'] * 1e3:.1f} ms (the work alone {serial_ms:g} ms serially; "
             f"{r['task_cpu_ms']:.2f} ms of worker CPU per task): speedup {speedup:.2f}x",
             rounds=rounds, speedup=speedup,
             aims=[aim("speedup", speedup, ">=", 1.7)], **r)  # fmt: skip
    write_report(args.json, "fanout", args, cases, None)


if __name__ == "__main__":
    main()
