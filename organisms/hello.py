"""Handlers and payloads of organisms/hello.yaml.

greeter gets a Greeting, forwards a Shout to shouter; shouter answers greeter
with a Shouted; greeter answers the external caller with a Reply.
"""

from __future__ import annotations

from pydantic_xml import BaseXmlModel, element

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/hello"


class Greeting(BaseXmlModel, tag="Greeting", ns="", nsmap={"": NS}):
    """Ask to be greeted (a pydantic-xml model)."""

    name: str = element(ns="")


class Shout(Payload):
    """Ask shouter to shout some text (a flat payload)."""

    xml_ns = NS
    text: str


class Shouted(Payload):
    """shouter's answer."""

    xml_ns = NS
    text: str


class Reply(Payload):
    """The greeting that goes back to the caller."""

    xml_ns = NS
    text: str


async def handle_greeting(
    payload: Greeting | Shouted, meta: HandlerMetadata
) -> HandlerResponse | None:
    if isinstance(payload, Greeting):
        return HandlerResponse(Shout(text=f"Hello, {payload.name}!"), to="shouter")
    return HandlerResponse.respond(Reply(text=payload.text))


def shout(payload: Shout, meta: HandlerMetadata) -> HandlerResponse:
    # A sync handler: the pump runs it in a worker thread.
    return HandlerResponse.respond(Shouted(text=payload.text.upper()))
