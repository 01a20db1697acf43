"""Handlers and payloads of organisms/relay.yaml: a chain of hops for benchmarks.

A ``Hop`` goes down the chain relay.1 → relay.2 → … → relay.<last>; the last one
answers with ``Done``, which each listener passes back up to its caller until it
leaves the organism.
"""

from __future__ import annotations

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/relay"


class Hop(Payload):
    """Travel down the chain; ``last`` is the number of the last listener."""

    xml_ns = NS
    seq: int
    last: int = 3


class Done(Payload):
    """The answer travelling back up."""

    xml_ns = NS
    seq: int
    hops: int


async def hop(payload: Hop | Done, meta: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, Done):
        return HandlerResponse.respond(Done(seq=payload.seq, hops=payload.hops + 1))
    number = int(meta.own_name.rpartition(".")[2])
    if number < payload.last:
        return HandlerResponse(payload, to=f"relay.{number + 1}")
    return HandlerResponse.respond(Done(seq=payload.seq, hops=1))
