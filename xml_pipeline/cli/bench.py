"""The ``bench`` command: measure an organism on this machine.

``python -m xml_pipeline bench organism.yaml`` replays the organism's boot messages
(or the lines of ``--input``) ``--messages`` times, each as a new conversation,
with ``--concurrency`` conversations in flight, and prints messages/s, hops/s,
the latency from injection to the conversation's first reply, CPU time, peak
memory and per-listener counters (see docs/bench.md for how to read them).

Each message goes in with :meth:`StreamPump.request`, so a conversation's first
reply ends its measurement; a reply whose payload is a ``Huh`` still ends it but
counts as an error, and so do refusals at ingress (a ``Huh`` without a
conversation), conversations that end without a reply (``NoReply``, known as soon
as nothing of them is left in the pump) and timeouts.

The workers' CPU comes from the pool's statistics (what the worker processes
report), their peak memory from ``/proc`` while they are alive (Linux). Like
``run``, the command applies ``pump.gc_threshold`` for the duration of the run
(:func:`xml_pipeline.cli.gc_tuning`); :func:`run_bench` alone does not.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import signal
import sys
import time
from array import array
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .. import __version__
from .._stats import percentile, table
from ..backends import redact_url
from ..config import Organism, load_organism
from ..envelope import ENVELOPE_NAMESPACE, build_envelope, envelope_from_element
from ..exceptions import Abandoned, MessageError, NoReply, XmlPipelineError
from ..parser import parse_bytes
from ..payload import Huh
from ..pump import StreamPump
from ..reply import PumpStatistics
from . import _plot
from ._common import (
    _LOG_LEVELS,
    EXIT_OK,
    EXIT_USAGE,
    _add_log_format,
    _error,
    _loop_factory,
    gc_tuning,
)
from ._common import _positive as _count

__all__ = ["BenchMessage", "BenchOptions", "BenchResult", "add_parser", "main", "run_bench"]

DEFAULT_MESSAGES = 10_000
_MESSAGE_TAG = "{" + ENVELOPE_NAMESPACE + "}message"
_PROGRESS_EVERY_S = 0.2
_BAR_WIDTH = 30


# -- options -------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def add_parser(sub: Any) -> None:
    """Add the ``bench`` subcommand to the subparsers ``sub`` of the command line."""
    bench = sub.add_parser(
        "bench",
        help="measure an organism: replay its boot messages (or --input) many times",
        description="Replay the organism's boot messages (or the lines of --input) as "
        "separate conversations and report messages/s, hops/s, latency, CPU and memory.",
    )
    add = bench.add_argument
    add("organism", type=Path, help="the organism YAML file")
    add("--input", metavar="FILE", help="replay these messages, one per line ('-' for stdin)")
    add("--to", metavar="NAME", help="send bare payload lines to this listener")
    add("--sender", default="console", help="label of the sender of bare payload lines")
    add("--messages", type=_count, metavar="N",
        help=f"messages to send (default {DEFAULT_MESSAGES:,}; none with --duration)")  # fmt: skip
    add("--duration", type=_seconds, metavar="S", help="stop injecting after S seconds")
    add("--concurrency", type=_count, default=64, metavar="C",
        help="conversations in flight (default %(default)s)")  # fmt: skip
    add("--timeout", type=_seconds, default=30.0, metavar="S",
        help="seconds to wait for a message's first reply (default 30)")  # fmt: skip
    add("--backend", metavar="URL", help="override the organism's backend URL")
    add("--workers", type=_count, metavar="N",
        help="worker processes for cpu_bound listeners (process_pool.workers)")  # fmt: skip
    add("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
        help="event loop; auto (default) uses uvloop when it is installed")  # fmt: skip
    add("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    add("--plot", type=Path, metavar="FILE",
        help="also draw the latency distribution and the throughput over time to FILE "
        f"(.svg or .png; needs {_plot.INSTALL_HINT})")  # fmt: skip
    add("--log-level", default="ERROR", type=str.upper,
        choices=_LOG_LEVELS,
        help="logging level on stderr (default ERROR: the table counts failures)")  # fmt: skip
    _add_log_format(bench)


# -- what is measured ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class BenchMessage:
    """One message to replay: a document, and the ``to``/``sender`` of a bare payload."""

    data: bytes
    to: str | None
    sender: str


@dataclasses.dataclass(frozen=True, slots=True)
class BenchOptions:
    """How to run: at most ``messages`` (None: no limit), for at most ``duration_s``.

    ``timeline``: also record when each message ended (:attr:`BenchResult.completed_s`,
    for ``--plot``); off, the run keeps only the latencies.
    """

    messages: int | None = DEFAULT_MESSAGES
    duration_s: float | None = None
    concurrency: int = 64
    timeout_s: float = 30.0
    timeline: bool = False


@dataclasses.dataclass(slots=True)
class BenchResult:
    """The figures of one run (see docs/bench.md).

    ``latencies_s`` holds the latency of each answered message; ``completed_s``, with
    :attr:`BenchOptions.timeline`, when each message ended (answered or not), in
    seconds from the start of the run.
    """

    messages: int = 0
    ok: int = 0
    huh: int = 0
    rejected: int = 0
    timeouts: int = 0
    no_reply: int = 0
    abandoned: int = 0
    error_codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    elapsed_s: float = 0.0
    latencies_s: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    completed_s: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    workers_cpu_s: float | None = None
    peak_rss_mb: float = 0.0
    workers_peak_rss_mb: float | None = None
    interrupted: bool = False
    stats: PumpStatistics | None = None

    @property
    def hops(self) -> int:
        """Deliveries to listeners during the run."""
        if self.stats is None:
            return 0
        return sum(s.received for s in self.stats.listeners.values())

    def percentiles_ms(self) -> dict[str, float | None]:
        """Latency p50/p90/p99/max in milliseconds (None when nothing was answered)."""
        samples = sorted(self.latencies_s)
        n = len(samples)
        if not n:
            return {"p50": None, "p90": None, "p99": None, "max": None}
        return {
            "p50": percentile(samples, 0.50) * 1e3,
            "p90": percentile(samples, 0.90) * 1e3,
            "p99": percentile(samples, 0.99) * 1e3,
            "max": samples[-1] * 1e3,
        }


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _rss_mb(kilobytes_or_bytes: int) -> float:
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    return kilobytes_or_bytes / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def _workers_peak_rss_mb(pids: Sequence[int]) -> float | None:
    """The largest peak resident memory of the processes ``pids`` (Linux), or None."""
    peaks = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)  # kB
                        break
        except (OSError, ValueError, IndexError):
            continue
    return max(peaks) if peaks else None


class _Bench:
    def __init__(
        self,
        pump: StreamPump,
        messages: Sequence[BenchMessage],
        options: BenchOptions,
        result: BenchResult,
        stop: asyncio.Event,
    ) -> None:
        self.pump = pump
        self.messages = messages
        self.options = options
        self.result = result
        self.limit = options.messages
        self.started = 0
        self.finished = 0
        self.start = 0.0
        self.deadline: float | None = None
        self.expired = False
        self.stop = stop

    async def client(self) -> None:
        pump = self.pump
        messages = self.messages
        count = len(messages)
        timeout = self.options.timeout_s
        result = self.result
        latencies = result.latencies_s
        # The timeline costs an append per message: only when asked (--plot).
        ended = result.completed_s if self.options.timeline else None
        start = self.start
        clock = time.perf_counter
        while not (self.expired or self.stop.is_set()):
            index = self.started
            if self.limit is not None and index >= self.limit:
                return
            if self.deadline is not None and clock() >= self.deadline:
                self.expired = True
                return
            self.started = index + 1
            message = messages[index % count]
            t0 = clock()
            try:
                async with asyncio.timeout(timeout):  # admission included
                    reply = await pump.request(message.data, to=message.to, sender=message.sender)
            except TimeoutError:
                result.timeouts += 1
            except NoReply:  # the conversation ended without a reply: known at once
                result.no_reply += 1
            except Abandoned:
                result.abandoned += 1
            except MessageError as exc:
                result.rejected += 1
                result.error_codes[exc.code] += 1
            else:
                payload = reply.payload
                if isinstance(payload, Huh):
                    result.error_codes[payload.code] += 1
                    if reply.thread_id is None:  # refused at ingress: no conversation
                        result.rejected += 1
                    else:
                        latencies.append(clock() - t0)
                        result.huh += 1
                else:
                    latencies.append(clock() - t0)
                    result.ok += 1
            if ended is not None:
                ended.append(clock() - start)
            self.finished += 1

    async def progress(self, out: IO[str]) -> None:
        try:
            while True:
                await asyncio.sleep(_PROGRESS_EVERY_S)
                self.draw(out)
        finally:
            out.write("\r" + " " * 79 + "\r")
            out.flush()

    def draw(self, out: IO[str]) -> None:
        elapsed = time.perf_counter() - self.start
        fractions = []
        if self.limit is not None:
            fractions.append(self.finished / self.limit)
        if self.options.duration_s is not None:
            fractions.append(elapsed / self.options.duration_s)
        fraction = min(1.0, max(fractions)) if fractions else 0.0
        filled = int(fraction * _BAR_WIDTH)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        total = f"/{self.limit:,}" if self.limit is not None else ""
        line = (
            f"[{bar}] {fraction:4.0%}  {self.finished:,}{total} msgs  "
            f"{_rate(self.finished, elapsed):,.0f} msg/s  {elapsed:.1f} s"
        )
        out.write("\r" + line[:79])
        out.flush()


async def run_bench(
    organism: Organism,
    messages: Sequence[BenchMessage],
    options: BenchOptions,
    *,
    progress: IO[str] | None = None,
    stop: asyncio.Event | None = None,
) -> BenchResult:
    """Run the benchmark on a pump of ``organism``; return its figures.

    Args:
        organism: what to run.
        messages: replayed in turn, each as a new conversation (no thread id).
        options: how many, how long, how many at once, the timeout of one message.
        progress: a terminal to draw a progress bar on, or None.
        stop: set it to stop injecting early (what is in flight is still awaited).

    Raises:
        XmlPipelineError: the pump could not start (configuration, backend).
    """
    if not messages:
        raise ValueError("nothing to replay")
    result = BenchResult()
    pump = StreamPump(organism)
    async with pump:
        if stop is None:
            stop = asyncio.Event()
        bench = _Bench(pump, messages, options, result, stop)
        clients = options.concurrency
        if options.messages is not None:
            clients = min(clients, options.messages)
        gc.collect()
        pool_before = pump.statistics().pool
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        bench.start = time.perf_counter()
        if options.duration_s is not None:
            bench.deadline = bench.start + options.duration_s
        helpers = []
        if progress is not None:
            helpers.append(asyncio.create_task(bench.progress(progress), name="bench progress"))
        try:
            await asyncio.gather(*(bench.client() for _ in range(clients)))
        finally:
            result.elapsed_s = time.perf_counter() - bench.start
            self_after = resource.getrusage(resource.RUSAGE_SELF)
            for helper in helpers:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
        result.stats = pump.statistics()
        result.messages = bench.finished
        result.interrupted = stop.is_set()
        result.cpu_user_s = self_after.ru_utime - self_before.ru_utime
        result.cpu_system_s = self_after.ru_stime - self_before.ru_stime
        if result.stats.pool is not None:  # before the pool stops its workers
            result.workers_peak_rss_mb = _workers_peak_rss_mb(result.stats.pool.pids)
        if result.stats.in_pump and not result.timeouts:
            # Work that goes on after a first reply: let it finish, as ``run`` does.
            # After timeouts, what is left is likely stuck: it is dead-lettered.
            await pump.drain()
    result.peak_rss_mb = _rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    pool_after = pump.statistics().pool  # the last figures, once the workers reported
    if pool_after is not None:
        before = pool_before.worker_cpu_s if pool_before is not None else 0.0
        result.workers_cpu_s = pool_after.worker_cpu_s - before
    return result


# -- input ---------------------------------------------------------------------------


class _InputError(Exception):
    pass


def _replayable(line: bytes, organism: Organism) -> bytes:
    """``line`` without the ``<thread>`` and ``<id>`` of an envelope.

    Every replay must open a new conversation: a thread id would continue one, and
    an ``<id>`` seen before would be ignored as a retry. Lines the pump would refuse
    are kept as they are (each replay is refused and counted).
    """
    try:
        element = parse_bytes(line, organism.settings.limits)
        if element.tag != _MESSAGE_TAG:
            return line
        env = envelope_from_element(element)
    except MessageError:
        return line
    if env.thread is None and env.id is None:
        return line
    return build_envelope(sender=env.sender, to=env.to, payload=env.payload)


def _read_input(source: str, organism: Organism, to: str | None, sender: str) -> list[BenchMessage]:
    try:
        if source == "-":
            if sys.stdin is None:
                raise OSError("standard input is closed")
            data = sys.stdin.buffer.read()
        else:
            if os.path.isdir(source):
                raise IsADirectoryError(source)
            with open(source, "rb") as stream:
                data = stream.read()
    except (OSError, ValueError):
        raise _InputError(f"--input {source}: cannot read") from None
    messages = []
    for raw in data.split(b"\n"):
        line = raw.rstrip(b"\r")
        if line.strip():
            messages.append(BenchMessage(_replayable(line, organism), to, sender))
    if not messages:
        raise _InputError(f"--input {source}: no messages in it")
    return messages


# -- the command ---------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand with parsed arguments. Returns the exit status."""

    def fail(message: str, status: int = EXIT_USAGE) -> int:
        _error(message)
        return status

    try:
        organism = load_organism(args.organism, backend=args.backend)
    except XmlPipelineError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(str(exc), 1)
    if args.to is not None and args.to not in {lst.name for lst in organism.listeners}:
        return fail(f"--to {args.to!r} names no listener")
    if not args.sender or not args.sender.isprintable():
        return fail("--sender must be printable text")
    if args.json is not None:
        folder = args.json.parent
        if args.json.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            return fail(f"--json {args.json}: cannot write there")
    if args.plot is not None:
        folder = args.plot.parent
        if args.plot.suffix.lower().lstrip(".") not in _plot.FORMATS:
            return fail(f"--plot {args.plot}: the file name must end in .svg or .png")
        if args.plot.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            return fail(f"--plot {args.plot}: cannot write there")
        try:
            _plot.require()  # now: a run of minutes must not end in this error
        except _plot.PlotUnavailable as exc:
            return fail(str(exc))
    if args.workers is not None:
        pool = dataclasses.replace(organism.process_pool, workers=args.workers)
        organism = dataclasses.replace(organism, process_pool=pool)
    if args.input is not None:
        try:
            messages = _read_input(args.input, organism, args.to, args.sender)
        except _InputError as exc:
            return fail(str(exc))
    else:
        messages = [BenchMessage(b.payload, b.to, b.sender) for b in organism.boot]
        if not messages:
            return fail(
                f"{args.organism}: the organism has no boot messages; "
                "give the messages to replay with --input FILE"
            )
    count = args.messages
    if count is None and args.duration is None:
        count = DEFAULT_MESSAGES
    options = BenchOptions(
        messages=count,
        duration_s=args.duration,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        timeline=args.plot is not None,
    )
    try:
        loop_factory, loop_name = _loop_factory(args.loop)
    except ImportError:
        return fail("uvloop is not installed")
    progress = sys.stderr if sys.stderr is not None and sys.stderr.isatty() else None
    signals: list[int] = []
    try:
        with (
            gc_tuning(organism.settings.gc_threshold),
            asyncio.Runner(loop_factory=loop_factory) as runner,
        ):
            result = runner.run(_bench_with_signals(organism, messages, options, progress, signals))
    except asyncio.CancelledError:  # a second SIGINT/SIGTERM
        if len(signals) < 2:
            raise
        return fail("interrupted twice: stopped without results", 128 + signals[1])
    except XmlPipelineError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(str(exc), 1)
    report = _report(organism, args, options, loop_name, len(messages), result)
    _print_table(report, sys.stdout)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            return fail(f"--json {args.json}: {exc.strerror or exc}", 1)
    if args.plot is not None:
        try:
            _plot.write_plot(args.plot, report, result.latencies_s, result.completed_s)
        except OSError as exc:
            return fail(f"--plot {args.plot}: {exc.strerror or exc}", 1)
    return EXIT_OK


async def _bench_with_signals(
    organism: Organism,
    messages: Sequence[BenchMessage],
    options: BenchOptions,
    progress: IO[str] | None,
    signals: list[int],
) -> BenchResult:
    """``run_bench``; the first SIGINT/SIGTERM stops injecting, a second stops at once.

    The signals received are appended to ``signals``.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        signals.append(signum)
        name = signal.Signals(signum).name
        if len(signals) == 1:
            print(f"xml_pipeline: {name}: stopping; waiting for the messages in flight "
                  "(a second signal stops at once)", file=sys.stderr, flush=True)  # fmt: skip
            stop.set()
        elif len(signals) == 2 and main_task is not None:
            main_task.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        return await run_bench(organism, messages, options, progress=progress, stop=stop)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


# -- the report ----------------------------------------------------------------------


def _report(
    organism: Organism,
    args: argparse.Namespace,
    options: BenchOptions,
    loop_name: str,
    distinct: int,
    result: BenchResult,
) -> dict[str, Any]:
    stats = result.stats
    assert stats is not None
    has_pool = any(lst.cpu_bound for lst in organism.listeners)
    elapsed = result.elapsed_s
    hops = result.hops
    cpu = result.cpu_user_s + result.cpu_system_s
    listeners = {
        name: {
            "received": s.received,
            "handled": s.handled,
            "failed": s.failed,
            "p50_ms": s.latency_p50_ms,
            "p99_ms": s.latency_p99_ms,
        }
        for name, s in stats.listeners.items()
    }
    return {
        "organism": organism.name,
        "organism_file": str(args.organism),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "xml_pipeline": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loop": loop_name,
        "options": {
            "messages": options.messages,
            "duration_s": options.duration_s,
            "concurrency": options.concurrency,
            "timeout_s": options.timeout_s,
            "backend": redact_url(organism.backend),
            "workers": organism.process_pool.worker_count if has_pool else None,
            "input": args.input,
            "to": args.to,
            "sender": args.sender if args.input is not None else None,
            "source": "input" if args.input is not None else "boot",
            "distinct_messages": distinct,
        },
        "interrupted": result.interrupted,
        "messages": result.messages,
        "replied": result.ok + result.huh,
        "ok": result.ok,
        "errors": {
            "huh": result.huh,
            "rejected": result.rejected,
            "timeouts": result.timeouts,
            "no_reply": result.no_reply,
            "abandoned": result.abandoned,
            "codes": dict(sorted(result.error_codes.items())),
        },
        "elapsed_s": elapsed,
        "msgs_per_s": _rate(result.messages, elapsed),
        "hops": hops,
        "hops_per_s": _rate(hops, elapsed),
        "hops_per_message": hops / result.messages if result.messages else None,
        "latency_ms": result.percentiles_ms(),
        "cpu_s": {
            "user": result.cpu_user_s,
            "system": result.cpu_system_s,
            "total": cpu,
            "percent_of_one_core": 100 * _rate(cpu, elapsed),
        },
        "workers_cpu_s": result.workers_cpu_s,
        "peak_rss_mb": result.peak_rss_mb,
        "workers_peak_rss_mb": result.workers_peak_rss_mb,
        "listeners": listeners,
        "pump": {
            "ingress": stats.ingress,
            "rejected": stats.rejected,
            "duplicates": stats.duplicates,
            "egress": stats.egress,
            "dead_letters": stats.dead_letters,
        },
        "pool": None if stats.pool is None else dataclasses.asdict(stats.pool),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_table(report: dict[str, Any], out: IO[str]) -> None:
    opts = report["options"]
    errors = report["errors"]
    lat = report["latency_ms"]
    cpu = report["cpu_s"]
    if opts["source"] == "boot":
        source = f"{opts['distinct_messages']:,} boot message(s)"
    else:
        source = f"{opts['distinct_messages']:,} line(s) of {opts['input']}"
    run = f"{report['loop']}, concurrency {opts['concurrency']}"
    if opts["messages"] is not None:
        run += f", messages {opts['messages']:,}"
    if opts["duration_s"] is not None:
        run += f", duration {opts['duration_s']:g} s"
    run += f", timeout {opts['timeout_s']:g} s"
    done = f"{report['messages']:,} in {report['elapsed_s']:.3f} s"
    if report["interrupted"]:
        done += " (interrupted)"
    hops = (
        f"{report['hops_per_s']:,.0f}  ({report['hops']:,} hops, "
        f"{report['hops_per_message'] or 0:.2f} per message)"
    )
    latency = "  ".join(f"{q} {_ms(lat[q])}" for q in ("p50", "p90", "p99", "max"))
    kinds = ["huh", "rejected", "timeouts", "no_reply"]
    if errors["abandoned"]:
        kinds.append("abandoned")
    failed = "  ".join(f"{kind.replace('_', ' ')} {errors[kind]:,}" for kind in kinds)
    rows = [
        ("organism", f"{report['organism']} ({report['organism_file']})"),
        ("backend", opts["backend"]),
        ("replaying", f"{source}, in turn, each as a new conversation"),
        ("run", run),
        ("messages", done),
        ("messages/s", f"{report['msgs_per_s']:,.0f}"),
        ("hops/s", hops),
        ("latency ms", latency),
        ("errors", failed),
    ]
    if errors["codes"]:
        rows.append(("error codes", "  ".join(f"{k} {v:,}" for k, v in errors["codes"].items())))
    share = f"{cpu['percent_of_one_core']:.0f}% of one core"
    rows.append(("CPU s", f"{cpu['total']:.3f} pump process ({share})"))
    if report["workers_cpu_s"] is not None:
        total = report["workers_cpu_s"]
        rows.append(("workers CPU s", f"{total:.3f} ({opts['workers']} worker processes)"))
    rows.append(("peak RSS MB", f"{report['peak_rss_mb']:.1f} pump process"))
    if report["workers_peak_rss_mb"] is not None:
        rows.append(("workers RSS MB", f"{report['workers_peak_rss_mb']:.1f} largest worker"))
    for label, value in rows:
        print(f"{label:<15} {value}", file=out)
    print(file=out)
    head = ("listener", "received", "handled", "failed", "p50 ms", "p99 ms")
    per_listener = [
        (name, f"{s['received']:,}", f"{s['handled']:,}", f"{s['failed']:,}",
         _ms(s["p50_ms"]), _ms(s["p99_ms"]))
        for name, s in report["listeners"].items()
    ]  # fmt: skip
    for line in table(head, per_listener):
        print(line, file=out)
    print(file=out)
    print(
        f"bench {report['organism']} {report['messages']} msgs  "
        f"{report['msgs_per_s']:,.0f} msg/s  {report['hops_per_s']:,.0f} hops/s  "
        f"p50 {_ms(lat['p50'])} ms  p99 {_ms(lat['p99'])} ms",
        file=out,
    )
    out.flush()
