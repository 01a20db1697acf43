"""Handlers and payloads of organisms/shared.yaml: pumps that share one history store.

``scribe`` takes a ``Note``, reads its frame's history from the backend (the
shared manager store) and answers with ``Noted``, naming the process that handled
it, so the histories in the store show which pump wrote them.
"""

from __future__ import annotations

import os

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/shared"


class Note(Payload):
    """Something to write down."""

    xml_ns = NS
    text: str


class Noted(Payload):
    """The answer: the note, the process that handled it, the frame's history length."""

    xml_ns = NS
    text: str
    pid: int
    slots: int


async def scribe(payload: Note, meta: HandlerMetadata) -> HandlerResponse:
    history = await meta.history()  # read from the store, wherever it runs
    return HandlerResponse.respond(Noted(text=payload.text, pid=os.getpid(), slots=len(history)))
