"""Payload classes and handlers the tests share (importable, so picklable)."""

from __future__ import annotations

import asyncio
import time

from pydantic_xml import BaseXmlModel, element

from xml_pipeline import HandlerMetadata, HandlerResponse, Huh, Payload

NS = "https://example.org/test"


class Ping(Payload):
    xml_ns = NS
    n: int
    text: str = ""


class Pong(Payload):
    xml_ns = NS
    n: int
    text: str = ""
    by: str = ""


class Note(BaseXmlModel, tag="Note", ns="", nsmap={"": NS}):
    body: str = element(ns="")


def ping_xml(n: int, text: str = "") -> bytes:
    from lxml import etree

    el = etree.Element(f"{{{NS}}}Ping", nsmap={None: NS})  # type: ignore[dict-item]
    etree.SubElement(el, f"{{{NS}}}n").text = str(n)
    etree.SubElement(el, f"{{{NS}}}text").text = text
    return etree.tostring(el)


async def pong(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(n=payload.n, text=payload.text, by=meta.own_name))


def pong_sync(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(n=payload.n, text=payload.text, by=meta.own_name))


async def boom(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    if payload.text == "boom":
        raise RuntimeError("kaboom")
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


async def slow(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    if payload.text == "slow":
        await asyncio.sleep(30)
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


def slow_sync(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    time.sleep(0.3)
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


async def bad_return(payload: Ping, meta: HandlerMetadata) -> object:
    return "not a response"


class HuhCollector:
    """A handler that records every Huh it gets."""

    def __init__(self) -> None:
        self.huhs: list[tuple[Huh, HandlerMetadata]] = []

    async def __call__(self, payload: object, meta: HandlerMetadata) -> None:
        if isinstance(payload, Huh):
            self.huhs.append((payload, meta))
