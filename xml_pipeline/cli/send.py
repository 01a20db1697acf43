"""``python -m xml_pipeline send organism.yaml``: send the messages of standard input to
an organism served by nodes (the Redis Streams transport) and write each reply on
standard output, as a program that is not a node (:class:`~xml_pipeline.Client`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ..client import Client
from ..config import Organism
from ..exceptions import XmlPipelineError
from ._common import (
    _LOG_LEVELS,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    _add_log_format,
    _error,
    _positive,
    _transport_of,
)
from ._framing import TOO_LARGE, items

__all__ = ["add_parser", "main"]


def add_parser(sub: Any) -> None:
    """Add the ``send`` subcommand to the subparsers ``sub`` of the command line."""
    send = sub.add_parser(
        "send",
        help="send standard input to an organism served by nodes; replies on stdout",
        description="Send each message of standard input to the organism through its "
        "transport, as a client that serves no listener, and write every reply on "
        "standard output as it comes. Exit 0 once every message got a reply.",
    )
    send.add_argument("organism", type=Path, help="the organism YAML file")
    send.add_argument("--transport", metavar="URL", help="override the organism's transport")
    send.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    send.add_argument("--to", metavar="NAME", help="send bare payloads to this listener")
    send.add_argument("--sender", default="client", help="label of the external sender")
    send.add_argument("--framing", choices=("lines", "xml"), default="lines")
    send.add_argument(
        "--timeout", type=float, default=60.0, metavar="S",
        help="give up on a message without a reply after this long (default %(default)s)",
    )  # fmt: skip
    send.add_argument(
        "--concurrency", type=_positive, default=64, metavar="N",
        help="messages waiting for their reply at once (default %(default)s)",
    )  # fmt: skip
    send.add_argument("--max-bytes", type=_positive, default=1 << 20, metavar="N")
    send.add_argument("--log-level", choices=_LOG_LEVELS, default="warning")
    _add_log_format(send)


def main(organism: Organism, args: argparse.Namespace) -> int:
    """Send standard input; returns the exit status."""
    transport = _transport_of(organism, args, "send talks to nodes through")
    if transport is None:
        return EXIT_USAGE
    return asyncio.run(_send(organism, transport, args))


async def _send(organism: Organism, transport: str, args: argparse.Namespace) -> int:
    failed = 0
    out = sys.stdout.buffer
    slots = asyncio.Semaphore(args.concurrency)

    async def one(message: bytes) -> None:
        nonlocal failed
        try:
            reply = await client.request(
                message, to=args.to, sender=args.sender, timeout=args.timeout
            )
        except (XmlPipelineError, TimeoutError) as exc:
            failed += 1
            _error(f"no reply: {type(exc).__name__}: {exc}")
        else:
            out.write(reply.to_xml() + b"\n")
            out.flush()
        finally:
            slots.release()

    async with Client(transport, organism) as client, asyncio.TaskGroup() as tasks:
        async for item in items("-", args.framing, args.max_bytes):
            if item is TOO_LARGE:
                failed += 1
                _error(f"a message longer than --max-bytes {args.max_bytes} was skipped")
                continue
            assert isinstance(item, bytes)
            await slots.acquire()
            tasks.create_task(one(item))
    return EXIT_FAILURE if failed else EXIT_OK
