"""Command line: ``python -m xml_pipeline [run|check|schema|manager|deadletters|bench|…] …``.

``run`` is the default command: ``python -m xml_pipeline organism.yaml`` runs the
organism. See docs/cli.md for every command. One module per command family:

- :mod:`.run`: ``run`` (feeding the input, the two-stage signals, the shutdown
  summary, ``--stats``), with :mod:`._framing` (how ``--input`` is cut into
  messages) and :mod:`._writer` (how replies reach stdout);
- :mod:`.check`: ``check`` and ``schema``;
- :mod:`.manager`: ``manager``;
- :mod:`.deadletters`: ``deadletters list|replay|purge``;
- :mod:`.bench`: ``bench``;
- :mod:`.graph`: ``graph``; :mod:`.thread`: ``thread``;
- :mod:`._common`: what they share (exit statuses, the argument parser, error
  lines, the event loop choice, a closed stdout, :func:`gc_tuning`).

This module builds the parser from the commands' ``add_parser`` and dispatches.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from ..backends import check_backend_url
from ..config import load_organism
from ..exceptions import XmlPipelineError
from . import bench, check, deadletters, graph, manager, run, send, status, thread
from ._common import (
    _PROG,
    COMMANDS,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    _configure_logging,
    _error,
    _Parser,
    _silence_stdout,
    _stream_open,
    gc_tuning,
    logger,
)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "gc_tuning", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Run an organism of XML message handlers (run is the default command).",
        epilog="Example: python -m xml_pipeline organisms/hello.yaml --input - --to greeter",
    )
    parser.add_argument("--version", action="version", version=f"xml_pipeline {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    run.add_parser(sub)
    check.add_parser(sub)
    manager.add_parser(sub)
    deadletters.add_parser(sub)
    bench.add_parser(sub)
    status.add_parser(sub)
    send.add_parser(sub)
    graph.add_parser(sub)
    thread.add_parser(sub)
    return parser


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
    _configure_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
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
        return manager.main(args)
    if args.command == "bench":
        return bench.main(args)
    try:
        organism = load_organism(args.organism, backend=getattr(args, "backend", None))
        writes_stdout = args.command in ("check", "run") or (
            args.command == "schema" and args.out is None
        ) or (args.command == "deadletters" and args.action == "list") or (
            args.command in ("status", "send", "graph", "thread")
        )  # fmt: skip
        if writes_stdout and not _stream_open(sys.stdout):
            _error("standard output is closed")
            return EXIT_USAGE
        if args.command == "check":
            check_backend_url(organism.backend)
            return check.check(organism)
        if args.command == "schema":
            return check.schema(organism, args.out)
        if args.command == "deadletters":
            return deadletters.main(organism, args)
        if args.command == "status":
            return status.main(organism, args)
        if args.command == "send":
            return send.main(organism, args)
        if args.command == "graph":
            return graph.main(organism, args)
        if args.command == "thread":
            return thread.main(organism, args)
        return run.main(organism, args)
    except XmlPipelineError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILURE
