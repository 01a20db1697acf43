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
- ``worker``: in one worker process, initialized as the pool does, the cost per task
  of ``run_batch`` (trivial handler, batches of ``--batch-max``) and of pickling a
  batch's tasks and its answer with multiprocessing's pickler, both ways. The pump's
  share of a round trip is ``tasks dumps`` + ``answer loads``.

Floors (see _common.py), measured in the same run: ``floor`` is the minimal loop on the
trivial case's ``Job`` documents; ``floor heavy`` is the same loop whose handler does
the heavy case's SHA-256 rounds, serially. ``ratio`` is trivial msg/s over ``floor``
(inline and offloaded), heavy msg/s over ``floor heavy`` (inline / 1 / 2 workers): on
2 cores, 2 workers can pass 1.

    python benchmarks/offload.py
    python benchmarks/offload.py --messages 50000 --heavy-messages 2000 --loop asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import sys
import time
import timeit
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    Floor,
    aim,
    done_reply,
    emit,
    parser,
    percentile,
    run_on,
    running,
    write_report,
)
from _offload_handlers import NS, Job, heavy, heavy_async, trivial, trivial_async, work  # noqa: E402

from xml_pipeline import (  # noqa: E402
    Listener,
    Organism,
    ProcessPoolSettings,
    PumpSettings,
    Reply,
    worker,
)
from xml_pipeline.offload import worker_spec  # noqa: E402


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

    async with running(org, egress=egress) as pump:
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
    async with running(org) as pump:
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


def in_worker(size: int, batches: int) -> dict[str, float]:
    """Run in a worker process: microseconds per task of run_batch and of pickling."""
    tasks = [
        worker.Task("work", job(i), worker.Meta(f"t-{i}", "api", "work", f"m-{i}", False, 1, True),
                    None)
        for i in range(size)
    ]  # fmt: skip

    def dumps(obj: Any) -> bytes:
        return bytes(ForkingPickler.dumps(obj))  # what the executor pickles with

    def per_task(fn: Any) -> float:
        return min(timeit.repeat(fn, number=batches, repeat=5)) / batches / size * 1e6

    answer = worker.run_batch(1, tasks)
    failed = [r for r in answer.results if isinstance(r, worker.Failure)]
    assert not failed, failed
    sent, back = dumps((1, tasks)), dumps(answer)
    return {
        "run_batch_us": per_task(lambda: worker.run_batch(1, tasks)),
        "tasks_dumps_us": per_task(lambda: dumps((1, tasks))),
        "tasks_loads_us": per_task(lambda: pickle.loads(sent)),
        "answer_dumps_us": per_task(lambda: dumps(answer)),
        "answer_loads_us": per_task(lambda: pickle.loads(back)),
        "tasks_bytes": len(sent) / size,
        "answer_bytes": len(back) / size,
    }


def worker_costs(cases: list[Any], args: argparse.Namespace) -> None:
    """The ``worker`` case: one worker process, started as the pool starts them."""
    org = organism(trivial, cpu_bound=True, workers=1)
    ctx = multiprocessing.get_context(org.process_pool.start_method)
    status, control = ctx.RawArray(worker.WorkerStatus, 1), ctx.Value(worker.Control)
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=worker.initialize,
                             initargs=(worker_spec(org), status, control, 1)) as pool:  # fmt: skip
        c = pool.submit(in_worker, args.batch_max, max(1, 20_000 // args.batch_max)).result()
    pump_us = c["tasks_dumps_us"] + c["answer_loads_us"]
    emit(cases, "worker",
         f"worker      run_batch {c['run_batch_us']:.1f} us/task (trivial, batches of "
         f"{args.batch_max})  pickling per task: tasks {c['tasks_dumps_us']:.2f} + "
         f"{c['tasks_loads_us']:.2f} us, answer {c['answer_dumps_us']:.2f} + "
         f"{c['answer_loads_us']:.2f} us (pump side {pump_us:.2f} us)",
         pump_pickling_us=pump_us, **c)  # fmt: skip


def calibrate(target_ms: float) -> int:
    rounds = 1000
    while True:
        t0 = time.perf_counter()
        work(rounds, 1)
        ms = (time.perf_counter() - t0) * 1e3
        if ms > 20:
            return max(1, int(rounds * target_ms / ms))
        rounds *= 2


def heavy_reply(rounds: int) -> Any:
    """The heavy floor's handler: the same SHA-256 rounds, then the minimal reply."""

    def handler(payload: Any) -> Any:
        work(rounds, int(payload[0].text))
        return done_reply(payload)

    return handler


async def run(args: argparse.Namespace, rounds: int, floors: dict[str, Floor]) -> list[Any]:
    cases: list[dict[str, Any]] = []
    floor, heavy_floor = floors["trivial"], floors["heavy"]
    inline = await throughput(organism(trivial_async, cpu_bound=False), args.messages)
    off = await throughput(organism(trivial, cpu_bound=True, batch_max=args.batch_max),
                           args.messages)  # fmt: skip
    overhead = 1e6 / off["msg_per_s"] - 1e6 / inline["msg_per_s"]
    floor.run()
    r_in, r_off = floor.ratio(inline["msg_per_s"]), floor.ratio(off["msg_per_s"])
    emit(cases, f"trivial/{args.loop}",
         f"trivial     inline {inline['msg_per_s']:>9,.0f} msg/s (ratio {r_in:.2f})  offloaded "
         f"(2 workers) {off['msg_per_s']:>9,.0f} msg/s (ratio {r_off:.2f})  overhead "
         f"{overhead:6.1f} us/msg (pump CPU {off['pump_cpu_us_per_msg']:.1f} us/msg)",
         inline=inline, offloaded=off, overhead_us=overhead, ratio=r_off,
         ratio_inline=r_in, aims=[aim("overhead us", overhead, "<=", 30)])  # fmt: skip

    n = args.heavy_messages
    inline_h = await throughput(organism(heavy_async, cpu_bound=False), n, rounds)
    one = await throughput(organism(heavy, cpu_bound=True, workers=1), n, rounds)
    two = await throughput(organism(heavy, cpu_bound=True, workers=2), n, rounds)
    heavy_floor.run()
    speedup = two["msg_per_s"] / one["msg_per_s"]
    ratios = [heavy_floor.ratio(x["msg_per_s"]) for x in (inline_h, one, two)]
    emit(cases, f"heavy/{args.loop}",
         f"heavy       ~{args.heavy_ms:g} ms/msg: inline {inline_h['msg_per_s']:>7,.0f} msg/s  "
         f"1 worker {one['msg_per_s']:>7,.0f}  2 workers {two['msg_per_s']:>7,.0f}  "
         f"speedup {speedup:.2f}x  ratio {ratios[0]:.2f} / {ratios[1]:.2f} / {ratios[2]:.2f}",
         rounds=rounds, target_ms=args.heavy_ms, inline=inline_h, workers_1=one,
         workers_2=two, speedup_2_over_1=speedup, ratio=ratios[2],
         ratios_inline_1_2=ratios, aims=[aim("speedup", speedup, ">=", 1.7)])  # fmt: skip

    plain = Listener(name="plain", payloads=(Job,), handler=trivial_async)
    org = organism(heavy, cpu_bound=True, workers=2, extra=(plain,))
    resp = await responsiveness(org, n, rounds)
    emit(cases, f"responsive/{args.loop}",
         f"responsive  plain listener while cpu_bound saturated: p50 {resp['p50_ms']:.2f} ms  "
         f"p99 {resp['p99_ms']:.2f} ms  max {resp['max_ms']:.2f} ms over {resp['probes']} "
         "probes", aims=[aim("p99 ms", resp["p99_ms"], "<", 5)], **resp)  # fmt: skip
    return cases


def main() -> None:
    ap = parser(__doc__, "offload")
    ap.add_argument("--messages", type=int, default=20_000, help="trivial-case messages")
    ap.add_argument("--heavy-messages", type=int, default=1_000)
    ap.add_argument("--heavy-ms", type=float, default=2.0, help="CPU per heavy message")
    ap.add_argument("--batch-max", type=int, default=64)
    args = ap.parse_args()
    rounds = calibrate(args.heavy_ms)
    floors = {
        "trivial": Floor([job(i) for i in range(args.messages)], label="floor"),
        "heavy": Floor(
            [job(i, rounds) for i in range(min(args.heavy_messages, 300))],
            heavy_reply(rounds),
            label="floor heavy",
        ),
    }
    for f in floors.values():
        f.run()
    cases = run_on(args.loop, run, args, rounds, floors)
    worker_costs(cases, args)
    for f in floors.values():
        print(f.summary(f.label), flush=True)
    write_report(args.json, "offload", args, cases, floors["trivial"].best,
                 floors={k: f.best for k, f in floors.items()})  # fmt: skip


if __name__ == "__main__":
    main()
