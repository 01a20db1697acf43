"""The one hardened XML parser of xml_pipeline.

Every byte that comes from outside the pump is parsed here and nowhere else. The
parser never resolves entities, never loads a DTD, never touches the network and
refuses documents with a DOCTYPE outright. On top of lxml's own safety limits it
enforces the project's limits (bytes, nesting depth, elements, attributes) before
the document is handed to routing.
"""

from __future__ import annotations

import re
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
        for name in ("max_bytes", "max_depth", "max_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParseLimits.{name} must be at least 1")
        if self.max_attributes < 0:
            raise ValueError("ParseLimits.max_attributes must not be negative")


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
            # Not collect_ids=False: lxml maps it to a libxml2 flag that also loads
            # the external DTD subset from local files.
        )
        _local.parser = parser
    return parser


_count_elements = etree.XPath("count(//*)")
_count_attributes = etree.XPath("count(//@*)")
_XINCLUDE_PREFIXES = tuple("{" + ns + "}" for ns in _XINCLUDE_NAMESPACES)
_UTF8_BOM = b"\xef\xbb\xbf"
_ACCEPTED_ENCODINGS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_DECLARED_ENCODING = re.compile(rb"""^<\?xml[^>]*?\sencoding\s*=\s*["']([^"']*)["']""")
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
        MalformedMessage: not UTF-8, not well-formed, has a DOCTYPE or entity
            declaration, or uses XInclude.
    """
    if type(data) is not bytes and not isinstance(data, bytearray | memoryview):
        raise TypeError(f"parse_bytes() takes bytes, not {type(data).__name__}")
    size = len(data)
    if size > limits.max_bytes:
        raise MessageTooLarge(f"message is {size} bytes; the limit is {limits.max_bytes}")
    raw = data if type(data) is bytes else bytes(data)
    _check_utf8(raw)
    # Each substring search below costs about as much as a one-byte search
    # (memchr) several times over, so each is guarded by a byte that any match
    # must contain: most messages hold no "!" and no "&" at all (measured:
    # benchmarks/stages.py, ingress).
    bang = b"!" in raw
    # In UTF-8 these cannot hide: a DOCTYPE or an entity declaration is refused
    # before libxml2 sees it (even inside a comment or CDATA section).
    if bang and (b"<!DOCTYPE" in raw or b"<!ENTITY" in raw):
        raise MalformedMessage("DTDs and entity declarations are not allowed")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        text = _excerpt_error(exc)
        lowered = text.lower()
        if "excessive depth" in lowered or (
            getattr(exc, "code", None) == etree.ErrorTypes.ERR_RESOURCE_LIMIT
            and "entity" not in lowered
        ):
            raise MessageTooLarge(f"over a parser limit: {text}") from exc
        raise MalformedMessage(f"not well-formed XML: {text}") from exc
    except ValueError as exc:  # e.g. unsupported encoding declarations
        raise MalformedMessage(f"not well-formed XML: {exc}") from exc
    if bang and root.getroottree().docinfo.doctype:  # type: ignore[union-attr]
        # Belt and braces: the byte check above already refused it (and a DOCTYPE
        # cannot be written without a "!").
        raise MalformedMessage("DTDs and entity declarations are not allowed")
    # Cheap upper bounds first: in UTF-8 every element starts with one b"<" and
    # takes at least 4 bytes (b"<a/>"), every attribute holds one b"=" and takes at
    # least 5 (b' a=""'). The exact counts run only when a bound is over a limit.
    size = len(raw)  # in bytes, whatever the buffer's item size
    bound = min(limits.max_elements, limits.max_depth)
    if size // 4 > bound and raw.count(b"<") > bound:
        elements = int(_count_elements(root))  # type: ignore[arg-type]
        if elements > limits.max_elements:
            raise MessageTooLarge(
                f"message has {elements} elements; the limit is {limits.max_elements}"
            )
        if elements > limits.max_depth and _deeper_than(root, limits.max_depth):
            raise MessageTooLarge(f"message nests deeper than {limits.max_depth} elements")
    if size // 5 > limits.max_attributes and raw.count(b"=") > limits.max_attributes:
        attributes = int(_count_attributes(root))  # type: ignore[arg-type]
        if attributes > limits.max_attributes:
            raise MessageTooLarge(
                f"message has {attributes} attributes; the limit is {limits.max_attributes}"
            )
    # The XInclude namespace is either spelled out in the bytes or hidden behind
    # character references; either way the tree is searched.
    if ((b"X" in raw and b"XInclude" in raw) or (b"&" in raw and b"&#" in raw)) and _has_xinclude(
        root
    ):
        raise MalformedMessage("XInclude elements are not allowed")
    return root


def _has_xinclude(root: etree._Element) -> bool:
    for element in root.iter():
        tag = element.tag
        if type(tag) is str and tag.startswith(_XINCLUDE_PREFIXES):
            return True
    return False


def _check_utf8(raw: bytes) -> None:
    """Refuse anything but a UTF-8 (or ASCII) document.

    Other encodings (UTF-16, UTF-32, UTF-7, EBCDIC) could hide markup from the
    byte-level checks, so they are refused before parsing.
    """
    if raw[:1] == b"<" and raw[1:2] != b"?":
        # The usual case, decided by its first two bytes: no BOM, no leading space,
        # no XML declaration (which starts "<?"), nor a UTF-16/32 BOM.
        if b"\x00" in raw:
            raise MalformedMessage("only UTF-8 documents are accepted (this looks like UTF-16/32)")
        return
    body = raw[3:] if raw.startswith(_UTF8_BOM) else raw
    stripped = body.lstrip(b" \t\r\n")
    if not stripped:
        raise MalformedMessage("empty message")
    if b"\x00" in body or body.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MalformedMessage("only UTF-8 documents are accepted (this looks like UTF-16/32)")
    if stripped[:1] != b"<":
        text = stripped[:24].decode("utf-8", "replace")
        raise MalformedMessage(f"not XML: a document starts with '<', this starts with {text!r}")
    if body.startswith(b"<?xml"):
        match = _DECLARED_ENCODING.match(body)
        if match is not None and match.group(1).decode("ascii", "replace").lower() not in (
            _ACCEPTED_ENCODINGS
        ):
            raise MalformedMessage(
                f"encoding {match.group(1).decode('ascii', 'replace')!r} is not accepted; use UTF-8"
            )


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
