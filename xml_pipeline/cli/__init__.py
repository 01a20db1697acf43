"""Command line: ``python -m xml_pipeline [run|check|schema|manager|deadletters|bench] …``.

``run`` (the default command) injects the organism's boot messages and then the
messages of ``--input FILE`` (``-`` for stdin), writes every reply that reaches
the external sender to stdout, one envelope per line, and exits once the input is
exhausted and the organism is idle. See docs/cli.md for every command.

Input framing (``--framing``):

- ``lines`` (default): one message per line; blank lines are skipped.
- ``xml``: consecutive top-level XML documents, so pretty-printed, multi-line
  documents work. A small byte-level splitter (:class:`_DocumentSplitter`) finds
  where each document ends (tags with quoted attributes, comments, CDATA,
  processing instructions, element depth) without parsing: only
  ``pump.inject`` parses, with the project's hardened parser. Text between
  documents is answered like a malformed document.

In both, an item longer than ``pump.max_message_bytes`` is answered with a
``Huh`` (``too-large``) and skipped, and a malformed one with a ``Huh``
(``malformed``); reading goes on.

Output: replies are written by :class:`_ReplyWriter`, a thread doing plain
blocking writes from a bounded buffer, so a slow reader of stdout never stalls
the event loop (timers and other handlers keep running), and a full buffer makes
egress wait, which holds back the handlers that answer and, through the bounded
queues, ingress. When the reader goes away (``| head -1``) the run stops as on
SIGTERM.

Exit statuses (``run``; the other commands use 0, 1 and 2 the same way):

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
where the letters are. GC tuning (``pump.gc_threshold``) is applied by ``run``
and ``bench`` for their duration (:func:`gc_tuning`); the library itself does not
change process-wide state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import re
import select
import shlex
import signal
import stat
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn

from .. import __version__
from .._stats import table
from ..backends import backend_scheme, check_backend_url, open_backend, redact_url, serves
from ..config import Organism, load_organism
from ..exceptions import BackendUnavailable, ConfigError, MessageTooLarge, XmlPipelineError
from ..offload import worker_spec
from ..pump import StreamPump
from ..reply import PumpStatistics, Reply
from ..routing import RoutingTable
from ..schema import xsd_for
from .deadletters import joining_organism, list_letters, purge_letters, replay_letters

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "gc_tuning", "main"]

logger = logging.getLogger("xml_pipeline.cli")

COMMANDS = ("run", "check", "schema", "manager", "deadletters", "bench")
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _error(message: str) -> None:
    """Print ``message`` on stderr, one ``xml_pipeline: error:`` line per line of it."""
    for line in message.splitlines() or [""]:
        print(f"xml_pipeline: error: {line}", file=sys.stderr)


@contextlib.contextmanager
def gc_tuning(threshold: int | None) -> Iterator[None]:
    """Raise the garbage collector's generation-0 threshold for the ``with`` block.

    Every hop allocates a few dozen short-lived objects while histories keep many
    long-lived ones: with CPython's default threshold (700) the collector runs
    every few hops and costs about a third of the pump's time (benchmarks/relay.py).
    The setting is process-wide, so it is the application's choice: ``run`` and
    ``bench`` apply ``pump.gc_threshold`` this way; the library does not.

    Args:
        threshold: the generation-0 threshold to use at least; None changes nothing.
            A higher threshold already in place is kept.

    The previous thresholds are restored on leaving the block.
    """
    if threshold is None:
        yield
        return
    saved = gc.get_threshold()
    if saved[0] < threshold:
        gc.set_threshold(threshold, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


# -- the command line ----------------------------------------------------------------

# How argparse names the positional arguments, and what to say instead.
_POSITIONAL = {
    "organism": "the organism file",
    "action": "the action (list, replay or purge)",
    "command": "a command or an organism file",
}
_SYNOPSIS = {
    "run": "ORGANISM.yaml [--input FILE|-] [--to NAME]",
    "check": "ORGANISM.yaml",
    "schema": "ORGANISM.yaml [--out DIR]",
    "manager": "--address HOST:PORT",
    "deadletters": "ORGANISM.yaml list|replay|purge",
    "bench": "ORGANISM.yaml [--messages N]",
}
_PROG = "python -m xml_pipeline"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line in the user's terms, exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog[len(_PROG) :].strip()
        self.exit(EXIT_USAGE, f"xml_pipeline: error: {_usage_error(command, message)}\n")


def _usage_error(command: str, message: str) -> str:
    if not command:
        return (
            "give an organism file to run, such as: python -m xml_pipeline "
            f"organisms/hello.yaml, or a command: {', '.join(COMMANDS)} (see --help)"
        )
    synopsis = f"{_PROG} {command} {_SYNOPSIS.get(command, '')}".rstrip()
    required = re.fullmatch(r"the following arguments are required: (.*)", message)
    if required:
        names = [_POSITIONAL.get(name, name) for name in required.group(1).split(", ")]
        return f"{command}: missing {' and '.join(names)} (usage: {synopsis})"
    choice = re.fullmatch(r"argument (\w+): invalid choice: (.*) \(choose from (.*)\)", message)
    if choice:
        name, value, choices = choice.groups()
        label = _POSITIONAL.get(name, name).split(" (")[0].removeprefix("the ")
        return f"{command}: {value} is not a valid {label}; choose from {choices}"
    positional = re.fullmatch(r"argument (\w+): (.*)", message)
    if positional:
        name, problem = positional.groups()
        return f"{command}: {_POSITIONAL.get(name, name)}: {problem}"
    value = re.fullmatch(r"argument (\S+): expected one argument", message)
    if value:
        return f"{command}: {value.group(1)} needs a value"
    return message


def _parser() -> argparse.ArgumentParser:
    from . import bench

    parser = _Parser(
        prog=_PROG,
        description="Run an organism of XML message handlers (run is the default command).",
        epilog="Example: python -m xml_pipeline organisms/hello.yaml --input - --to greeter",
    )
    parser.add_argument("--version", action="version", version=f"xml_pipeline {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

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
        choices=_LOG_LEVELS,
        help="logging level on stderr (default WARNING)",
    )

    check = sub.add_parser("check", help="validate the organism and print its routing table")
    check.add_argument("organism", type=Path, help="the organism YAML file")
    check.add_argument("--backend", metavar="URL", help="override the organism's backend URL")

    schema = sub.add_parser(
        "schema",
        help="print the XSD of every payload class, or the organism file's JSON Schema",
    )
    schema.add_argument("organism", type=Path, help="the organism YAML file (not with --organism)")
    schema.add_argument("--out", metavar="DIR", type=Path, help="write one .xsd file per class")
    schema.add_argument(
        "--organism",
        action=_OrganismSchemaAction,
        nargs=0,
        help="print the JSON Schema of organism files on stdout (for editors) and exit; "
        "no organism file is read",
    )
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
    dead.add_argument("organism", type=Path, help="the organism YAML file")
    dead.add_argument("action", choices=("list", "replay", "purge"))
    dead.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    dead.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                      help="only this dead letter (repeatable); default: all")  # fmt: skip
    dead.add_argument("--json", action="store_true", help="list: one JSON object per line")
    dead.add_argument("--limit", type=_positive, metavar="N", help="list: at most N")
    dead.add_argument("--log-level", default="WARNING", type=str.upper, choices=_LOG_LEVELS)
    bench.add_parser(sub)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit status (see the module docstring)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "run")
    parser = _parser()
    args, extra = parser.parse_known_args(args_list)
    if extra:
        what = f"unknown option {extra[0]}" if extra[0].startswith("-") else (
            f"unexpected argument {extra[0]!r}"
        )  # fmt: skip
        parser.exit(
            EXIT_USAGE,
            f"xml_pipeline: error: {args.command}: {what} (see {_PROG} {args.command} --help)\n",
        )
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # before the command installed its own handlers
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader of stdout went away (`| head -1`): stop quietly, as run does.
        _silence_stdout()
        logger.warning("standard output is closed: stopping")
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "manager":
        return _manager(args)
    if args.command == "bench":
        from . import bench

        return bench.main(args)
    try:
        organism = load_organism(args.organism, backend=getattr(args, "backend", None))
        writes_stdout = args.command in ("check", "run") or (
            args.command == "schema" and args.out is None
        ) or (args.command == "deadletters" and args.action == "list")  # fmt: skip
        if writes_stdout and not _stream_open(sys.stdout):
            _error("standard output is closed")
            return EXIT_USAGE
        if args.command == "check":
            check_backend_url(organism.backend)
            return _check(organism)
        if args.command == "schema":
            return _schema(organism, args.out)
        if args.command == "deadletters":
            return _deadletters(organism, args)
        problem = _run_usage_problem(organism, args)
        if problem:
            _error(problem)
            return EXIT_USAGE
        if args.workers is not None:
            pool = dataclasses.replace(organism.process_pool, workers=args.workers)
            organism = dataclasses.replace(organism, process_pool=pool)
        return _run(organism, args)
    except XmlPipelineError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILURE


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
    return None


def _stream_open(stream: IO[str] | None) -> bool:
    if stream is None:
        return False
    try:
        os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush is quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _keeps_dead_letters(organism: Organism) -> bool:
    """Whether the backend keeps dead letters after this process exits."""
    try:
        scheme = backend_scheme(organism.backend)
        return scheme.persistent and not serves(organism.backend, organism.backend_options)
    except BackendUnavailable:
        return False


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
    out.flush()  # a reader that went away is noticed here, not at exit
    return EXIT_OK


class _OrganismSchemaAction(argparse.Action):
    """``schema --organism``: print the JSON Schema and exit while the arguments are
    parsed, so that the organism file, required otherwise, is not asked for."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.exit(_schema(None, None))


def _schema(organism: Organism | None, out_dir: Path | None) -> int:
    """The XSD of every payload class of ``organism``, or with None (``--organism``)
    the JSON Schema of organism files, made from the models of :mod:`.config`."""
    if organism is None:
        import json

        from ..config import _json_schema

        if not _stream_open(sys.stdout):
            _error("standard output is closed")
            return EXIT_USAGE
        try:
            sys.stdout.write(json.dumps(_json_schema(), indent=2) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head -1`, as main() handles it for the other commands
            _silence_stdout()
            print("xml_pipeline: standard output is closed: stopping", file=sys.stderr)
        return EXIT_OK
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
    else:
        sys.stdout.flush()
    return EXIT_OK


# -- manager -------------------------------------------------------------------------


def _manager(args: argparse.Namespace) -> int:
    from ..backends import HistoryLimits
    from ..backends.manager import parse_address, serve_forever

    def fail(message: str, status: int = EXIT_USAGE) -> int:
        _error(message)
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
    except BrokenPipeError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return fail(f"cannot serve at {args.address}: {reason}", EXIT_FAILURE)
    return EXIT_OK


# -- run: input ----------------------------------------------------------------------


_TOO_LARGE = object()  # stands for an item longer than the cap, which was skipped


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
        # The loop's pipe reader makes the descriptor non-blocking, a flag of the open
        # file description (which a terminal shares with stdout, stderr and the shell):
        # put it back as it was when done.
        blocking = os.get_blocking(stream.fileno())
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), stream
        )
        try:
            while chunk := await reader.read(65536):
                yield chunk
        finally:
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(stream.fileno(), blocking)
            transport.close()
    finally:
        if close:
            stream.close()


class _LineSplitter:
    """Cuts a byte stream into lines; an over-long line is skipped as ``_TOO_LARGE``."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buf = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[bytes | object]:
        items: list[bytes | object] = []
        buf = self._buf
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not self._skipping:
                    buf += chunk[start:]
                    if len(buf) > self._cap:
                        buf.clear()
                        self._skipping = True
                        items.append(_TOO_LARGE)
                return items
            if self._skipping:
                self._skipping = False
            else:
                buf += chunk[start:end]
                items.append(bytes(buf))
                buf.clear()
            start = end + 1

    def close(self) -> list[bytes | object]:
        items: list[bytes | object] = []
        if self._buf and not self._skipping:
            items.append(bytes(self._buf))
        self._buf.clear()
        return items


# Modes of the document splitter.
_BETWEEN, _GARBAGE, _TEXT, _TAG, _COMMENT, _CDATA, _PI, _DECL = range(8)
# What a "<" opens.
_OPEN_COMMENT, _OPEN_CDATA, _OPEN_XML_DECL, _OPEN_PI, _OPEN_DECL, _OPEN_END, _OPEN_START = range(7)
_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_TAG_STOP = re.compile(rb"[>\"']")
_CLOSE = {_COMMENT: b"-->", _CDATA: b"]]>", _PI: b"?>"}


class _DocumentSplitter:
    """Cuts a byte stream into consecutive top-level XML documents, without parsing them.

    It follows only what decides where a document ends: start, end and empty-element
    tags (with ``>`` inside quoted attribute values), comments, CDATA sections,
    processing instructions and declarations, and the element depth. Whether a
    document is well-formed is for the parser to say when it is injected. Between
    documents, whitespace, comments and processing instructions are skipped; other
    text up to the next ``<`` is an item of its own (answered as malformed). An XML
    declaration inside a document starts a new one, so a truncated document does
    not swallow the rest of the stream. An item longer than ``cap`` bytes is
    dropped while it is read and reported as ``_TOO_LARGE``.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buf = bytearray()
        self._pos = 0  # where scanning resumes
        self._start: int | None = None  # where the current item begins
        self._mode = _BETWEEN
        self._in_doc = False
        self._depth = 0
        self._root_seen = False
        self._end_tag = False
        self._quote = 0  # the quote byte a tag or declaration is inside, or 0
        self._brackets = 0  # [ ] nesting in a DOCTYPE declaration
        self._skipping = False  # the current item is over the cap: not kept
        self._items: list[bytes | object] = []

    def feed(self, chunk: bytes) -> list[bytes | object]:
        self._buf += chunk
        self._scan(final=False)
        return self._take()

    def close(self) -> list[bytes | object]:
        self._scan(final=True)
        if self._start is not None and not self._skipping:
            rest = bytes(self._buf[self._start :]).strip()
            if rest:
                self._items.append(rest)
        self._start = None
        self._buf.clear()
        self._pos = 0
        return self._take()

    def _take(self) -> list[bytes | object]:
        items, self._items = self._items, []
        return items

    def _begin(self, at: int, mode: int, *, in_doc: bool = True) -> None:
        self._start = at
        self._mode = mode
        self._in_doc = in_doc
        self._depth = 0
        self._root_seen = False
        self._skipping = False

    def _finish(self, end: int) -> None:
        """The current item ends before ``end``."""
        assert self._start is not None
        if self._skipping:
            self._skipping = False
        elif end - self._start > self._cap:
            self._items.append(_TOO_LARGE)
        else:
            data = bytes(self._buf[self._start : end])
            self._items.append(data if self._in_doc else data.rstrip())
        self._start = None
        self._in_doc = False
        self._mode = _BETWEEN

    def _opens(self, at: int, final: bool) -> int | None:
        """What the ``<`` at ``at`` opens; None when more bytes are needed to tell."""
        buf = self._buf
        have = len(buf) - at
        if have < 2:
            return None if not final else _OPEN_START
        second = buf[at + 1]
        if second == 0x2F:  # </
            return _OPEN_END
        if second == 0x3F:  # <?
            if have < 6 and not final:
                return None
            declaration = buf.startswith(b"<?xml", at) and have > 5 and buf[at + 5] in _WHITESPACE
            return _OPEN_XML_DECL if declaration else _OPEN_PI
        if second != 0x21:  # not <!
            return _OPEN_START
        if have < 3:
            return None if not final else _OPEN_DECL
        if buf[at + 2] == 0x2D:  # <!-
            if have < 4 and not final:
                return None
            return _OPEN_COMMENT if buf.startswith(b"<!--", at) else _OPEN_DECL
        if buf[at + 2] == 0x5B:  # <![
            if have < 9 and not final:
                return None
            return _OPEN_CDATA if buf.startswith(b"<![CDATA[", at) else _OPEN_DECL
        return _OPEN_DECL

    def _scan(self, *, final: bool) -> None:
        buf = self._buf
        i = self._pos
        n = len(buf)
        while i < n:
            mode = self._mode
            if mode == _BETWEEN:
                while i < n and buf[i] in _WHITESPACE:
                    i += 1
                if i == n:
                    break
                if buf[i] != 0x3C:  # not "<"
                    if buf.startswith(_BOM, i):
                        i += len(_BOM)
                        continue
                    if n - i < len(_BOM) and _BOM.startswith(buf[i:]) and not final:
                        break
                    self._begin(i, _GARBAGE, in_doc=False)
                    i += 1
                    continue
                opens = self._opens(i, final)
                if opens is None:
                    break
                if opens == _OPEN_COMMENT:  # between documents: skipped
                    self._mode, i = _COMMENT, i + 4
                elif opens == _OPEN_PI:
                    self._mode, i = _PI, i + 2
                elif opens == _OPEN_END:  # an end tag with no document: garbage
                    self._begin(i, _GARBAGE, in_doc=False)
                    i += 2
                else:
                    self._begin(i, _TEXT)
            elif mode == _GARBAGE:
                end = buf.find(b"<", i)
                if end < 0:
                    i = n
                    break
                self._finish(end)
                i = end
            elif mode == _TEXT:
                lt = buf.find(b"<", i)
                if lt < 0:
                    i = n
                    break
                opens = self._opens(lt, final)
                if opens is None:
                    i = lt
                    break
                if opens == _OPEN_COMMENT:
                    self._mode, i = _COMMENT, lt + 4
                elif opens == _OPEN_CDATA:
                    self._mode, i = _CDATA, lt + 9
                elif opens in (_OPEN_PI, _OPEN_XML_DECL):
                    # (While skipping, the item's start was moved up to the bytes
                    # still kept, so it may equal lt: a declaration there starts
                    # the next document all the same.)
                    if opens == _OPEN_XML_DECL and (self._skipping or lt != self._start):
                        self._finish(lt)  # a truncated document: a new one begins here
                        self._begin(lt, _TEXT)
                    self._mode, i = _PI, lt + 2
                elif opens == _OPEN_DECL:
                    self._mode, self._quote, self._brackets, i = _DECL, 0, 0, lt + 2
                else:
                    self._end_tag = opens == _OPEN_END
                    self._mode, self._quote, i = _TAG, 0, lt + 1
            elif mode == _TAG:
                i = self._scan_tag(i)
                if i < 0:
                    i = n
                    break
            elif mode == _DECL:
                i = self._scan_declaration(i)
            else:  # a comment, CDATA section or processing instruction
                close = _CLOSE[mode]
                end = buf.find(close, i)
                if end < 0:
                    i = max(i, n - len(close) + 1)
                    break
                i = end + len(close)
                self._mode = _TEXT if self._in_doc else _BETWEEN
        self._pos = i
        self._check_cap()
        self._compact()

    def _scan_declaration(self, i: int) -> int:
        """Scan a ``<!DOCTYPE …>`` (its internal subset in ``[ ]``) from ``i``."""
        buf = self._buf
        n = len(buf)
        while i < n:
            c = buf[i]
            i += 1
            if self._quote:
                if c == self._quote:
                    self._quote = 0
            elif c in b"\"'":
                self._quote = c
            elif c == 0x5B:  # [
                self._brackets += 1
            elif c == 0x5D:  # ]
                self._brackets = max(0, self._brackets - 1)
            elif c == 0x3E and not self._brackets:  # >
                self._mode = _TEXT
                break
        return i

    def _scan_tag(self, i: int) -> int:
        """Scan a tag from ``i``; return where scanning goes on, or -1 to wait for more."""
        buf = self._buf
        while True:
            if self._quote:
                end = buf.find(bytes((self._quote,)), i)
                if end < 0:
                    return -1
                self._quote = 0
                i = end + 1
                continue
            found = _TAG_STOP.search(buf, i)
            if found is None:
                return -1
            i = found.end()
            if buf[i - 1] != 0x3E:  # a quote opens
                self._quote = buf[i - 1]
                continue
            break
        if self._end_tag:
            if self._depth == 0:  # an end tag without a start: the document is broken
                self._finish(i)
                return i
            self._depth -= 1
        elif buf[i - 2] != 0x2F:  # not "/>": an element opens
            self._depth += 1
            self._root_seen = True
        else:
            self._root_seen = True
        if self._depth == 0 and self._root_seen:
            self._finish(i)
        else:
            self._mode = _TEXT
        return i

    def _check_cap(self) -> None:
        if self._start is None or self._skipping:
            return
        if len(self._buf) - self._start > self._cap:
            self._skipping = True
            self._items.append(_TOO_LARGE)

    def _compact(self) -> None:
        """Drop the bytes no item needs any more (all of them while skipping)."""
        keep = self._pos if self._start is None or self._skipping else self._start
        if keep:
            del self._buf[:keep]
            self._pos -= keep
            if self._start is not None:
                self._start = max(0, self._start - keep)


async def _items(source: str, framing: str, cap: int) -> AsyncIterator[bytes | object]:
    """The messages of ``source``; an over-long one comes as ``_TOO_LARGE``."""
    splitter = _DocumentSplitter(cap) if framing == "xml" else _LineSplitter(cap)
    async for chunk in _chunks(source):
        for item in splitter.feed(chunk):
            yield item
    for item in splitter.close():
        yield item


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
    async for item in _items(args.input, framing, cap):
        number += 1
        if item is _TOO_LARGE:
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


# -- run: output ---------------------------------------------------------------------


class _ReplyWriter:
    """Writes to a file descriptor from a thread of its own, with backpressure.

    :meth:`write` never blocks the event loop: it queues the bytes for the thread,
    and returns an awaitable once more than ``high_water`` bytes wait, which
    completes when the thread has brought them down to ``low_water``. Awaiting it
    from egress holds back the handler that answered and, through the bounded
    inboxes, ingress, while timers and other listeners keep running.

    Why a thread rather than the loop's pipe transport: ``connect_write_pipe``
    puts the descriptor in non-blocking mode, and that flag belongs to the open
    file description that stdout shares with stderr (``2>&1``), with the shell's
    terminal and with other processes writing to the same pipe; their ordinary
    writes would then fail with EAGAIN. Plain blocking writes in a thread change
    nothing outside this process, and work alike for pipes, sockets, terminals and
    regular files (a slow disk or a stopped terminal cannot stall the loop either).
    """

    def __init__(
        self,
        fd: int,
        on_error: Callable[[OSError], None],
        *,
        high_water: int = 256 * 1024,
        low_water: int = 64 * 1024,
    ) -> None:
        self._fd = fd
        self._on_error = on_error
        self._high = high_water
        self._low = low_water
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Guarded by the lock: what waits to be written, its size (with what is
        # being written), whether write() waits for room, whether to stop.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._blocked = False
        self._closing = False
        # Loop side only (the thread reaches them through call_soon_threadsafe).
        self._room = asyncio.Event()
        self._room.set()
        self._ended = asyncio.Event()
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="xml_pipeline stdout", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> Awaitable[None] | None:
        """Queue ``data``; return an awaitable to wait on when the buffer is full.

        Raises:
            OSError: an earlier write failed (BrokenPipeError: the reader is gone).
        """
        if self.error is not None:
            raise type(self.error)(self.error.errno, self.error.strerror)
        with self._lock:
            self._chunks.append(data)
            self._buffered += len(data)
            full = self._buffered > self._high
            if full and not self._blocked:
                self._blocked = True
                self._room.clear()
            self._wake.notify()
        return self._wait_for_room() if full else None

    async def _wait_for_room(self) -> None:
        await self._room.wait()
        if self.error is not None:
            raise type(self.error)(self.error.errno, self.error.strerror)

    def close(self) -> None:
        """Let the thread write what is queued and end; do not wait for it."""
        with self._lock:
            self._closing = True
            self._wake.notify()

    async def aclose(self) -> None:
        """Write everything queued, then end the thread."""
        self.close()
        await self._ended.wait()

    def _run(self) -> None:
        error: OSError | None = None
        try:
            while True:
                with self._lock:
                    while not self._chunks and not self._closing:
                        self._wake.wait()
                    if not self._chunks:
                        return
                    chunks, self._chunks = self._chunks, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._write_all(data)
                with self._lock:
                    self._buffered -= len(data)
                    room = self._blocked and self._buffered <= self._low
                    if room:
                        self._blocked = False
                if room:
                    self._call(self._open_room)
        except OSError as exc:
            error = exc
        finally:
            self._call(self._end, error)

    def _open_room(self) -> None:
        # On the loop: write() may have filled the buffer again since the thread
        # decided there was room, so decide again, under the lock.
        with self._lock:
            if not self._blocked:
                self._room.set()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                # Someone made the shared description non-blocking (the loop's stdin
                # reader does, when stdin and stdout are one terminal): wait for room.
                select.select([], [self._fd], [])
                continue
            view = view[written:]

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(fn, *args)

    def _end(self, error: OSError | None) -> None:
        if error is not None:
            self.error = error
            self._room.set()
            self._on_error(error)
        self._ended.set()


# -- run -----------------------------------------------------------------------------


def _run(organism: Organism, args: argparse.Namespace) -> int:
    loop_factory = None
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            if args.loop == "uvloop":
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
    writer = _ReplyWriter(sys.stdout.fileno(), on_output_error)

    def egress(reply: Reply) -> Awaitable[None] | None:
        return writer.write(reply.to_xml() + b"\n")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    pump = StreamPump(organism, egress=egress)
    started = drained = failed = cancelled = False
    try:
        try:
            async with pump:
                started = True
                source = {None: "no input", "-": "standard input"}.get(args.input, args.input)
                logger.info(
                    "organism %s is running (backend %s); reading %s",
                    organism.name, redact_url(organism.backend), source,
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
    """Feed the input, then wait until idle; on ``stop``, drain. True if nothing was left."""
    if await _until_stopped(_feed(pump, organism, args), stop) and await _until_stopped(
        pump.wait_idle(), stop
    ):
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


# -- deadletters ---------------------------------------------------------------------


def _deadletters(organism: Organism, args: argparse.Namespace) -> int:
    try:
        # Join the store as any other process does; never serve one here.
        organism = joining_organism(organism)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    with asyncio.Runner() as runner:
        return runner.run(_deadletters_async(organism, args))


async def _deadletters_async(organism: Organism, args: argparse.Namespace) -> int:
    if args.action == "replay":
        accepted, refused = await replay_letters(
            organism, args.ids, timeout_s=organism.settings.drain_timeout_s
        )
        print(f"replayed {accepted} dead letter(s); {refused} refused again", file=sys.stderr)
        return EXIT_OK
    backend = open_backend(organism.backend, organism.history, **organism.backend_options)
    try:
        await backend.ping()
        if args.action == "list":
            await list_letters(backend, sys.stdout, as_json=args.json, limit=args.limit)
            sys.stdout.flush()
        else:
            count = await purge_letters(backend, args.ids)
            print(f"purged {count} dead letter(s)", file=sys.stderr)
    finally:
        await backend.aclose()
    return EXIT_OK
