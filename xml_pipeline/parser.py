"""The one hardened XML parser of xml_pipeline.

Every byte that comes from outside the pump is parsed here and nowhere else. The
parser never resolves entities, never loads a DTD, never touches the network and
refuses documents with a DOCTYPE outright. On top of lxml's own safety limits it
enforces the project's limits (bytes, nesting depth, elements, attributes) before
the document is handed to routing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from lxml import etree

from .exceptions import MalformedMessage, MessageTooLarge

__all__ = ["ParseLimits", "parse_bytes", "parse_trusted"]

_XINCLUDE_NAMESPACES = (
    "http://www.w3.org/2001/XInclude",
    "http://www.w3.org/2003/XInclude",
)


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Limits checked for every message from outside.

    Attributes:
        max_bytes: size of the raw document (checked before parsing).
        max_depth: element nesting depth (the root element is depth 1).
        max_elements: number of elements in the document.
        max_attributes: number of attributes in the document.
    """

    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    max_elements: int = 10_000
    max_attributes: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_elements", "max_attributes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParseLimits.{name} must be at least 1")


DEFAULT_LIMITS = ParseLimits()

_local = threading.local()


def _parser() -> etree.XMLParser:
    # lxml parsers are not thread-safe: one per thread, built once.
    parser: etree.XMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,
            remove_blank_text=False,
            remove_comments=True,
            remove_pis=True,
            recover=False,
            collect_ids=False,
        )
        _local.parser = parser
    return parser


_count_elements = etree.XPath("count(//*)")
_count_attributes = etree.XPath("count(//@*)")
_has_xinclude = etree.XPath(
    "boolean(//*[namespace-uri()=$a or namespace-uri()=$b])",
)
_ASCII_COMPATIBLE = frozenset({"UTF-8", "UTF8", "US-ASCII", "ASCII", "ISO-8859-1", "LATIN1"})
_depth_probes: dict[int, etree.XPath] = {}


def _deeper_than(root: etree._Element, depth: int) -> bool:
    probe = _depth_probes.get(depth)
    if probe is None:
        probe = etree.XPath("boolean(/" + "/*" * (depth + 1) + ")")
        _depth_probes[depth] = probe
    return bool(probe(root))


def _excerpt_error(exc: etree.XMLSyntaxError) -> str:
    msg = str(exc.msg if exc.msg else exc)
    return msg.splitlines()[0][:300] if msg else "not well-formed XML"


def parse_bytes(data: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> etree._Element:
    """Parse one XML document from outside and check it against ``limits``.

    Args:
        data: the raw document.
        limits: the project's limits.

    Returns:
        The root element.

    Raises:
        MessageTooLarge: over a byte, depth, element or attribute limit.
        MalformedMessage: not well-formed, has a DOCTYPE or entity, or uses XInclude.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"parse_bytes() takes bytes, not {type(data).__name__}")
    size = len(data)
    if size > limits.max_bytes:
        raise MessageTooLarge(f"message is {size} bytes; the limit is {limits.max_bytes}")
    raw = bytes(data)
    if not raw.strip():
        raise MalformedMessage("empty message")
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise MalformedMessage("DTDs and entity declarations are not allowed")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        text = _excerpt_error(exc)
        if "excessive depth" in text.lower():
            raise MessageTooLarge(f"nesting too deep: {text}") from exc
        raise MalformedMessage(f"not well-formed XML: {text}") from exc
    except ValueError as exc:  # e.g. unsupported encoding declarations
        raise MalformedMessage(f"not well-formed XML: {exc}") from exc
    docinfo = root.getroottree().docinfo
    if docinfo.doctype:  # type: ignore[union-attr]
        # Reached only by documents that hide the DOCTYPE from the byte check
        # (another encoding); they are refused all the same.
        raise MalformedMessage("DTDs and entity declarations are not allowed")
    # Cheap upper bounds first: in an ASCII-compatible encoding every element
    # starts with one b"<" and every attribute holds one b"=". The exact (slower)
    # counts run only when a bound is over a limit.
    exact = str(docinfo.encoding).upper() not in _ASCII_COMPATIBLE
    if exact or raw.count(b"<") > min(limits.max_elements, limits.max_depth):
        elements = int(_count_elements(root))  # type: ignore[arg-type]
        if elements > limits.max_elements:
            raise MessageTooLarge(
                f"message has {elements} elements; the limit is {limits.max_elements}"
            )
        if elements > limits.max_depth and _deeper_than(root, limits.max_depth):
            raise MessageTooLarge(f"message nests deeper than {limits.max_depth} elements")
    if exact or raw.count(b"=") > limits.max_attributes:
        attributes = int(_count_attributes(root))  # type: ignore[arg-type]
        if attributes > limits.max_attributes:
            raise MessageTooLarge(
                f"message has {attributes} attributes; the limit is {limits.max_attributes}"
            )
    if (exact or b"XInclude" in raw) and _has_xinclude(
        root, a=_XINCLUDE_NAMESPACES[0], b=_XINCLUDE_NAMESPACES[1]
    ):
        raise MalformedMessage("XInclude elements are not allowed")
    return root


def parse_trusted(data: bytes) -> etree._Element:
    """Parse XML the project generated itself (an XSD, a test fixture).

    Uses the same hardened parser, with no size limits.

    Raises:
        MalformedMessage: the document is not well-formed.
    """
    try:
        return etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise MalformedMessage(f"not well-formed XML: {_excerpt_error(exc)}") from exc
