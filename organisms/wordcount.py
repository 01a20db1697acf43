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
    """Count the words of chunk ``chunk`` of ``chunks`` of ``file`` (a text next to here)."""

    xml_ns = NS
    file: str
    chunk: int = 0
    chunks: int = 1
    rounds: int = 100000


class Chunk(Payload):
    """One piece of the text, for a worker."""

    xml_ns = NS
    rounds: int
    text: str


class Counted(Payload):
    """A worker's answer: the number of words, the most common, and a fingerprint."""

    xml_ns = NS
    words: int
    top: str
    digest: str


class Summary(Payload):
    """The answer to a Count."""

    xml_ns = NS
    file: str
    chunk: int
    chunks: int
    words: int
    top: str
    digest: str


def _lines(name: str) -> list[str]:
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.txt", name):
        raise ValueError(f"file must be a .txt name next to the organism, not {name!r}")
    return (HERE / name).read_text(encoding="utf-8").splitlines()


async def split(payload: Count | Counted, meta: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, Count):
        if not 0 <= payload.chunk < payload.chunks <= 1000:
            raise ValueError(f"chunk {payload.chunk} of {payload.chunks} is out of range")
        lines = _lines(payload.file)
        size = -(-len(lines) // payload.chunks)
        text = "\n".join(lines[payload.chunk * size : (payload.chunk + 1) * size])
        return HandlerResponse(
            Chunk(rounds=min(payload.rounds, 10_000_000), text=text), to="counter"
        )
    # The counter answered. What was asked is the first message of this frame.
    first = next(s for s in await meta.history() if s.direction == "in")
    request = payload_from_xml(Count, first.xml)
    return HandlerResponse.respond(
        Summary(
            file=request.file,
            chunk=request.chunk,
            chunks=request.chunks,
            words=payload.words,
            top=payload.top,
            digest=payload.digest[:16],
        )
    )


def count(payload: Chunk, meta: HandlerMetadata) -> HandlerResponse:
    """CPU-bound: count the chunk's words and fingerprint it with iterated SHA-256."""
    words = WORD.findall(payload.text.lower())
    digest = payload.text.encode()
    for _ in range(payload.rounds):
        digest = hashlib.sha256(digest).digest()
    top = Counter(words).most_common(5)
    return HandlerResponse.respond(
        Counted(
            words=len(words),
            top=" ".join(f"{word}:{n}" for word, n in top),
            digest=digest.hex(),
        )
    )
