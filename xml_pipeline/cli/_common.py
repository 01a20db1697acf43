"""What the commands of the command line share: exit statuses, the argument parser
that reports usage errors as one line in the user's terms, error lines, the event
loop choice, handling of a closed stdout, and GC tuning (:func:`gc_tuning`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

from ..log import JsonFormatter

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "gc_tuning"]

# The commands log under one name, whichever module they live in.
logger = logging.getLogger("xml_pipeline.cli")

COMMANDS = (
    "run", "check", "schema", "manager", "deadletters", "bench", "status", "send", "graph",
    "thread",
)  # fmt: skip
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


# -- the argument parser -------------------------------------------------------------

# How argparse names the positional arguments, and what to say instead.
_POSITIONAL = {
    "organism": "the organism file",
    "action": "the action (list, replay, purge, unanswered or replay-unanswered)",
    "command": "a command or an organism file",
    "id": "the id of a frame or of a conversation's first message",
}
_SYNOPSIS = {
    "run": "ORGANISM.yaml [--input FILE|-] [--to NAME]",
    "check": "ORGANISM.yaml",
    "schema": "ORGANISM.yaml [--out DIR]",
    "manager": "--address HOST:PORT",
    "deadletters": "ORGANISM.yaml list|replay|purge",
    "bench": "ORGANISM.yaml [--messages N]",
    "graph": "ORGANISM.yaml [--format mermaid|dot|svg]",
    "thread": "ORGANISM.yaml ID [--payloads] [--json]",
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


def _transport_of(organism: Any, args: Any, what: str) -> str | None:
    """The transport a command talks through (``--transport``, else the organism's);
    None after saying why there is none (``what``: what the command does with it)."""
    transport: str | None = args.transport or organism.transport
    if transport is None:
        _error(
            f"{organism.path}: the organism has no transport: {what} the Redis Streams "
            "transport (transport: in the file, or --transport)"
        )
    return transport


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# -- logging -------------------------------------------------------------------------


def _add_log_format(parser: argparse.ArgumentParser) -> None:
    """``--log-format``, for every command that takes ``--log-level``."""
    parser.add_argument(
        "--log-format",
        choices=_LOG_FORMATS,
        default="text",
        help="log records on stderr as text (default) or one JSON object per line",
    )


def _configure_logging(level: str, log_format: str) -> None:
    """Log to stderr at ``level``, as text or JSON lines (the library configures none).

    With ``json``, warnings go through logging too, so that stderr holds only JSON
    lines for a log shipper to read.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# -- the event loop ------------------------------------------------------------------


def _loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The event loop factory for ``--loop CHOICE`` (None: asyncio's) and the loop's name.

    ``auto`` takes uvloop when it is installed, ``asyncio`` never does.

    Raises:
        ImportError: ``uvloop`` was asked for and is not installed.
    """
    if choice in ("auto", "uvloop"):
        try:
            import uvloop  # an optional dependency
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


# -- standard streams ----------------------------------------------------------------


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
