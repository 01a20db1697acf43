"""XSD generation for payload classes (``python -m xml_pipeline schema``).

Each payload class gets one ``xs:schema`` document whose target namespace is the
class's namespace. Flat :class:`~xml_pipeline.Payload` classes map one element per
field, in field order. pydantic-xml models map their attributes, text and child
elements (nested models inline); a shape this generator does not know (wrapped
paths, elements in another namespace, unions of models) becomes a lax
``xs:any`` so the schema stays valid, never wrong.
"""

from __future__ import annotations

import decimal
import enum
import types
import typing
from typing import Any

from lxml import etree
from pydantic import BaseModel

from .payload import codec_for

__all__ = ["envelope_xsd", "xsd_for"]

XS = "http://www.w3.org/2001/XMLSchema"
_X = "{" + XS + "}"


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """(inner type, optional, repeated)."""
    optional = repeated = False
    tp = annotation
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args: Any = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(tp)
        repeated = True
        tp = args[0] if args else str
    return tp, optional, repeated


def _simple_type(parent: etree._Element, tp: Any) -> str | None:
    """The xs type name of a scalar, or None after adding an inline restriction."""
    if typing.get_origin(tp) is typing.Literal:
        values = [str(v) for v in typing.get_args(tp)]
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [str(m.value) for m in tp]
    else:
        if isinstance(tp, type):
            if issubclass(tp, bool):
                return "xs:boolean"
            if issubclass(tp, int):
                return "xs:integer"
            if issubclass(tp, float):
                return "xs:double"
            if issubclass(tp, decimal.Decimal):
                return "xs:decimal"
        return "xs:string"
    simple = etree.SubElement(parent, _X + "simpleType")
    restriction = etree.SubElement(simple, _X + "restriction", base="xs:string")
    for value in values:
        etree.SubElement(restriction, _X + "enumeration", value=value)
    return None


def _element(parent: etree._Element, name: str, tp: Any, optional: bool, repeated: bool) -> None:
    el = etree.SubElement(parent, _X + "element", name=name)
    if optional or repeated:
        el.set("minOccurs", "0")
    if repeated:
        el.set("maxOccurs", "unbounded")
    type_name = _simple_type(el, tp)
    if type_name is not None:
        el.set("type", type_name)


def _lax_any(parent: etree._Element) -> None:
    etree.SubElement(
        parent, _X + "any", namespace="##any", processContents="lax", minOccurs="0",
        maxOccurs="unbounded",
    )  # fmt: skip


def _plain_type(cls: type[BaseModel], parent: etree._Element) -> None:
    complex_type = etree.SubElement(parent, _X + "complexType")
    sequence = etree.SubElement(complex_type, _X + "sequence")
    for name, info in cls.model_fields.items():
        tp, optional, repeated = _unwrap(info.annotation)
        _element(sequence, info.alias or name, tp, optional or not info.is_required(), repeated)


def _xml_model_type(
    cls: type[BaseModel], parent: etree._Element, default_ns: str, target: str
) -> None:
    from pydantic_xml import BaseXmlModel
    from pydantic_xml.model import XmlEntityInfo  # type: ignore[attr-defined]
    from pydantic_xml.typedefs import EntityLocation

    nsmap = {
        **({"": default_ns} if default_ns else {}),
        **(getattr(cls, "__xml_nsmap__", None) or {}),
    }
    scope_default = nsmap.get("", "")
    complex_type = etree.SubElement(parent, _X + "complexType")
    sequence = etree.SubElement(complex_type, _X + "sequence")
    attributes: list[tuple[str, Any, bool]] = []
    has_text = False
    text_type: Any = str
    for name, info in cls.model_fields.items():
        entity = next((m for m in info.metadata if isinstance(m, XmlEntityInfo)), None)
        tp, optional, repeated = _unwrap(info.annotation)
        optional = optional or not info.is_required()
        is_model = isinstance(tp, type) and issubclass(tp, BaseXmlModel)
        location = entity.location if entity is not None else None
        if location is None and not is_model:
            has_text, text_type = True, tp
            continue
        path = entity.path if entity is not None else None
        if location == EntityLocation.ATTRIBUTE:
            if entity is not None and entity.ns:
                _lax_any(sequence)  # namespaced attributes are not described
                continue
            attributes.append((path or name, tp, optional))
            continue
        if (
            location not in (None, EntityLocation.ELEMENT)
            or (path and "/" in path)
            or (entity is not None and entity.wrapped is not None)
        ):
            _lax_any(sequence)
            continue
        prefix = entity.ns if entity is not None else None
        if is_model:
            child_prefix = getattr(tp, "__xml_ns__", None)
            child_nsmap = {**nsmap, **(getattr(tp, "__xml_nsmap__", None) or {})}
            namespace = (
                child_nsmap.get(child_prefix or "", "")
                if child_prefix is not None
                else (child_nsmap.get("", ""))
            )
        else:
            namespace = scope_default if not prefix else nsmap.get(prefix, "")
        if namespace != target:
            _lax_any(sequence)
            continue
        if is_model:
            tag = path or getattr(tp, "__xml_tag__", None) or tp.__name__
            el = etree.SubElement(sequence, _X + "element", name=tag)
            if optional or repeated:
                el.set("minOccurs", "0")
            if repeated:
                el.set("maxOccurs", "unbounded")
            _xml_model_type(tp, el, scope_default, target)
        else:
            _element(sequence, path or name, tp, optional, repeated)
    if has_text:
        if len(sequence):
            complex_type.set("mixed", "true")
        elif not attributes:
            # Text only: a simple type on the element itself.
            parent.remove(complex_type)
            type_name = _simple_type(parent, text_type)
            if type_name is not None:
                parent.set("type", type_name)
            return
        else:
            complex_type.remove(sequence)
            content = etree.SubElement(complex_type, _X + "simpleContent")
            ext = etree.SubElement(content, _X + "extension", base="xs:string")
            for attr_name, tp, optional in attributes:
                _attribute(ext, attr_name, tp, optional)
            return
    for attr_name, tp, optional in attributes:
        _attribute(complex_type, attr_name, tp, optional)


def _attribute(parent: etree._Element, name: str, tp: Any, optional: bool) -> None:
    attribute = etree.SubElement(parent, _X + "attribute", name=name)
    attribute.set("use", "optional" if optional else "required")
    type_name = _simple_type(attribute, tp)
    if type_name is not None:
        attribute.set("type", type_name)


def xsd_for(cls: type[BaseModel]) -> bytes:
    """The XSD document describing the XML form of one payload class.

    Raises:
        ConfigError: ``cls`` is not a usable payload class.
    """
    codec = codec_for(cls)
    nsmap = {"xs": XS}
    root = etree.Element(_X + "schema", nsmap=nsmap)
    if codec.namespace:
        root.set("targetNamespace", codec.namespace)
    root.set("elementFormDefault", "qualified")
    element = etree.SubElement(root, _X + "element", name=codec.tag)
    from pydantic_xml import BaseXmlModel

    if issubclass(cls, BaseXmlModel):
        _xml_model_type(cls, element, codec.namespace, codec.namespace)
    else:
        _plain_type(cls, element)
    comment = etree.Comment(f" payload class {cls.__module__}:{cls.__qualname__} ")
    root.insert(0, comment)
    return etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8")


_ENVELOPE_XSD = """\
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"
           xmlns:env="https://xml-pipeline.org/ns/envelope/v1"
           targetNamespace="https://xml-pipeline.org/ns/envelope/v1"
           elementFormDefault="qualified">
  <xs:annotation><xs:documentation>
    The xml_pipeline envelope: a meta block and exactly one payload element from another
    namespace. from: the sender (required). to: one listener (absent: every listener
    accepting the payload). thread: the conversation (absent or unknown at ingress: a new
    one; an unknown token of 1-128 characters names the new conversation). id: the
    message id (the pump assigns one when absent; a sender's retry with the same id is
    ignored). re: on replies, the id of the external message answered. traceparent: a W3C
    trace context (version 00), continued by the pump's spans and written on replies
    when the pump traces; the pump ignores one that does not match this pattern.
  </xs:documentation></xs:annotation>
  <xs:simpleType name="text">
    <xs:restriction base="xs:string"><xs:maxLength value="1024"/></xs:restriction>
  </xs:simpleType>
  <xs:simpleType name="traceparent">
    <xs:restriction base="xs:string">
      <xs:pattern value="[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:element name="message">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="meta">
          <xs:complexType>
            <xs:all>
              <xs:element name="from">
                <xs:simpleType>
                  <xs:restriction base="env:text"><xs:minLength value="1"/></xs:restriction>
                </xs:simpleType>
              </xs:element>
              <xs:element name="to" type="env:text" minOccurs="0"/>
              <xs:element name="thread" type="env:text" minOccurs="0"/>
              <xs:element name="id" type="env:text" minOccurs="0"/>
              <xs:element name="re" type="env:text" minOccurs="0"/>
              <xs:element name="traceparent" type="env:traceparent" minOccurs="0"/>
            </xs:all>
          </xs:complexType>
        </xs:element>
        <xs:any namespace="##any" processContents="lax"/>
      </xs:sequence>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""


def envelope_xsd() -> bytes:
    """The XSD of the envelope (``<message>``), the payload left open (``xs:any``)."""
    return _ENVELOPE_XSD.encode("utf-8")
