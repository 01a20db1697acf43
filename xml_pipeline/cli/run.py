"""``python -m xml_pipeline run organism.yaml`` (the default command).

``run`` injects the organism's boot messages and then the messages of
``--input FILE`` (``-`` for stdin; cut as :mod:`._framing` says), writes every reply
that reaches the external sender to stdout, one envelope per line (through
:mod:`._writer`), and exits once the input is exhausted and the organism is idle.
A node of a distributed organism, and a run serving the dashboard (``--web``) with no
``--input``, serve until a signal stops them instead (the dashboard is there to be
looked at).

Exit statuses (the other commands use 0, 1 and 2 the same way):

- 0: the input was exhausted and every accepted message was handled, or a
  signal (or a closed stdout) stopped the run and the drain finished in time.
- 1: accepted messages were dead-lettered at shutdown because the drain timed out
  (``pump.drain_timeout_s``), or an error occurred while running (I/O, backend).
- 2: usage or configuration error, reported as one line per problem, before
  anything runs (this includes a backend that cannot be reached at start).
- 128 + signal number (130 for SIGINT, 143 for SIGTERM): a second signal
  cancelled the run at once.

SIGINT/SIGTERM stop ingress and drain within ``drain_timeout_s``; what is left
is dead-lettered (code ``shutdown``) and one WARNING line gives the count and
where the letters are. GC tuning (``pump.gc_threshold``) is applied for the
duration of the run (:func:`~._common.gc_tuning`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

# The module, not its names: the dashboard reads the cli's commands (graph, thread,
# deadletters), so whichever of the two is imported first, the other may still be
# loading; its names are looked up when run runs.
from .. import dashboard as web
from .._stats import table
from ..backends import backend_scheme, redact_url, serves
from ..config import Organism
from ..exceptions import BackendUnavailable, MessageTooLarge, XmlPipelineError
from ..metrics import parse_address, require_prometheus, serve_metrics
from ..pump import StreamPump
from ..reply import PumpStatistics, Reply
from ._common import (
    _LOG_LEVELS,
    _PROG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    _add_log_format,
    _error,
    _loop_factory,
    _positive,
    _silence_stdout,
    _stream_open,
    gc_tuning,
    logger,
)
from ._framing import TOO_LARGE, items
from ._writer import ReplyWriter

__all__ = ["add_parser", "main"]


def add_parser(sub: Any) -> None:
    """Add the ``run`` subcommand to the subparsers ``sub`` of the command line."""
    run = sub.add_parser(
        "run",
        help="run an organism (the default command)",
        description="Run an organism: boot messages, then --input; replies on stdout. "
        "Exit status: 0 done, 1 messages dead-lettered at shutdown or an error while "
        "running, 2 usage or configuration error, 128+N stopped by a second signal N.",
    )
    run.add_argument("organism", type=Path, help="the organism YAML file")
    run.add_argument("--input", metavar="FILE", help="XML messages to inject ('-' for stdin)")
    run.add_argument(
        "--framing",
        choices=("lines", "xml"),
        help="how --input is cut into messages: lines (default, one per line) or xml "
        "(consecutive XML documents, pretty-printed or not)",
    )
    run.add_argument("--to", metavar="NAME", help="send bare payloads to this listener")
    run.add_argument("--sender", default="console", help="label of the external sender")
    run.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    run.add_argument(
        "--transport",
        metavar="URL",
        help="override the organism's transport: a Redis URL makes this process one node "
        "of the organism (inboxes are Redis Streams)",
    )
    run.add_argument(
        "--node",
        metavar="NAME",
        help="this node's name on the transport (default: the host name); restarted "
        "under the same name, a node takes up what it held",
    )
    run.add_argument(
        "--listeners",
        metavar="A,B,...",
        help="with --transport: the listeners this node serves (default: all)",
    )
    run.add_argument(
        "--claim-idle-ms",
        type=_positive,
        metavar="MS",
        help="with --transport: take over what another node held without renewing its "
        "lease for this long (default: twice the longest timeout_s served, at least 60000)",
    )
    run.add_argument(
        "--max-deliveries",
        type=_positive,
        default=5,
        metavar="N",
        help="with --transport: dead-letter a message delivered more often than this "
        "(default %(default)s)",
    )
    run.add_argument("--stats", action="store_true", help="print per-listener statistics at exit")
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on this address while "
        "running (HOST defaults to 127.0.0.1; needs pip install 'xml-pipeline[metrics]')",
    )
    run.add_argument(
        "--web",
        action="store_true",
        help="also serve the live dashboard on the --metrics address (read-only unless "
        "a token is given; needs pip install 'xml-pipeline[web]')",
    )
    run.add_argument(
        "--web-token-file",
        metavar="PATH",
        help="allow the dashboard's actions (replay, purge) to requests that carry the "
        f"token this file holds (stripped; at least {web.MIN_TOKEN} characters) in the "
        f"{web.TOKEN_HEADER} header (default: ${web.TOKEN_ENV})",
    )
    run.add_argument(
        "--web-token",
        metavar="TOKEN",
        help="the token itself (visible to other local users in the process list: "
        f"prefer --web-token-file or ${web.TOKEN_ENV})",
    )
    run.add_argument(
        "--web-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (or NAME:PORT), as a reverse "
        "proxy in front of the dashboard may send; repeatable (by default only the "
        "--metrics address and localhost, 127.0.0.1, [::1] with its port)",
    )
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
        choices=_LOG_LEVELS,
        help="logging level on stderr (default WARNING)",
    )
    _add_log_format(run)


def main(organism: Organism, args: argparse.Namespace) -> int:
    """Run ``organism`` with the parsed arguments. Returns the exit status."""
    problem = _run_usage_problem(organism, args)
    if problem:
        _error(problem)
        return EXIT_USAGE
    if args.workers is not None:
        pool = dataclasses.replace(organism.process_pool, workers=args.workers)
        organism = dataclasses.replace(organism, process_pool=pool)
    return _run(organism, args)


def _run_usage_problem(organism: Organism, args: argparse.Namespace) -> str | None:
    if args.to is not None and args.to not in {lst.name for lst in organism.listeners}:
        return f"--to {args.to!r} names no listener"
    if args.framing is not None and args.input is None:
        return "--framing applies to --input: give --input FILE (or - for stdin)"
    if args.input not in (None, "-") and (
        os.path.isdir(args.input) or not os.access(args.input, os.R_OK)
    ):
        return f"--input {args.input}: cannot read"
    if args.input == "-" and not _stream_open(sys.stdin):
        return "--input -: standard input is closed"
    if not args.sender or not args.sender.isprintable():
        return "--sender must be printable text"
    if args.web and args.metrics is None:
        return "--web serves the dashboard on the --metrics address: give --metrics HOST:PORT"
    for option, value in (("--web-token", args.web_token),
                          ("--web-token-file", args.web_token_file)):  # fmt: skip
        if value is not None and not args.web:
            return f"{option} applies to --web"
    if args.web:
        problem = _resolve_web_token(args)
        if problem:
            return problem
    if args.web_host and not args.web:
        return "--web-host applies to --web"
    if any(not name or not name.isprintable() or any(c in name for c in "/ @")
           for name in args.web_host):  # fmt: skip
        return "--web-host takes a host name (NAME or NAME:PORT)"
    if args.web:
        try:
            require_prometheus()
        except ImportError:
            return f"--web: the dashboard needs prometheus-client: {web.INSTALL_HINT}"
    if args.metrics is not None:
        try:
            parse_address(args.metrics)
            require_prometheus()
        except (ValueError, ImportError) as exc:
            return f"--metrics: {exc}"
    return None


def _keeps_dead_letters(organism: Organism) -> bool:
    """Whether the backend keeps dead letters after this process exits."""
    try:
        scheme = backend_scheme(organism.backend)
        return scheme.persistent and not serves(organism.backend, organism.backend_options)
    except BackendUnavailable:
        return False


# -- input ---------------------------------------------------------------------------


async def _feed(pump: StreamPump, organism: Organism, args: argparse.Namespace) -> None:
    if not args.no_boot:
        for boot in organism.boot:
            await pump.inject(boot.payload, to=boot.to, sender=boot.sender)
    if args.input is None:
        return
    framing = args.framing or "lines"
    cap = organism.settings.limits.max_bytes
    what = "document" if framing == "xml" else "line"
    number = 0
    async for item in items(args.input, framing, cap):
        number += 1
        if item is TOO_LARGE:
            await pump.reject(
                MessageTooLarge(f"input {what} {number} is longer than {cap} bytes"),
                sender=args.sender,
            )
            continue
        assert isinstance(item, bytes)
        if framing == "lines":
            item = item.rstrip(b"\r")
            if not item.strip():
                continue
        await pump.inject(item, to=args.to, sender=args.sender)


# -- the run -------------------------------------------------------------------------


def _resolve_web_token(args: argparse.Namespace) -> str | None:
    """Set ``args.dashboard_token`` from --web-token-file, --web-token or the
    environment; the usage problem, if any."""
    if args.web_token is not None and args.web_token_file is not None:
        return "give --web-token or --web-token-file, not both"
    if args.web_token_file is not None:
        try:
            with open(args.web_token_file, encoding="utf-8") as file:
                token: str | None = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            return f"--web-token-file {args.web_token_file}: cannot read: {exc}"
        source = "--web-token-file"
    elif args.web_token is not None:
        logger.warning(
            "--web-token: the token is visible to other local users (process list, shell "
            "history); prefer $%s or --web-token-file", web.TOKEN_ENV,
        )  # fmt: skip
        token, source = args.web_token, "--web-token"
    else:
        token, source = os.environ.get(web.TOKEN_ENV) or None, f"${web.TOKEN_ENV}"
    if token is not None and len(token) < web.MIN_TOKEN:
        return f"{source}: the token needs at least {web.MIN_TOKEN} characters"
    args.dashboard_token = token
    return None


def _run(organism: Organism, args: argparse.Namespace) -> int:
    try:
        loop_factory, _ = _loop_factory(args.loop)
    except ImportError:
        _error("uvloop is not installed")
        return EXIT_USAGE
    with (
        gc_tuning(organism.settings.gc_threshold),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        return runner.run(_run_async(organism, args))


async def _until_stopped(aw: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``aw`` unless ``stop`` is set first (then cancel it); True if it completed.

    An exception of ``aw`` is raised; a cancellation of the caller propagates.
    """
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for helper in (task, stopper):
            helper.cancel()
        await asyncio.wait({task, stopper})
    if task.cancelled():
        return False
    task.result()
    return True


def _shutdown_summary(
    abandoned: int, cause: str, organism: Organism, args: argparse.Namespace
) -> str:
    """One line: how many accepted messages were dead-lettered, and where they are."""
    url = redact_url(organism.backend)
    head = f"{abandoned} accepted message(s) dead-lettered at shutdown ({cause}; code shutdown)"
    if not _keeps_dead_letters(organism):
        return (
            f"{head}: {url} keeps dead letters only while this process runs; "
            "a manager:// or redis:// backend keeps them"
        )
    command = f"{_PROG} deadletters {shlex.quote(str(args.organism))} list"
    if args.backend is not None:
        command += f" --backend {shlex.quote(url)}"
    return f"{head}: they are kept in {url}; read them with: {command}"


async def _run_async(organism: Organism, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    stop = asyncio.Event()
    signals: list[int] = []
    finished = output_failed = flushing = cancel_sent = False

    def on_output_error(exc: OSError) -> None:
        nonlocal output_failed
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            # Whoever read our output is gone (`| head -1`): stop as on SIGTERM.
            _silence_stdout()
            logger.warning("standard output is closed: stopping")
        else:
            output_failed = True
            logger.error("cannot write to standard output (%s): stopping", exc.strerror or exc)
        stop.set()

    def on_signal(signum: int) -> None:
        nonlocal cancel_sent
        if finished:
            return
        signals.append(signum)
        name = signal.Signals(signum).name
        if len(signals) == 1 and not flushing:
            logger.warning("%s: stopping ingress, draining", name)
            stop.set()
        elif not cancel_sent and main_task is not None:
            # A second signal, or one while only the replies are still being written
            # (to a reader that may never read them): stop at once.
            cancel_sent = True
            if len(signals) > 1:
                logger.warning("second signal (%s): cancelling at once", name)
            else:
                logger.warning("%s while the last replies are written: stopping at once", name)
            main_task.cancel()

    def cancelled_by_signal() -> bool:
        """Whether the cancellation being handled is a signal's (then it is done)."""
        if not cancel_sent or main_task is None:
            return False
        main_task.uncancel()
        return True

    sys.stdout.flush()
    writer = ReplyWriter(sys.stdout.fileno(), on_output_error)

    def egress(reply: Reply) -> Awaitable[None] | None:
        return writer.write(reply.to_xml() + b"\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    serve = None if args.listeners is None else [n for n in args.listeners.split(",") if n]
    pump = StreamPump(
        organism,
        egress=egress,
        transport=args.transport,
        node=args.node,
        serve=serve,
        claim_idle_ms=args.claim_idle_ms,
        max_deliveries=args.max_deliveries,
        # The handlers' own records name their delivery: what JSON logs are read for.
        log_context=args.log_format == "json",
    )
    started = drained = failed = cancelled = False
    # The metrics server lives as long as the run: entered before the pump starts,
    # left (thread joined, port closed) before this returns.
    metrics = contextlib.AsyncExitStack()
    try:
        if args.metrics is not None:
            host, port = parse_address(args.metrics)
            try:
                dashboard = None
                if args.web:
                    dashboard = web.Dashboard(args.dashboard_token, hosts=args.web_host)
                await metrics.enter_async_context(
                    serve_metrics(
                        pump, host, port, draining=stop.is_set, dashboard=dashboard,
                        # The live view shows a new snapshot each second at most.
                        probe_interval_s=1.0 if args.web else 2.0,
                    )
                )  # fmt: skip
            except OSError as exc:
                _error(f"--metrics {args.metrics}: cannot listen: {exc.strerror or exc}")
                return EXIT_USAGE
        try:
            async with pump:
                started = True
                source = {None: "no input", "-": "standard input"}.get(args.input, args.input)
                logger.info(
                    "organism %s is running (backend %s); reading %s",
                    organism.name, redact_url(organism.backend), source,
                )  # fmt: skip
                if args.web and args.input is None and pump.transport is None:
                    logger.warning(
                        "dashboard on http://%s/ : serving until stopped (Ctrl-C or "
                        "SIGTERM)", args.metrics,
                    )  # fmt: skip
                drained = await _serve(pump, organism, args, stop)
        except asyncio.CancelledError:
            if not cancelled_by_signal():
                raise
            cancelled = True
        except (XmlPipelineError, OSError) as exc:
            if not started:
                raise  # the organism could not start
            _error(str(exc))
            failed = True
        stats = pump.statistics()
        abandoned = stats.abandoned
        if abandoned:
            if cancelled:
                cause = "cancelled by a second signal"
            elif not drained:
                cause = f"the drain timed out after {organism.settings.drain_timeout_s:g} s"
            else:
                cause = "the pump stopped"
            logger.warning(_shutdown_summary(abandoned, cause, organism, args))
        if not cancelled:
            flushing = True
            try:
                await writer.aclose()  # the replies still queued reach the reader
            except asyncio.CancelledError:
                if not cancelled_by_signal():
                    raise
                cancelled = True
        finished = True
    finally:
        await metrics.aclose()
        writer.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if args.stats:
        _print_stats(stats)
    if cancelled:
        return 128 + signals[-1]
    if abandoned or failed or output_failed:
        return EXIT_FAILURE
    return EXIT_OK


async def _serve(
    pump: StreamPump, organism: Organism, args: argparse.Namespace, stop: asyncio.Event
) -> bool:
    """Feed the input, then wait until idle (a node of a distributed organism, or the
    dashboard with no input: until ``stop``, as a service); on ``stop``, drain. True
    if nothing was left."""
    if await _until_stopped(_feed(pump, organism, args), stop):
        if pump.transport is not None or (args.web and args.input is None):
            await stop.wait()
        elif await _until_stopped(pump.wait_idle(), stop):
            return True
    return await pump.drain()


def _print_stats(stats: PumpStatistics) -> None:
    err = sys.stderr
    print(f"ingress {stats.ingress}  rejected {stats.rejected}  egress {stats.egress}  "
          f"dead letters {stats.dead_letters}", file=err)  # fmt: skip
    rows = [
        (name, str(s.received), str(s.handled), str(s.failed),
         f"{s.latency_p50_ms:.3f}" if s.latency_p50_ms is not None else "-",
         f"{s.latency_p99_ms:.3f}" if s.latency_p99_ms is not None else "-")
        for name, s in stats.listeners.items()
    ]  # fmt: skip
    head = ("listener", "received", "handled", "failed", "p50 ms", "p99 ms")
    for line in table(head, rows, min_width=24):
        print(line, file=err)
    pool = stats.pool
    if pool is not None:
        print(f"worker pool: {pool.workers} workers  tasks {pool.tasks}  batches {pool.batches}  "
              f"crashes {pool.crashes}  timeouts {pool.timeouts}  recycles {pool.recycles}",
              file=err)  # fmt: skip
