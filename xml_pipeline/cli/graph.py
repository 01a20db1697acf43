"""``python -m xml_pipeline graph organism.yaml``: the routing graph of an organism, as
Mermaid (the default), Graphviz DOT, or SVG drawn by Graphviz's ``dot`` program.

What is drawn is what the organism file says, nothing guessed (see docs/inspect.md):

- one node per listener, marked when it is ``cpu_bound``;
- the outside (ingress) with one edge to each listener, labelled with the payloads
  (routing keys ``{namespace}local``) it accepts: what a client may send it;
- a listener's ``peers`` as solid edges: the only listeners it may forward to;
- a listener without ``peers`` may forward to any listener accepting what it sends,
  which the file does not say: it gets one dashed edge to a node "any listener";
- ``peers: []``: no forward edge at all.

Responses are not drawn: every listener may always answer whoever called it.

Names are untrusted text here as everywhere: node ids are generated (``n0``, ``n1``,
…) and every label is escaped for the format (:func:`mermaid_text`, :func:`dot_text`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Organism, load_organism
from ..payload import codec_for
from ._common import EXIT_FAILURE, EXIT_OK, _error

__all__ = [
    "FORMATS",
    "GraphNode",
    "GraphvizMissing",
    "RoutingGraph",
    "add_parser",
    "dot",
    "dot_text",
    "main",
    "mermaid",
    "mermaid_text",
    "pictures_markdown",
    "routing_graph",
    "svg",
]

FORMATS = ("mermaid", "dot", "svg")
OUTSIDE = "outside"
ANY = "any"


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One listener of the picture.

    Attributes:
        id: the node's id in the picture (generated: never a name).
        name: the listener's name.
        payloads: the routing keys ``{namespace}local`` it accepts, in its order.
        cpu_bound: its handler runs in the worker processes.
        peers: the ids of the nodes it may forward to; None: any listener.
    """

    id: str
    name: str
    payloads: tuple[str, ...]
    cpu_bound: bool
    peers: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class RoutingGraph:
    """Who may send to whom in an organism (see the module docstring)."""

    name: str
    listeners: tuple[GraphNode, ...]

    @property
    def unrestricted(self) -> bool:
        """Whether some listener may forward to any (the "any listener" node is drawn)."""
        return any(node.peers is None for node in self.listeners)


def routing_graph(organism: Organism) -> RoutingGraph:
    """The routing graph of ``organism``."""
    ids = {lst.name: f"n{i}" for i, lst in enumerate(organism.listeners)}
    nodes = []
    for lst in organism.listeners:
        peers = None
        if lst.peers is not None:
            # In declaration order of the listeners, so that the picture is stable.
            peers = tuple(ids[p.name] for p in organism.listeners if p.name in lst.peers)
        payloads = tuple(codec_for(cls).qname for cls in lst.payloads)
        nodes.append(GraphNode(ids[lst.name], lst.name, payloads, lst.cpu_bound, peers))
    return RoutingGraph(organism.name, tuple(nodes))


# -- Mermaid -------------------------------------------------------------------------

# Kept as they are inside a quoted Mermaid label; everything else becomes an entity
# code (``#60;``), which Mermaid shows as the character and never reads as syntax,
# markdown or HTML.
_MERMAID_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:/-_")


def mermaid_text(text: str) -> str:
    """``text`` escaped for a quoted Mermaid label (``"…"``)."""
    return "".join(ch if ch in _MERMAID_SAFE else f"#{ord(ch)};" for ch in text)


def _mermaid_lines(lines: list[str]) -> str:
    return "<br>".join(mermaid_text(line) for line in lines)


def mermaid(graph: RoutingGraph) -> str:
    """The graph as a Mermaid flowchart (without the markdown fence)."""
    out = ["flowchart LR", f'  {OUTSIDE}(["outside"])']
    for node in graph.listeners:
        if node.cpu_bound:
            out.append(f'  {node.id}[["{_mermaid_lines([node.name, "cpu_bound"])}"]]')
        else:
            out.append(f'  {node.id}["{mermaid_text(node.name)}"]')
    if graph.unrestricted:
        out.append(f'  {ANY}{{{{"any listener accepting what it sends"}}}}')
    for node in graph.listeners:
        out.append(f'  {OUTSIDE} -->|"{_mermaid_lines(list(node.payloads))}"| {node.id}')
    for node in graph.listeners:
        if node.peers is None:
            out.append(f'  {node.id} -.->|"may forward to any"| {ANY}')
        else:
            out.extend(f"  {node.id} --> {peer}" for peer in node.peers)
    return "\n".join(out) + "\n"


# -- Graphviz ------------------------------------------------------------------------


def dot_text(text: str) -> str:
    """``text`` escaped for a double-quoted DOT string used as a label.

    A backslash starts an escape in a label (``\\N``, ``\\l``) and a quote ends the
    string: both are escaped; characters that are not printable are shown as their
    code (``\\x1b``) instead of being passed to the renderer.
    """
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\\\u{ord(ch):04x}")
    return "".join(out)


def _dot_lines(lines: list[str]) -> str:
    return "\\n".join(dot_text(line) for line in lines)


def dot(graph: RoutingGraph) -> str:
    """The graph in Graphviz's DOT language."""
    out = [
        "digraph organism {",
        f'  label="{dot_text(graph.name)}"; labelloc=t; rankdir=LR;',
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        f'  {OUTSIDE} [label="outside", shape=ellipse, style=solid];',
    ]
    for node in graph.listeners:
        if node.cpu_bound:
            label = _dot_lines([node.name, "cpu_bound"])
            out.append(f'  {node.id} [label="{label}", shape=box3d, style=solid];')
        else:
            out.append(f'  {node.id} [label="{dot_text(node.name)}"];')
    if graph.unrestricted:
        out.append(
            f'  {ANY} [label="any listener accepting what it sends", shape=hexagon, style=dashed];'
        )
    for node in graph.listeners:
        out.append(f'  {OUTSIDE} -> {node.id} [label="{_dot_lines(list(node.payloads))}"];')
    for node in graph.listeners:
        if node.peers is None:
            out.append(f'  {node.id} -> {ANY} [label="may forward to any", style=dashed];')
        else:
            out.extend(f"  {node.id} -> {peer};" for peer in node.peers)
    out.append("}")
    return "\n".join(out) + "\n"


class GraphvizMissing(RuntimeError):
    """Graphviz's ``dot`` program is not installed."""


def svg(graph: RoutingGraph, *, timeout_s: float = 60.0) -> bytes:
    """The graph drawn as SVG by Graphviz's ``dot`` program.

    Raises:
        GraphvizMissing: ``dot`` is not on the PATH.
        RuntimeError: ``dot`` failed (its message).
    """
    program = shutil.which("dot")
    if program is None:
        raise GraphvizMissing(
            "--format svg needs Graphviz's dot program, which is not installed "
            "(apt-get install graphviz, brew install graphviz, or see graphviz.org); "
            "--format dot prints the graph for it, --format mermaid needs nothing"
        )
    done = subprocess.run(
        [program, "-Tsvg"],
        input=dot(graph).encode("utf-8"),
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"dot failed (exit status {done.returncode}): {message}")
    return done.stdout


# -- pictures in the docs -----------------------------------------------------------

_PICTURE = re.compile(
    r"(<!-- generated: graph (?P<path>[^ ]+) -->\n)(.*?)(<!-- end generated -->)", re.S
)


def pictures_markdown(doc: str, root: Path) -> str:
    """``doc`` with each ``<!-- generated: graph organisms/NAME.yaml -->`` …
    ``<!-- end generated -->`` block holding the Mermaid picture of that organism
    (its path relative to ``root``); ``scripts/gen_reference`` rewrites the docs with it.
    """

    def fill(match: re.Match[str]) -> str:
        organism = load_organism(root / match["path"])
        picture = mermaid(routing_graph(organism))
        return f"{match[1]}\n```mermaid\n{picture}```\n\n{match[4]}"

    return _PICTURE.sub(fill, doc)


# -- the command ---------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add the ``graph`` subcommand to the subparsers ``sub`` of the command line."""
    graph = sub.add_parser(
        "graph",
        help="print the routing graph: listeners, what each accepts, peers, cpu_bound",
        description="Print who may send to whom in the organism, as a Mermaid flowchart "
        "(default), Graphviz DOT, or SVG drawn by Graphviz's dot program.",
    )
    graph.add_argument("organism", type=Path, help="the organism YAML file")
    graph.add_argument(
        "--format",
        choices=FORMATS,
        default="mermaid",
        help="mermaid (renders in GitHub and most docs sites), dot (Graphviz), or svg "
        "(drawn by Graphviz's dot program, which must be installed)",
    )


def main(organism: Organism, args: argparse.Namespace) -> int:
    """Print the graph of ``organism`` in ``args.format``. Returns the exit status."""
    graph = routing_graph(organism)
    if args.format == "svg":
        try:
            drawn = svg(graph)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _error(str(exc))
            return EXIT_FAILURE
        sys.stdout.buffer.write(drawn)
        sys.stdout.buffer.flush()
        return EXIT_OK
    sys.stdout.write(mermaid(graph) if args.format == "mermaid" else dot(graph))
    sys.stdout.flush()
    return EXIT_OK
