"""Payload classes and their XML codecs.

A payload class is a pydantic model. Two kinds are supported, each with a codec
built once per class:

* ``pydantic_xml.BaseXmlModel`` subclasses map any XML shape; the codec calls
  ``from_xml_tree`` / ``to_xml_tree``.
* Plain pydantic models (subclasses of :class:`Payload`, or any ``BaseModel``)
  map to one child element per field, in the payload's own namespace. Fields may
  be scalars (``str``, ``int``, ``float``, ``bool``, ``Decimal``, enums, ...),
  optional scalars, or lists of scalars (a repeated element). This codec decodes
  about five times faster than pydantic-xml and is the better choice for flat
  messages.

The routing key of a class is its root element's qualified name, ``{namespace}tag``.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from lxml import etree
from pydantic import BaseModel, ConfigDict, ValidationError

from ._text import NOT_XML, escape
from ._xmlmodel import plan_of
from .exceptions import ConfigError, PayloadInvalid
from .parser import parse_bytes

__all__ = ["CORE_NAMESPACE", "Codec", "Huh", "Payload", "codec_for", "payload_from_xml", "qname_of"]

CORE_NAMESPACE = "https://xml-pipeline.org/ns/core/v1"

_M = TypeVar("_M", bound=BaseModel)


class Payload(BaseModel):
    """Base class for flat payloads: one child element per field.

    Set ``xml_tag`` (default: the class name) and ``xml_ns`` (default: no
    namespace) as class variables::

        class Greeting(Payload):
            xml_ns = "https://example.org/hello"
            name: str
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    xml_tag: ClassVar[str | None] = None
    xml_ns: ClassVar[str] = ""


class Huh(Payload):
    """The built-in error payload. A listener receives it if it declares this class.

    Attributes:
        code: machine-readable reason (``malformed``, ``no-route``, ``timeout``, ...).
        message: a human-readable explanation.
        listener: the listener concerned, if any.
        excerpt: a capped excerpt of the offending input.
    """

    xml_tag = "huh"
    xml_ns = CORE_NAMESPACE

    code: str
    message: str
    listener: str | None = None
    excerpt: str | None = None


class Codec(Protocol):
    """Turns one payload class into lxml elements and back."""

    cls: type[BaseModel]
    qname: str
    namespace: str
    tag: str

    def decode(self, element: etree._Element) -> BaseModel:
        """Validate ``element`` into an instance. Raises PayloadInvalid."""
        ...

    def encode(self, model: BaseModel) -> etree._Element:
        """Build the payload element of ``model``."""
        ...

    def encode_bytes(self, model: BaseModel) -> bytes:
        """``etree.tostring(encode(model))``. Raises ValueError for text XML cannot carry."""
        ...


def qname_of(namespace: str, tag: str) -> str:
    """The routing key ``{namespace}tag`` (just ``tag`` for no namespace)."""
    return f"{{{namespace}}}{tag}" if namespace else tag


def _validation_summary(exc: ValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(payload)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


_SCALARS: tuple[type, ...] = (str, int, float, bool)


def _is_scalar(tp: Any) -> bool:
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return False
        if issubclass(tp, _SCALARS):
            return True
        import decimal
        import enum

        return issubclass(tp, decimal.Decimal | enum.Enum)
    return typing.get_origin(tp) is typing.Literal


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    is_list: bool


def _classify(cls: type[BaseModel], name: str, annotation: Any) -> _Field:
    tp = annotation
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args: Any = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            tp = args[0]
            origin = typing.get_origin(tp)
        elif all(_is_scalar(a) for a in args):
            return _Field(name, False)
    if origin in (list, tuple) and typing.get_origin(tp) is not None:
        args = typing.get_args(tp)
        if args and _is_scalar(args[0]):
            return _Field(name, True)
    if _is_scalar(tp):
        return _Field(name, False)
    raise ConfigError(
        f"{cls.__module__}.{cls.__qualname__}.{name}: a plain payload field must be a scalar, "
        f"an optional scalar or a list of scalars (got {annotation!r}); "
        "use a pydantic_xml.BaseXmlModel for nested shapes"
    )


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if hasattr(value, "value") and not isinstance(value, str | int | float):
        value = value.value  # enums
    return str(value)


_SIMPLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class _PlainCodec:
    """Codec for a plain pydantic model: one element per field."""

    __slots__ = (
        "_bytes_plan",
        "_child_prefix",
        "_close",
        "_empty",
        "_fields",
        "_nsmap",
        "_open",
        "_plan",
        "cls",
        "namespace",
        "qname",
        "tag",
    )

    def __init__(self, cls: type[BaseModel]) -> None:
        self.cls = cls
        self.tag = getattr(cls, "xml_tag", None) or cls.__name__
        self.namespace = getattr(cls, "xml_ns", "") or ""
        self.qname = qname_of(self.namespace, self.tag)
        self._child_prefix = f"{{{self.namespace}}}" if self.namespace else ""
        self._fields: dict[str, _Field] = {}
        # (attribute name, child tag, is_list) per field, in order, for encode().
        self._plan: list[tuple[str, str, bool]] = []
        for name, info in cls.model_fields.items():
            key = info.alias or name
            field = self._fields[key] = _classify(cls, name, info.annotation)
            self._plan.append((name, self._child_prefix + key, field.is_list))
        self._nsmap = {None: self.namespace} if self.namespace else None
        # encode_bytes(): the same bytes as etree.tostring(encode(model)), built directly
        # when every name is a plain XML name (otherwise it goes through lxml).
        self._bytes_plan: list[tuple[str, bytes, bytes, bool]] | None = None
        self._empty = self._open = self._close = b""
        keys = [info.alias or name for name, info in cls.model_fields.items()]
        try:
            empty = etree.tostring(etree.Element(self.qname, nsmap=self._nsmap))  # type: ignore[arg-type]
        except ValueError:  # encode() will say what is wrong
            empty = b""
        if empty and all(_SIMPLE_NAME.fullmatch(k) for k in [self.tag, *keys]):
            self._empty = empty
            self._open = empty[:-2] + b">"
            self._close = f"</{self.tag}>".encode()
            self._bytes_plan = [
                (name, f"<{key}>".encode(), f"</{key}>".encode(), field.is_list)
                for (name, _, _), key, field in zip(
                    self._plan, keys, self._fields.values(), strict=True
                )
            ]

    def encode_bytes(self, model: BaseModel) -> bytes:
        """``etree.tostring(self.encode(model))``, faster.

        Raises:
            ValueError: a value holds text XML cannot carry.
        """
        plan = self._bytes_plan
        if plan is None:
            return etree.tostring(self.encode(model))
        parts = [self._open]
        values = model.__dict__
        for name, open_tag, close_tag, is_list in plan:
            value = values[name]
            if value is None:
                continue
            for item in value if is_list else (value,):
                text = item if type(item) is str else _text(item)
                if NOT_XML.search(text) is not None:
                    return etree.tostring(self.encode(model))  # raises ValueError
                parts.append(open_tag)
                parts.append(escape(text))
                parts.append(close_tag)
        if len(parts) == 1:
            return self._empty
        parts.append(self._close)
        return b"".join(parts)

    def decode(self, element: etree._Element) -> BaseModel:
        if element.attrib:
            raise PayloadInvalid(
                f"{self.tag}: attributes are not allowed ({', '.join(map(str, element.attrib))})"
            )
        if element.text is not None and element.text.strip():
            raise PayloadInvalid(f"{self.tag}: text directly inside the payload is not allowed")
        data: dict[str, Any] = {}
        prefix = self._child_prefix
        fields = self._fields
        for child in element:
            tag = child.tag
            if prefix:
                if not tag.startswith(prefix):
                    raise PayloadInvalid(f"{self.tag}: unexpected element {tag!r}")
                local = tag[len(prefix) :]
            else:
                local = tag
            field = fields.get(local)
            if field is None:
                raise PayloadInvalid(f"{self.tag}: unexpected element {local!r}")
            if len(child) or child.attrib:
                raise PayloadInvalid(f"{self.tag}.{local}: must hold text only")
            if child.tail is not None and child.tail.strip():
                raise PayloadInvalid(f"{self.tag}: text between elements is not allowed")
            text = child.text or ""
            if field.is_list:
                data.setdefault(local, []).append(text)
            elif local in data:
                raise PayloadInvalid(f"{self.tag}.{local}: element given more than once")
            else:
                data[local] = text
        try:
            return self.cls.model_validate(data)
        except ValidationError as exc:
            raise PayloadInvalid(f"{self.tag}: {_validation_summary(exc)}") from exc

    def encode(self, model: BaseModel) -> etree._Element:
        root = etree.Element(self.qname, nsmap=self._nsmap)  # type: ignore[arg-type]
        sub = etree.SubElement
        values = model.__dict__
        for name, tag, is_list in self._plan:
            value = values[name]
            if value is None:
                continue
            if is_list:
                for item in value:
                    sub(root, tag).text = _text(item)
            elif type(value) is str:
                sub(root, tag).text = value
            else:
                sub(root, tag).text = _text(value)
        return root


class _XmlModelCodec:
    """Codec for a pydantic-xml ``BaseXmlModel``."""

    __slots__ = ("_plan", "cls", "namespace", "qname", "tag")

    def __init__(self, cls: type[BaseModel]) -> None:
        self.cls = cls
        # A faster route for models of a common shape, giving the same models and
        # elements as pydantic-xml (see _xmlmodel); None: pydantic-xml only.
        self._plan = plan_of(cls)
        self.tag = getattr(cls, "__xml_tag__", None) or cls.__name__
        prefix = getattr(cls, "__xml_ns__", None)
        nsmap: dict[str, str] = dict(getattr(cls, "__xml_nsmap__", None) or {})
        if prefix is None:
            if nsmap.get(""):
                # pydantic-xml would write <Tag xmlns="..."> for an element it builds
                # without a namespace: the XML and the routing key would disagree.
                raise ConfigError(
                    f"{cls.__module__}.{cls.__qualname__}: nsmap has a default namespace "
                    f'({nsmap[""]!r}) but the class sets no ns=; add ns="" to put the '
                    "element in that namespace"
                )
            namespace = ""
        elif prefix in nsmap:
            namespace = nsmap[prefix]
        else:
            raise ConfigError(
                f"{cls.__module__}.{cls.__qualname__}: namespace prefix {prefix!r} "
                "is not in its nsmap"
            )
        self.namespace = namespace
        self.qname = qname_of(namespace, self.tag)

    def decode(self, element: etree._Element) -> BaseModel:
        if self._plan is not None:
            model = self._plan.decode(element)
            if model is not None:
                return model
        try:
            return self.cls.from_xml_tree(element)  # type: ignore[attr-defined,no-any-return]
        except ValidationError as exc:
            raise PayloadInvalid(f"{self.tag}: {_validation_summary(exc)}") from exc
        except (ValueError, TypeError) as exc:
            raise PayloadInvalid(f"{self.tag}: {exc}") from exc

    def encode(self, model: BaseModel) -> etree._Element:
        if self._plan is not None:
            return self._plan.encode(model)
        element: etree._Element = model.to_xml_tree()  # type: ignore[attr-defined]
        return element

    def encode_bytes(self, model: BaseModel) -> bytes:
        return etree.tostring(self.encode(model))


_codecs: dict[type[BaseModel], Codec] = {}


def codec_for(cls: type[BaseModel]) -> Codec:
    """The codec of a payload class, built on first use and cached.

    Raises:
        ConfigError: ``cls`` is not a pydantic model or has an unsupported shape.
    """
    codec = _codecs.get(cls)
    if codec is not None:
        return codec
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise ConfigError(f"{cls!r} is not a pydantic model class")
    from pydantic_xml import BaseXmlModel

    codec = _XmlModelCodec(cls) if issubclass(cls, BaseXmlModel) else _PlainCodec(cls)
    _codecs[cls] = codec
    return codec


def payload_from_xml(cls: type[_M], data: bytes) -> _M:
    """Decode a payload from its XML bytes (a history slot's ``xml``, say).

    The bytes go through the hardened parser with its default limits.

    Raises:
        MalformedMessage, MessageTooLarge: the bytes are not acceptable XML.
        PayloadInvalid: the element is not a valid ``cls``.
    """
    codec = codec_for(cls)
    element = parse_bytes(data)
    if element.tag != codec.qname:
        raise PayloadInvalid(f"expected {codec.qname}, got {element.tag!r}")
    model = codec.decode(element)
    assert isinstance(model, cls)
    return model
