"""``check`` (validate an organism, print its routing table) and ``schema`` (the XSD
of every payload class, or with ``--organism`` the JSON Schema of organism files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..backends import redact_url
from ..config import Organism, organism_json_schema
from ..offload import worker_spec
from ..routing import RoutingTable
from ..schema import xsd_for
from ._common import EXIT_OK, EXIT_USAGE, _error, _silence_stdout, _stream_open

__all__ = ["add_parser", "check", "schema"]


def add_parser(sub: Any) -> None:
    """Add the ``check`` and ``schema`` subcommands to the subparsers ``sub``."""
    check_parser = sub.add_parser("check", help="validate the organism and print its routing table")
    check_parser.add_argument("organism", type=Path, help="the organism YAML file")
    check_parser.add_argument(
        "--backend", metavar="URL", help="override the organism's backend URL"
    )

    schema_parser = sub.add_parser(
        "schema",
        help="print the XSD of every payload class, or the organism file's JSON Schema",
    )
    schema_parser.add_argument(
        "organism", type=Path, help="the organism YAML file (not with --organism)"
    )
    schema_parser.add_argument(
        "--out", metavar="DIR", type=Path, help="write one .xsd file per class"
    )
    schema_parser.add_argument(
        "--organism",
        action=_OrganismSchemaAction,
        nargs=0,
        help="print the JSON Schema of organism files on stdout (for editors) and exit; "
        "no organism file is read",
    )


def check(organism: Organism) -> int:
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
        order = "" if lst.ordered else " (unordered)"
        print(f"  {lst.name}: {kind}, concurrency {lst.concurrency}{order}, timeout {timeout}, "
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
        parser.exit(schema(None, None))


def schema(organism: Organism | None, out_dir: Path | None) -> int:
    """The XSD of every payload class of ``organism``, or with None (``--organism``)
    the JSON Schema of organism files, made from the models of :mod:`xml_pipeline.config`."""
    if organism is None:
        if not _stream_open(sys.stdout):
            _error("standard output is closed")
            return EXIT_USAGE
        try:
            sys.stdout.write(json.dumps(organism_json_schema(), indent=2) + "\n")
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
