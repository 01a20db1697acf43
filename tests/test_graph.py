"""``python -m xml_pipeline graph``: the routing graph as Mermaid, DOT and SVG, drawn by the
real Graphviz ``dot`` program; hostile names stay labels; the docs' pictures are true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from xml_pipeline import Listener, Organism, Payload, load_organism
from xml_pipeline.cli.graph import dot, mermaid, pictures_markdown, routing_graph

ROOT = Path(__file__).resolve().parent.parent
ORGANISMS = sorted((ROOT / "organisms").glob("*.yaml"))
SVG = "{http://www.w3.org/2000/svg}"

# Names that try to end a label, start a comment, a new statement or node, an HTML or
# Markdown label, a Graphviz escape, or a terminal escape sequence.
HOSTILE = [
    'a"] --> b["x',
    "c\\Nd\\",
    "e;}{ -> f [label=<b>x</b>] //",
    "#quot; #35; <br> **bold** `tick`",
    "end",
    "g.h-i:j/k é ☃",
    "l|m|n --> o",
]


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xml_pipeline", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
                          check=False)  # fmt: skip


def dot_program() -> str:
    """Graphviz's ``dot`` (.ci/run and scripts/test install it). Raises if missing."""
    program = shutil.which("dot")
    if program is None:
        raise RuntimeError("Graphviz's dot is not installed (apt-get install graphviz)")
    return program


def render(source: str) -> ET.Element:
    """``source`` (DOT) drawn as SVG by the real ``dot``; its root element."""
    done = subprocess.run([dot_program(), "-Tsvg"], input=source.encode(), capture_output=True,
                          timeout=60, check=False)  # fmt: skip
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(f"dot failed ({done.returncode}): {done.stderr.decode()}")
    return ET.fromstring(done.stdout)


def shapes(svg: ET.Element, kind: str) -> list[ET.Element]:
    return [g for g in svg.iter(f"{SVG}g") if g.get("class") == kind]


def texts(group: ET.Element) -> list[str]:
    return [t.text or "" for t in group.iter(f"{SVG}text")]


async def _noop(payload: object, meta: object) -> None:
    return None


def hostile_organism() -> Organism:
    class Odd(Payload):
        xml_ns = 'urn:x:{"}<br>;#35;|'
        v: int = 0

    class Plain(Payload):
        v: int = 0

    listeners = [
        Listener(name, (Odd,) if i % 2 else (Plain, Odd), _noop, cpu_bound=i == 1,
                 peers=None if i % 3 == 0 else frozenset({HOSTILE[0], HOSTILE[-1]}))
        for i, name in enumerate(HOSTILE)
    ]  # fmt: skip
    return Organism(name='org "} x', listeners=tuple(listeners))


# -- every example organism, drawn by Graphviz -----------------------------------------


@pytest.mark.parametrize("path", ORGANISMS, ids=[p.stem for p in ORGANISMS])
def test_every_example_organism_is_drawn_by_graphviz(path: Path) -> None:
    organism = load_organism(path)
    svg = render(dot(routing_graph(organism)))
    nodes = shapes(svg, "node")
    names = [texts(node)[0] for node in nodes]
    assert names[0] == "outside"
    assert names[1 : 1 + len(organism.listeners)] == [lst.name for lst in organism.listeners]
    unrestricted = any(lst.peers is None for lst in organism.listeners)
    assert len(nodes) == 1 + len(organism.listeners) + unrestricted
    peer_edges = sum(len(lst.peers or ()) for lst in organism.listeners)
    edges = (
        len(organism.listeners) + peer_edges + sum(lst.peers is None for lst in organism.listeners)
    )
    assert len(shapes(svg, "edge")) == edges


def test_the_svg_format_runs_dot() -> None:
    done = cli("graph", ROOT / "organisms" / "wordcount.yaml", "--format", "svg")
    assert done.returncode == 0, done.stderr
    svg = ET.fromstring(done.stdout.encode())
    labels = [texts(n) for n in shapes(svg, "node")]
    assert ["counter", "cpu_bound"] in labels and ["splitter"] in labels


def test_without_graphviz_svg_says_so_and_the_other_formats_work(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no dot there
    done = cli("graph", ROOT / "organisms" / "hello.yaml", "--format", "svg", env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert "dot program, which is not installed" in done.stderr
    assert "apt-get install graphviz" in done.stderr
    for fmt, first in (("mermaid", "flowchart LR"), ("dot", "digraph organism {")):
        done = cli("graph", ROOT / "organisms" / "hello.yaml", "--format", fmt, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == first


def test_mermaid_is_the_default() -> None:
    done = cli("graph", ROOT / "organisms" / "hello.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout == mermaid(routing_graph(load_organism(ROOT / "organisms/hello.yaml")))
    assert '  n0["greeter"]' in done.stdout and "  n0 --> n1" in done.stdout
    assert '  n1 -.->|"may forward to any"| any' in done.stdout  # shouter: no peers


def test_what_the_picture_says() -> None:
    graph = routing_graph(load_organism(ROOT / "organisms" / "relay.yaml"))
    lines = mermaid(graph).splitlines()
    # relay.1 -> relay.2 -> relay.3, which may forward to nobody: no "any" node at all.
    assert [line for line in lines if "-->" in line and "outside" not in line] == [
        "  n0 --> n1",
        "  n1 --> n2",
    ]
    assert not any("any" in line for line in lines)
    ingress = [line for line in lines if line.startswith("  outside -->")]
    assert ingress[2] == '  outside -->|"#123;https://example.org/relay#125;Hop"| n2'


# -- hostile names ---------------------------------------------------------------------


def test_hostile_names_stay_labels_in_dot() -> None:
    organism = hostile_organism()
    svg = render(dot(routing_graph(organism)))
    nodes = shapes(svg, "node")
    assert len(nodes) == 1 + len(HOSTILE) + 1  # outside, the listeners, "any"
    names = [texts(n)[0] for n in nodes[1:-1]]
    assert names == HOSTILE
    assert texts(nodes[2]) == [HOSTILE[1], "cpu_bound"]
    edges = shapes(svg, "edge")
    ingress = [texts(e) for e in edges[: len(HOSTILE)]]
    assert ingress[0] == ["Plain", '{urn:x:{"}<br>;#35;|}Odd']
    peers = sum(0 if i % 3 == 0 else 2 for i in range(len(HOSTILE)))
    assert len(edges) == len(HOSTILE) + peers + sum(i % 3 == 0 for i in range(len(HOSTILE)))
    assert svg.find(f"{SVG}g/{SVG}text") is not None  # the graph's label: the organism name
    assert 'org "} x' in [t.text for t in svg.iter(f"{SVG}text")]


def test_unprintable_text_is_shown_as_its_code_in_dot() -> None:
    class P(Payload):
        xml_ns = "urn:a\x1b[31m\u202eb"
        v: int = 0

    organism = Organism(name="o", listeners=(Listener("x", (P,), _noop),))
    svg = render(dot(routing_graph(organism)))
    edge = texts(shapes(svg, "edge")[0])
    assert edge == ["{urn:a\\x1b[31m\\u202eb}P"]


_NODE = re.compile(
    r'  (n\d+|outside|any)(\["|\[\["|\(\["|\{\{")((?:[^"#]|#\d+;)*)("\]|"\]\]|"\]\)|"\}\})'
)
_EDGE = re.compile(r'  (n\d+|outside) (-->|-\.->)(?:\|"((?:[^"#|]|#\d+;)*)"\|)? (n\d+|any)')


def _unmermaid(label: str) -> list[str]:
    return [re.sub(r"#(\d+);", lambda m: chr(int(m[1])), part) for part in label.split("<br>")]


def test_hostile_names_stay_labels_in_mermaid() -> None:
    organism = hostile_organism()
    lines = mermaid(routing_graph(organism)).splitlines()
    assert lines[0] == "flowchart LR"
    labels: dict[str, list[str]] = {}
    edges = []
    for line in lines[1:]:
        node, edge = _NODE.fullmatch(line), _EDGE.fullmatch(line)
        assert node or edge, f"not a plain node or edge: {line!r}"
        if node:
            assert re.fullmatch(r"[A-Za-z0-9 .,:/_#;<>-]*", node[3]), node[3]
            labels[node[1]] = _unmermaid(node[3])
        else:
            assert edge is not None
            edges.append((edge[1], edge[4], _unmermaid(edge[3]) if edge[3] else []))
    assert [labels[f"n{i}"][0] for i in range(len(HOSTILE))] == HOSTILE
    assert labels["n1"] == [HOSTILE[1], "cpu_bound"]
    assert edges[0] == ("outside", "n0", ["Plain", '{urn:x:{"}<br>;#35;|}Odd'])
    assert ("n1", "n0", []) in edges and ("n1", "n6", []) in edges
    assert ("n0", "any", ["may forward to any"]) in edges


# -- the pictures in the docs ----------------------------------------------------------


def test_the_docs_pictures_are_the_organisms() -> None:
    doc = ROOT / "docs" / "examples.md"
    text = doc.read_text(encoding="utf-8")
    assert pictures_markdown(text, ROOT) == text, (
        "docs/examples.md and the organisms disagree: run scripts/gen_reference"
    )
    pictured = set(re.findall(r"<!-- generated: graph (\S+) -->", text))
    for path in ORGANISMS:
        name = f"organisms/{path.name}"
        assert name in pictured or name in text, f"{name} is not in docs/examples.md"
