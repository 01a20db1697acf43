"""The fast route for pydantic-xml models gives pydantic-xml's own models and bytes."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree
from pydantic import field_validator
from pydantic_xml import BaseXmlModel, attr, element, wrapped

from xml_pipeline import codec_for
from xml_pipeline._xmlmodel import plan_of
from xml_pipeline.exceptions import PayloadInvalid
from xml_pipeline.parser import parse_bytes

NS = "https://example.org/fast"
OTHER = "https://example.org/other"


class Flat(BaseXmlModel, tag="Flat", ns="", nsmap={"": NS}):
    seq: int = element()
    name: str = element()
    item: list[int] = element()


class Point(BaseXmlModel, tag="point"):
    x: float = attr()
    y: float = attr()
    label: str | None = None  # the text


class Line(BaseXmlModel, tag="line"):
    colour: str = attr(default="black")
    point: list[Point] = element(default=[])


class Drawing(BaseXmlModel, tag="Drawing", ns="d", nsmap={"d": NS, "o": OTHER}):
    title: str = element(ns="d")
    note: str | None = element(ns="o", default=None)
    author: str | None = element(default=None)
    origin: Point | None = element(default=None)
    line: list[Line] = element(default=[])
    tags: list[str] = element(tag="tag", default=[])


class Shouted(BaseXmlModel, tag="Shouted"):
    text_: str  # the text
    loud: bool = attr(default=False)

    @field_validator("text_")
    @classmethod
    def upper(cls, value: str) -> str:
        return value.upper()


class Wrapped(BaseXmlModel, tag="Wrapped"):
    value: int = wrapped("inner", element())


class Ordered(BaseXmlModel, tag="Ordered", search_mode="unordered"):  # type: ignore[call-arg]
    a: int = element()
    b: int = element()


def _slow_bytes(model: BaseXmlModel) -> bytes:
    return etree.tostring(model.to_xml_tree())


def _check(model: BaseXmlModel) -> None:
    """Fast encode and decode agree with pydantic-xml, byte for byte and model for model."""
    codec = codec_for(type(model))
    data = codec.encode_bytes(model)
    assert data == _slow_bytes(model)
    assert etree.tostring(codec.encode(model)) == data
    tree = parse_bytes(data)
    expected = type(model).from_xml_tree(tree)
    got = codec.decode(tree)
    assert type(got) is type(expected)
    assert got == expected
    assert got.model_fields_set == expected.model_fields_set


def test_plans_exist_for_the_common_shapes() -> None:
    for cls in (Flat, Point, Line, Drawing, Shouted):
        assert plan_of(cls) is not None, cls


@pytest.mark.parametrize("cls", [Wrapped, Ordered])
def test_other_shapes_have_no_plan(cls: type[BaseXmlModel]) -> None:
    assert plan_of(cls) is None


@pytest.mark.parametrize(
    "model",
    [
        Flat(seq=1, name="a", item=[1, 2, 3]),
        Flat(seq=2, name="R&D <x> \"q\" 'a' café", item=list(range(200))),
        Point(x=1.5, y=-2),
        Point(x=0, y=0, label="here & there"),
        Line(),
        Line(colour="red", point=[Point(x=1, y=2), Point(x=3, y=4, label="end")]),
        Drawing(title="t"),
        Drawing(
            title="t",
            note="n",
            author="me",
            origin=Point(x=0, y=0),
            line=[Line(point=[Point(x=1, y=1)]), Line(colour="blue")],
            tags=["a", "b <&>", "c"],
        ),
        Shouted(text_="hello"),
        Shouted(text_="hi there", loud=True),
        Wrapped(value=3),
        Ordered(a=1, b=2),
    ],
)
def test_same_bytes_and_models_as_pydantic_xml(model: BaseXmlModel) -> None:
    _check(model)


@pytest.mark.parametrize(
    ("cls", "xml"),
    [
        # children out of field order (pydantic-xml's strict search decides)
        (Flat, f'<Flat xmlns="{NS}"><name>a</name><seq>1</seq><item>1</item></Flat>'),
        # an unknown element, attribute, comment, stray text and tails
        (Flat, f'<Flat xmlns="{NS}"><seq>1</seq><name>a</name><extra/><item>1</item></Flat>'),
        (Flat, f'<Flat xmlns="{NS}" x="1"><seq>1</seq><name>a</name><item>1</item></Flat>'),
        (Flat, f'<Flat xmlns="{NS}"><seq>1</seq><!-- c --><name>a</name><item>1</item></Flat>'),
        (Flat, f'<Flat xmlns="{NS}">text<seq>1</seq><name>a</name><item>1</item></Flat>'),
        (Flat, f'<Flat xmlns="{NS}"><seq>1</seq>tail<name>a</name><item>1</item></Flat>'),
        # whitespace between elements
        (Flat, f'<Flat xmlns="{NS}">\n <seq> 1 </seq>\n <name>a</name>\n <item>1</item>\n</Flat>'),
        # an empty list item ends pydantic-xml's list; an empty optional is left out
        (
            Flat,
            f'<Flat xmlns="{NS}"><seq>1</seq><name>a</name>'
            "<item>1</item><item/><item>2</item></Flat>",
        ),
        (Drawing, f'<d:Drawing xmlns:d="{NS}"><d:title>t</d:title><author/></d:Drawing>'),
        (Drawing, f'<d:Drawing xmlns:d="{NS}"><d:title/></d:Drawing>'),
        # the wrong namespace for a child; a missing required field; invalid values
        (Flat, f'<Flat xmlns="{NS}"><seq xmlns="">1</seq><name>a</name><item>1</item></Flat>'),
        (Flat, f'<Flat xmlns="{NS}"><name>a</name></Flat>'),
        (Flat, f'<Flat xmlns="{NS}"><seq>x</seq><name>a</name><item>1</item><item>y</item></Flat>'),
        (Point, '<point x="1" y="nope"/>'),
        (Point, '<point x="1" y="2" z="3">label</point>'),
        (
            Point,
            '<point x="1" y="2" xsi:nil="true" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/>',
        ),
        (Line, '<line><point x="1" y="2"><sub/></point><point x="3" y="4"/></line>'),
        (Line, '<line colour=""><point x="1" y="2"/></line>'),
        (Shouted, '<Shouted loud="true">quiet</Shouted>'),
        (Shouted, "<Shouted></Shouted>"),
        # hostile text: markup-looking and escaped content stays text
        (Flat, f'<Flat xmlns="{NS}"><seq>1</seq><name>&lt;/Flat&gt;&amp;&#x1F600;</name></Flat>'),
        # the wrong root element
        (Flat, "<Other/>"),
    ],
)
def test_decode_agrees_with_pydantic_xml(cls: type[BaseXmlModel], xml: str) -> None:
    tree = parse_bytes(xml.encode())
    try:
        expected: Any = cls.from_xml_tree(tree)
    except Exception as exc:  # what pydantic-xml raises, the codec raises (or PayloadInvalid)
        expected = exc
    codec = codec_for(cls)
    if isinstance(expected, Exception):
        with pytest.raises((PayloadInvalid, type(expected))):
            codec.decode(tree)
    else:
        got = codec.decode(tree)
        assert got == expected
        assert got.model_fields_set == expected.model_fields_set
        assert codec.encode_bytes(got) == _slow_bytes(expected)


def test_text_xml_cannot_carry_is_refused_as_by_pydantic_xml() -> None:
    model = Flat(seq=1, name="bad \x00 byte", item=[1])
    with pytest.raises(ValueError):
        _slow_bytes(model)
    with pytest.raises(ValueError):
        codec_for(Flat).encode_bytes(model)


def test_canonical_elements_take_the_fast_route() -> None:
    model = Drawing(title="t", origin=Point(x=0, y=0), line=[Line(point=[Point(x=1, y=1)])])
    plan = plan_of(Drawing)
    assert plan is not None
    assert plan.decode(codec_for(Drawing).encode(model)) == model
    assert plan.decode(parse_bytes(f'<d:Drawing xmlns:d="{NS}"/>'.encode())) is None  # invalid
