"""Payloads and handlers of benchmarks/offload.py (a module, so workers can import them)."""

from __future__ import annotations

import hashlib

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/offload"


class Job(Payload):
    xml_ns = NS
    seq: int
    rounds: int = 0


class Done(Payload):
    xml_ns = NS
    seq: int
    digest: str = ""


def work(rounds: int, seed: int) -> str:
    """Iterated SHA-256 of a small buffer: pure CPU, holding the GIL."""
    digest = seed.to_bytes(8, "little") * 4
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


def trivial(payload: Job, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Done(seq=payload.seq))


async def trivial_async(payload: Job, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Done(seq=payload.seq))


def heavy(payload: Job, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Done(seq=payload.seq, digest=work(payload.rounds, payload.seq)))


async def heavy_async(payload: Job, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Done(seq=payload.seq, digest=work(payload.rounds, payload.seq)))
