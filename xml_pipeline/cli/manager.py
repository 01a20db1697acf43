"""``python -m xml_pipeline manager --address HOST:PORT``: serve one history store to
the pumps of this machine (``manager://`` backends) until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..backends import HistoryLimits
from ..backends.manager import MAX_CONNECTIONS, MAX_REQUEST_BYTES, parse_address, serve_forever
from ._common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, _error

__all__ = ["add_parser", "main"]

_HISTORY = HistoryLimits()
_MIN_REQUEST_BYTES = 64 << 10  # as the organism file's manager.max_request_bytes


def add_parser(sub: Any) -> None:
    """Add the ``manager`` subcommand to the subparsers ``sub`` of the command line."""
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
    manager.add_argument(
        "--dead-letter-budget-bytes",
        type=int,
        default=_HISTORY.dead_letter_budget_bytes,
        metavar="N",
        help="past this many bytes of dead letters, a rejection of outside input keeps "
        "only a 256-byte sample (default %(default)s)",
    )
    manager.add_argument(
        "--dead-letter-ttl-s",
        type=float,
        default=_HISTORY.dead_letter_ttl_s,
        metavar="S",
        help="dead letters are dropped this long after they were written; 0: never "
        "(default %(default)s)",
    )
    manager.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_REQUEST_BYTES,
        metavar="N",
        help="the largest request frame read; a client sending a larger one is "
        "disconnected (default %(default)s; clients split their batches under it)",
    )
    manager.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help="how many clients are kept at once; further connections are closed at once "
        "(default %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    """Serve a history store with the parsed arguments. Returns the exit status."""

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
    if args.dead_letter_budget_bytes < 0 or not args.dead_letter_ttl_s >= 0:
        return fail("--dead-letter-budget-bytes and --dead-letter-ttl-s must be at least 0")
    if args.max_connections < 1:
        return fail("--max-connections must be at least 1")
    if args.max_request_bytes < _MIN_REQUEST_BYTES:
        return fail(f"--max-request-bytes must be at least {_MIN_REQUEST_BYTES} (64 KiB)")
    limits = HistoryLimits(
        max_slots_per_thread=args.max_slots_per_thread,
        max_threads=args.max_threads,
        max_dead_letters=args.max_dead_letters,
        dead_letter_budget_bytes=args.dead_letter_budget_bytes,
        dead_letter_ttl_s=args.dead_letter_ttl_s,
    )

    def ready(served: tuple[str, int]) -> None:
        host, port = served
        print(f"manager://{f'[{host}]' if ':' in host else host}:{port}", flush=True)

    try:
        serve_forever(
            address,
            authkey.encode(),
            limits,
            ready=ready,
            max_request_bytes=args.max_request_bytes,
            max_connections=args.max_connections,
        )
    except BrokenPipeError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        return fail(f"cannot serve at {args.address}: {reason}", EXIT_FAILURE)
    return EXIT_OK
