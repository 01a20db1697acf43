"""Payload codecs: flat Payload classes and pydantic-xml models."""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from pydantic import BaseModel
from pydantic_xml import BaseXmlModel, attr, element
from support import NS, Note, Ping

from xml_pipeline import ConfigError, Huh, Payload, PayloadInvalid, codec_for
from xml_pipeline.parser import parse_trusted
from xml_pipeline.schema import xsd_for


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Everything(Payload):
    xml_ns = "urn:all"
    xml_tag = "all"
    s: str
    i: int
    f: float
    b: bool
    d: Decimal
    c: Colour
    lit: Literal["x", "y"]
    opt: int | None = None
    many: list[str] = []


class Item(BaseXmlModel, tag="item", ns="", nsmap={"": "urn:o"}):
    sku: str = attr()
    qty: int = element(ns="")


class Order(BaseXmlModel, tag="Order", ns="", nsmap={"": "urn:o"}):
    id: int = attr()
    items: list[Item] = element(default_factory=list)


def roundtrip(model: BaseModel) -> BaseModel:
    codec = codec_for(type(model))
    from lxml import etree

    return codec.decode(parse_trusted(etree.tostring(codec.encode(model))))


def test_flat_payload_round_trips_every_field_kind() -> None:
    model = Everything(s=" spaced <&> ", i=-3, f=1.5e-7, b=True, d=Decimal("1.10"), c=Colour.BLUE,
                       lit="y", many=["a", "", "c"])  # fmt: skip
    assert roundtrip(model) == model
    assert codec_for(Everything).qname == "{urn:all}all"


def test_pydantic_xml_round_trips() -> None:
    order = Order(id=7, items=[Item(sku="a", qty=1), Item(sku="b", qty=2)])
    assert roundtrip(order) == order
    assert roundtrip(Note(body="hi")) == Note(body="hi")
    assert codec_for(Order).qname == "{urn:o}Order"


def test_huh_is_a_core_payload() -> None:
    huh = Huh(code="timeout", message="slow", listener="x.y", excerpt="<a>")
    assert roundtrip(huh) == huh
    assert codec_for(Huh).qname == "{https://xml-pipeline.org/ns/core/v1}huh"


@pytest.mark.parametrize(
    "doc",
    [
        f'<Ping xmlns="{NS}"><n>x</n></Ping>',
        f'<Ping xmlns="{NS}"><n>1</n><n>2</n></Ping>',
        f'<Ping xmlns="{NS}"><n>1</n><zzz/></Ping>',
        f'<Ping xmlns="{NS}"><n>1<b/></n></Ping>',
        f'<Ping xmlns="{NS}" a="1"><n>1</n></Ping>',
        f'<Ping xmlns="{NS}">text<n>1</n></Ping>',
        f'<Ping xmlns="{NS}"><n xmlns="urn:other">1</n></Ping>',
        f'<Ping xmlns="{NS}"></Ping>',
    ],
)
def test_flat_decoding_is_strict(doc: str) -> None:
    with pytest.raises(PayloadInvalid):
        codec_for(Ping).decode(parse_trusted(doc.encode()))


def test_pydantic_xml_validation_errors_are_typed() -> None:
    with pytest.raises(PayloadInvalid):
        codec_for(Order).decode(parse_trusted(b'<Order xmlns="urn:o" id="x"/>'))


def test_unsupported_flat_shapes_are_config_errors() -> None:
    class Nested(Payload):
        inner: Ping

    with pytest.raises(ConfigError, match=r"use a pydantic_xml\.BaseXmlModel"):
        codec_for(Nested)
    with pytest.raises(ConfigError):
        codec_for(int)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "model",
    [
        Everything(s="a", i=1, f=2.0, b=False, d=Decimal(3), c=Colour.RED, lit="x"),
        Order(id=1, items=[Item(sku="s", qty=3)]),
        Note(body="b"),
        Huh(code="c", message="m"),
    ],
)
def test_schema_validates_encoded_payloads(model: BaseModel) -> None:
    from lxml import etree

    schema = etree.XMLSchema(parse_trusted(xsd_for(type(model))))
    element_ = parse_trusted(etree.tostring(codec_for(type(model)).encode(model)))
    assert schema.validate(element_), schema.error_log


# -- encode_bytes: the fast serializer says exactly what lxml says ------------------------


class _Bytes(Payload):
    xml_ns = "urn:fast&bytes"
    text: str = ""
    number: int | None = None
    items: list[str] = []
    flag: bool = False


@given(
    text=st.text(max_size=40),
    number=st.none() | st.integers(),
    items=st.lists(st.text(max_size=8), max_size=4),
    flag=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_encode_bytes_is_what_lxml_serializes(
    text: str, number: int | None, items: list[str], flag: bool
) -> None:
    model = _Bytes(text=text, number=number, items=items, flag=flag)
    codec = codec_for(_Bytes)
    try:
        expected = etree.tostring(codec.encode(model))
    except ValueError:
        with pytest.raises(ValueError):
            codec.encode_bytes(model)
        return
    assert codec.encode_bytes(model) == expected


def test_encode_bytes_of_pydantic_xml_and_empty_payloads() -> None:
    note = Note(body="a & b")
    assert codec_for(Note).encode_bytes(note) == etree.tostring(codec_for(Note).encode(note))

    class Nothing(Payload):
        xml_ns = NS

    assert codec_for(Nothing).encode_bytes(Nothing()) == f'<Nothing xmlns="{NS}"/>'.encode()


def test_pydantic_xml_default_namespace_without_ns_is_refused() -> None:
    class Loose(BaseXmlModel, tag="Loose", nsmap={"": NS}):
        body: str = element(default="")

    with pytest.raises(ConfigError, match='add ns=""'):
        codec_for(Loose)
