"""Handlers and payloads of organisms/wordcount.yaml.

``split`` runs in the pump; ``count`` is ``cpu_bound``: it runs in a worker process,
so it must be importable by module path (it is: ``wordcount:count``) and it gets and
returns payloads like any handler.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload, payload_from_xml

NS = "https://example.org/wordcount"
HERE = Path(__file__).resolve().parent
WORD = re.compile(r"[a-z']+")


class Count(Payload):
    """Count the words of ``file`` (a text next to this module) in ``chunks`` pieces."""

    xml_ns = NS
    file: str
    chunks: int = 8
    rounds: int = 20000


class Chunk(Payload):
    """One piece of the text, for a worker."""

    xml_ns = NS
    index: int
    total: int
    rounds: int
    text: str


class Counted(Payload):
    """A worker's answer: word counts ``word:n`` separated by spaces, and a fingerprint."""

    xml_ns = NS
    index: int
    total: int
    words: int
    counts: str
    digest: str


class Summary(Payload):
    """The answer: totals over every chunk."""

    xml_ns = NS
    file: str
    chunks: int
    words: int
    distinct: int
    top: str
    digest: str


def _lines(name: str) -> list[str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+\.txt", name) or name.startswith("."):
        raise ValueError(f"file must be a .txt name next to the organism, not {name!r}")
    return (HERE / name).read_text(encoding="utf-8").splitlines()


async def split(payload: Count | Counted, meta: HandlerMetadata) -> list[HandlerResponse] | None:
    if isinstance(payload, Count):
        lines = _lines(payload.file)
        total = max(1, min(payload.chunks, 64, len(lines)))
        size = -(-len(lines) // total)
        return [
            HandlerResponse(
                Chunk(
                    index=i,
                    total=total,
                    rounds=min(payload.rounds, 1_000_000),
                    text="\n".join(lines[i * size : (i + 1) * size]),
                ),
                to="counter",
            )
            for i in range(total)
        ]
    # A chunk came back. The frame's history says how many are in so far.
    slots = [s for s in await meta.history() if s.direction == "in" and s.sender == "counter"]
    if len(slots) < payload.total:
        return None
    parts = sorted((payload_from_xml(Counted, s.xml) for s in slots), key=lambda c: c.index)
    counts: Counter[str] = Counter()
    for part in parts:
        for item in part.counts.split():
            word, _, n = item.rpartition(":")
            counts[word] += int(n)
    first = next(s for s in await meta.history() if s.direction == "in")
    request = payload_from_xml(Count, first.xml)
    digest = hashlib.sha256("".join(p.digest for p in parts).encode()).hexdigest()
    return [
        HandlerResponse.respond(
            Summary(
                file=request.file,
                chunks=len(parts),
                words=sum(p.words for p in parts),
                distinct=len(counts),
                top=" ".join(f"{w}:{n}" for w, n in counts.most_common(5)),
                digest=digest[:16],
            )
        )
    ]


def count(payload: Chunk, meta: HandlerMetadata) -> HandlerResponse:
    """CPU-bound: count the chunk's words and fingerprint it with iterated SHA-256."""
    words = WORD.findall(payload.text.lower())
    digest = payload.text.encode()
    for _ in range(payload.rounds):
        digest = hashlib.sha256(digest).digest()
    counts = Counter(words)
    return HandlerResponse.respond(
        Counted(
            index=payload.index,
            total=payload.total,
            words=len(words),
            counts=" ".join(f"{w}:{n}" for w, n in sorted(counts.items())),
            digest=digest.hex(),
        )
    )
