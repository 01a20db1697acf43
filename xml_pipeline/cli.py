"""Command line: ``python -m xml_pipeline [run|check|schema|deadletters|bench] organism.yaml``.

Also ``python -m xml_pipeline manager --address HOST:PORT`` (a shared history store).

``run`` (the default) injects the organism's boot messages and the lines of
``--input`` (one XML message per line), writes every reply that reaches the
external sender to stdout, one document per line, and exits 0 once the input is
exhausted and the organism is idle. SIGINT/SIGTERM stop ingress and drain within
``drain_timeout_s``; a second signal stops at once. Errors in the configuration
give one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, NoReturn

from . import __version__, _bench
from ._pool import worker_spec
from .backends import check_backend_url, open_backend, redact_url
from .config import Organism, load_organism
from .exceptions import MessageTooLarge, XmlPipelineError
from .pump import PumpStatistics, Reply, StreamPump
from .routing import RoutingTable
from .schema import xsd_for

__all__ = ["main"]

logger = logging.getLogger("xml_pipeline.cli")

COMMANDS = ("run", "check", "schema", "manager", "deadletters", "bench")
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one clear line, status 2
        self.exit(EXIT_USAGE, f"xml_pipeline: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m xml_pipeline",
        description="Run an organism of XML message handlers (run is the default command).",
        epilog="Example: python -m xml_pipeline organisms/hello.yaml --input - --to greeter",
    )
    parser.add_argument("--version", action="version", version=f"xml_pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an organism (the default command)")
    run.add_argument("organism", type=Path, help="the organism YAML file")
    run.add_argument("--input", metavar="FILE", help="XML messages, one per line ('-' for stdin)")
    run.add_argument("--to", metavar="NAME", help="send bare payload lines to this listener")
    run.add_argument("--sender", default="console", help="label of the external sender")
    run.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    run.add_argument("--stats", action="store_true", help="print per-listener statistics at exit")
    run.add_argument("--no-boot", action="store_true", help="do not inject the boot messages")
    run.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="worker processes for cpu_bound listeners (process_pool.workers)",
    )
    run.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    run.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="logging level on stderr (default WARNING)",
    )

    check = sub.add_parser("check", help="validate the organism and print its routing table")
    check.add_argument("organism", type=Path)
    check.add_argument("--backend", metavar="URL", help="override the organism's backend URL")

    schema = sub.add_parser("schema", help="print the XSD of every payload class")
    schema.add_argument("organism", type=Path)
    schema.add_argument("--out", metavar="DIR", type=Path, help="write one .xsd file per class")
    manager = sub.add_parser(
        "manager",
        help="serve one history store to the pumps of this machine (manager:// backends)",
        description="Serve one history store until SIGINT/SIGTERM; print its manager:// URL "
        "on stdout once clients can connect.",
    )
    manager.add_argument(
        "--address",
        required=True,
        metavar="HOST:PORT",
        help="where to listen: a loopback address (port 0 picks a free one)",
    )
    manager.add_argument(
        "--authkey-env",
        default="XML_PIPELINE_MANAGER_AUTHKEY",
        metavar="NAME",
        help="the environment variable holding the authkey (default %(default)s)",
    )
    manager.add_argument("--max-slots-per-thread", type=int, default=10_000, metavar="N")
    manager.add_argument("--max-threads", type=int, default=100_000, metavar="N")
    manager.add_argument("--max-dead-letters", type=int, default=10_000, metavar="N")

    dead = sub.add_parser(
        "deadletters",
        help="list, replay or purge the dead letters of a shared backend",
        description="Dead letters of the organism's backend (manager:// or redis://).",
    )
    dead.add_argument("organism", type=Path)
    dead.add_argument("action", choices=("list", "replay", "purge"))
    dead.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    dead.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                      help="only this dead letter (repeatable); default: all")  # fmt: skip
    dead.add_argument("--json", action="store_true", help="list: one JSON object per line")
    dead.add_argument("--limit", type=_positive, metavar="N", help="list: at most N")
    dead.add_argument("--log-level", default="WARNING", type=str.upper,
                      choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))  # fmt: skip
    _bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "run")
    args = _parser().parse_args(args_list)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "manager":
        return _manager(args)
    if args.command == "bench":
        return _bench.main(args)
    try:
        organism = load_organism(args.organism, backend=getattr(args, "backend", None))
        if args.command == "check":
            check_backend_url(organism.backend)
            return _check(organism)
        if args.command == "schema":
            return _schema(organism, args.out)
        if args.command == "deadletters":
            return _deadletters(organism, args)
        if args.to is not None and args.to not in {lst.name for lst in organism.listeners}:
            print(f"xml_pipeline: error: --to {args.to!r} names no listener", file=sys.stderr)
            return EXIT_USAGE
        if args.input not in (None, "-") and (
            os.path.isdir(args.input) or not os.access(args.input, os.R_OK)
        ):
            print(f"xml_pipeline: error: --input {args.input}: cannot read", file=sys.stderr)
            return EXIT_USAGE
        if args.input == "-" and not _stream_open(sys.stdin):
            print("xml_pipeline: error: --input -: standard input is closed", file=sys.stderr)
            return EXIT_USAGE
        if not _stream_open(sys.stdout):
            print("xml_pipeline: error: standard output is closed", file=sys.stderr)
            return EXIT_USAGE
        if not args.sender or not args.sender.isprintable():
            print("xml_pipeline: error: --sender must be printable text", file=sys.stderr)
            return EXIT_USAGE
        if args.workers is not None:
            pool = dataclasses.replace(organism.process_pool, workers=args.workers)
            organism = dataclasses.replace(organism, process_pool=pool)
        return _run(organism, args)
    except XmlPipelineError as exc:
        print(f"xml_pipeline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"xml_pipeline: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _stream_open(stream: IO[str] | None) -> bool:
    if stream is None:
        return False
    try:
        os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return True


# -- check / schema ----------------------------------------------------------------


def _check(organism: Organism) -> int:
    out = sys.stdout
    worker_spec(organism)  # cpu_bound handlers must be importable by path
    print(f"organism {organism.name}: {len(organism.listeners)} listener(s), "
          f"backend {redact_url(organism.backend)}", file=out)  # fmt: skip
    print("listeners:", file=out)
    for lst in organism.listeners:
        kind = "async" if lst.is_async else "sync (thread)"
        if lst.cpu_bound:
            kind = f"{'async' if lst.is_async else 'sync'} (cpu_bound: worker processes)"
        peers = "any" if lst.peers is None else ", ".join(sorted(lst.peers)) or "none"
        timeout = f"{lst.timeout_s:g}s" if lst.timeout_s else "none"
        about = f" - {lst.description}" if lst.description else ""
        print(f"  {lst.name}: {kind}, concurrency {lst.concurrency}, timeout {timeout}, "
              f"peers {peers}{about}", file=out)  # fmt: skip
    print("routes:", file=out)
    for qname, cls, listener in RoutingTable(organism.listeners).describe():
        print(f"  {qname}  {cls}  -> {listener}", file=out)
    if any(lst.cpu_bound for lst in organism.listeners):
        pool = organism.process_pool
        print(f"process pool: {pool.worker_count} workers ({pool.start_method}), "
              f"batch_max {pool.batch_max}, max_crashes {pool.max_crashes}", file=out)  # fmt: skip
    print(f"boot messages: {len(organism.boot)}", file=out)
    return 0


def _schema(organism: Organism, out_dir: Path | None) -> int:
    seen = []
    for lst in organism.listeners:
        for cls in lst.payloads:
            if cls not in seen:
                seen.append(cls)
    for cls in seen:
        xsd = xsd_for(cls)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{cls.__name__}.xsd").write_bytes(xsd)
        else:
            sys.stdout.write(xsd.decode("utf-8") + "\n")
    if out_dir is not None:
        print(f"wrote {len(seen)} schema(s) to {out_dir}", file=sys.stderr)
    return 0


# -- manager -------------------------------------------------------------------------


def _manager(args: argparse.Namespace) -> int:
    from .backends import HistoryLimits
    from .backends.manager import parse_address, serve_forever

    def fail(message: str, status: int = EXIT_USAGE) -> int:
        print(f"xml_pipeline: error: {message}", file=sys.stderr)
        return status

    authkey = os.environ.get(args.authkey_env)
    if not authkey:
        return fail(
            f"no authkey: set the environment variable {args.authkey_env} "
            "(the same secret for this server and every client)"
        )
    try:
        address = parse_address(args.address)
    except ValueError:
        return fail(f"--address {args.address!r}: expected HOST:PORT, such as 127.0.0.1:50555")
    if min(args.max_slots_per_thread, args.max_threads, args.max_dead_letters) < 1:
        return fail("the --max-* limits must be at least 1")
    limits = HistoryLimits(
        max_slots_per_thread=args.max_slots_per_thread,
        max_threads=args.max_threads,
        max_dead_letters=args.max_dead_letters,
    )

    def ready(served: tuple[str, int]) -> None:
        host, port = served
        print(f"manager://{f'[{host}]' if ':' in host else host}:{port}", flush=True)

    try:
        serve_forever(address, authkey.encode(), limits, ready=ready)
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return fail(f"cannot serve at {args.address}: {reason}", 1)
    return 0


# -- run -----------------------------------------------------------------------------


def _run(organism: Organism, args: argparse.Namespace) -> int:
    loop_factory = None
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            if args.loop == "uvloop":
                print("xml_pipeline: error: uvloop is not installed", file=sys.stderr)
                return EXIT_USAGE
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_run_async(organism, args))


_TOO_LARGE = object()


async def _chunks(source: str) -> AsyncIterator[bytes]:
    stream: IO[bytes]
    if source == "-":
        stream = sys.stdin.buffer
        close = False
    else:
        stream = open(source, "rb")  # noqa: SIM115, ASYNC230 - closed below; a local file
        close = True
    try:
        mode = os.fstat(stream.fileno()).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stream.isatty()):
            # Files and devices such as /dev/null cannot be watched by the event loop:
            # read them directly, a chunk at a time.
            while chunk := stream.read(65536):
                yield chunk
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), stream
        )
        try:
            while chunk := await reader.read(65536):
                yield chunk
        finally:
            transport.close()
    finally:
        if close:
            stream.close()


async def _lines(source: str, cap: int) -> AsyncIterator[bytes | object]:
    """Lines of ``source``; an over-long line is skipped and yields ``_TOO_LARGE``."""
    buf = bytearray()
    skipping = False
    async for chunk in _chunks(source):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not skipping:
                    buf += chunk[start:]
                    if len(buf) > cap:
                        buf.clear()
                        skipping = True
                        yield _TOO_LARGE
                break
            if skipping:
                skipping = False
            else:
                buf += chunk[start:end]
                yield bytes(buf)
                buf.clear()
            start = end + 1
    if buf and not skipping:
        yield bytes(buf)


async def _feed(pump: StreamPump, organism: Organism, args: argparse.Namespace) -> None:
    if not args.no_boot:
        for boot in organism.boot:
            await pump.inject(boot.payload, to=boot.to, sender=boot.sender)
    if args.input is None:
        return
    cap = organism.settings.limits.max_bytes
    number = 0
    async for line in _lines(args.input, cap):
        number += 1
        if line is _TOO_LARGE:
            await pump.reject(
                MessageTooLarge(f"input line {number} is longer than {cap} bytes"),
                sender=args.sender,
            )
            continue
        assert isinstance(line, bytes)
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        await pump.inject(line, to=args.to, sender=args.sender)


def _print_stats(stats: PumpStatistics) -> None:
    err = sys.stderr
    print(f"ingress {stats.ingress}  rejected {stats.rejected}  egress {stats.egress}  "
          f"dead letters {stats.dead_letters}", file=err)  # fmt: skip
    header = (
        f"{'listener':<24} {'received':>9} {'handled':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}"
    )
    print(header, file=err)
    for name, s in stats.listeners.items():
        p50 = f"{s.latency_p50_ms:.3f}" if s.latency_p50_ms is not None else "-"
        p99 = f"{s.latency_p99_ms:.3f}" if s.latency_p99_ms is not None else "-"
        print(
            f"{name:<24} {s.received:>9} {s.handled:>9} {s.failed:>7} {p50:>8} {p99:>8}", file=err
        )
    pool = stats.pool
    if pool is not None:
        print(f"worker pool: {pool.workers} workers  tasks {pool.tasks}  batches {pool.batches}  "
              f"crashes {pool.crashes}  timeouts {pool.timeouts}  recycles {pool.recycles}",
              file=err)  # fmt: skip


async def _run_async(organism: Organism, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reader_gone = False

    def egress(reply: Reply) -> None:
        nonlocal reader_gone
        if reader_gone:
            raise BrokenPipeError("standard output is closed")
        try:
            out.write(reply.to_xml() + b"\n")
            out.flush()
        except BrokenPipeError:
            # Whoever read our output is gone (`| head -1`): stop as on SIGTERM, and
            # point stdout at /dev/null so the interpreter's final flush is quiet.
            reader_gone = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            if not stop.is_set():
                logger.warning("standard output is closed: stopping")
                stop.set()
            raise

    main_task = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.warning("%s: stopping ingress, draining", signal.Signals(signum).name)
            stop.set()
        elif main_task is not None:
            logger.warning("second signal: cancelling at once")
            main_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    pump = StreamPump(organism, egress=egress)
    try:
        async with pump:
            feeder = asyncio.create_task(_feed(pump, organism, args), name="ingress")
            stopper = asyncio.create_task(stop.wait(), name="stop")
            try:
                await asyncio.wait({feeder, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not feeder.done():
                    feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
            if stop.is_set():
                if not await pump.drain():
                    logger.warning(
                        "drain timeout (%gs): %d message(s) left are dead-lettered",
                        organism.settings.drain_timeout_s,
                        pump.statistics().in_pump,
                    )
            else:
                feeder.result()
                drain = asyncio.create_task(pump.wait_idle())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({drain, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not drain.done():
                    drain.cancel()
                    if not await pump.drain():
                        logger.warning("drain timeout: the rest is dead-lettered")
    except asyncio.CancelledError:
        if signals < 2:
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if args.stats:
        _print_stats(pump.statistics())
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _deadletters(organism: Organism, args: argparse.Namespace) -> int:
    if organism.backend.partition("://")[0] not in ("manager", "redis"):
        print(
            f"xml_pipeline: error: {organism.backend} keeps no dead letters between runs; "
            "deadletters needs a manager:// or redis:// backend",
            file=sys.stderr,
        )
        return EXIT_USAGE
    serves = organism.backend_options.get("serve") or "serve=1" in organism.backend
    if serves:
        print(
            "xml_pipeline: error: this organism serves its own manager store; name the "
            "running one with --backend manager://HOST:PORT",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with asyncio.Runner() as runner:
        return runner.run(_deadletters_async(organism, args))


async def _deadletters_async(organism: Organism, args: argparse.Namespace) -> int:
    from ._deadletters import list_letters, purge_letters, replay_letters

    if args.action == "replay":
        accepted, refused = await replay_letters(
            organism, args.ids, timeout_s=organism.settings.drain_timeout_s
        )
        print(f"replayed {accepted} dead letter(s); {refused} refused again", file=sys.stderr)
        return 0
    backend = open_backend(organism.backend, organism.history, **organism.backend_options)
    try:
        await backend.ping()
        if args.action == "list":
            await list_letters(backend, sys.stdout, as_json=args.json, limit=args.limit)
        else:
            count = await purge_letters(backend, args.ids)
            print(f"purged {count} dead letter(s)", file=sys.stderr)
    finally:
        await backend.aclose()
    return 0
