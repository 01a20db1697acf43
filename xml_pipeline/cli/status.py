"""``python -m xml_pipeline status organism.yaml``: the nodes and inboxes of an organism
served by several processes through the Redis Streams transport."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from .._stats import table
from ..backends import client_url, open_backend, redact_url
from ..config import Organism
from ..transport import open_transport
from ._common import _LOG_LEVELS, EXIT_OK, EXIT_USAGE, _add_log_format, _transport_of

__all__ = ["add_parser", "collect", "main"]


def add_parser(sub: Any) -> None:
    """Add the ``status`` subcommand to the subparsers ``sub`` of the command line."""
    status = sub.add_parser(
        "status",
        help="the nodes and inboxes of an organism on a transport",
        description="Print the nodes alive and, per listener, what its inbox stream holds "
        "(length, pending, lag, age of the oldest pending entry), and the dead letters.",
    )
    status.add_argument("organism", type=Path, help="the organism YAML file")
    status.add_argument("--transport", metavar="URL", help="override the organism's transport")
    status.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    status.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    status.add_argument("--log-level", choices=_LOG_LEVELS, default="warning")
    _add_log_format(status)


def main(organism: Organism, args: argparse.Namespace) -> int:
    """Print the status; returns the exit status."""
    transport = _transport_of(organism, args, "status reads the nodes and inboxes of")
    if transport is None:
        return EXIT_USAGE
    report = asyncio.run(collect(organism, transport))
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print(report, sys.stdout)
    return EXIT_OK


async def collect(organism: Organism, transport: str) -> dict[str, Any]:
    """What ``status`` prints, as one JSON-ready dict."""
    url, options = client_url(organism.backend, organism.backend_options)
    backend = open_backend(url, organism.history, **options)
    try:
        streams = open_transport(transport, backend)
        try:
            nodes = await streams.nodes()
            # The nodes' layout holds (what the organism file says until a node ran).
            layout = await streams.recorded_layout()
            listeners = {
                listener.name: await streams.inbox_status(
                    listener.name, layout.get(listener.name, listener.shards)
                )
                for listener in organism.listeners
            }
            dead_letters = await backend.dead_letter_count()  # type: ignore[attr-defined]
        finally:
            await streams.aclose()
    finally:
        await backend.aclose()
    return {
        "organism": organism.name,
        "transport": redact_url(transport),
        "nodes": nodes,
        "listeners": listeners,
        "dead_letters": dead_letters,
    }


def _age(ms: float | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _print(report: dict[str, Any], out: IO[str]) -> None:
    nodes = report["nodes"]
    print(
        f"organism {report['organism']}: transport {report['transport']}, "
        f"{len(nodes)} node(s) alive, {report['dead_letters']} dead letter(s)",
        file=out,
    )
    now = time.time()
    rows = [
        (name, str(info.get("pid", "?")), str(info.get("host", "?")),
         ",".join(info.get("listeners", [])) or "-", str(info.get("held", "?")),
         _age((now - info["started"]) * 1000 if "started" in info else None))
        for name, info in nodes.items()
    ]  # fmt: skip
    if rows:
        print(file=out)
        for line in table(("node", "pid", "host", "listeners", "held", "up"), rows, min_width=8):
            print(line, file=out)
    inboxes = [
        (name, str(s["length"]), str(s["pending"]), str(s["lag"]), _age(s["oldest_ms"]),
         " ".join(f"{n}:{c}" for n, c in s["pending_by_node"].items()) or "-",
         " ".join(f"{n}:{','.join(map(str, k))}" for n, k in s["shards_by_node"].items()) or "-")
        for name, s in report["listeners"].items()
    ]  # fmt: skip
    print(file=out)
    head = ("listener", "length", "pending", "lag", "oldest pending", "pending by node",
            "shards by node")  # fmt: skip
    for line in table(head, inboxes, min_width=12):
        print(line, file=out)
