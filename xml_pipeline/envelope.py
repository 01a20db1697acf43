"""The message envelope: parse it from outside bytes, build it with lxml.

::

    <message xmlns="https://xml-pipeline.org/ns/envelope/v1">
      <meta>
        <from>console</from>   required
        <to>greeter</to>       optional: one listener; absent = every listener accepting the payload
        <thread>…</thread>     optional at ingress
        <id>…</id>             optional at ingress; the pump assigns one
        <re>…</re>             on replies: the id of the external message they answer
        <traceparent>…</traceparent>  optional: W3C trace context (see below)
      </meta>
      <Greeting xmlns="https://example.org/hello">…</Greeting>   exactly one payload
    </message>

Envelopes are only ever built with lxml, never by string formatting, so the text
of ``from``, ``to`` and ``thread`` round-trips exactly whatever characters it holds.

``<traceparent>`` carries a W3C trace context (``00-<32 hex>-<16 hex>-<2 hex>``) so
that a trace continues through the pump (a caller's, hop to hop, node to node). It is
outside input that nothing depends on: one that is not exactly of that form is
ignored (``Envelope.traceparent`` is None), never refused, whatever its length.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lxml import etree

from ._text import NOT_XML, escape
from ._tracing import valid_traceparent
from .exceptions import EnvelopeError
from .parser import DEFAULT_LIMITS, ParseLimits, parse_bytes

__all__ = ["ENVELOPE_NAMESPACE", "Envelope", "build_envelope", "parse_envelope", "parse_payload"]

ENVELOPE_NAMESPACE = "https://xml-pipeline.org/ns/envelope/v1"
MAX_META_CHARS = 1024

_NS = "{" + ENVELOPE_NAMESPACE + "}"
_MESSAGE = _NS + "message"
_META = _NS + "meta"
_FIELDS = {
    _NS + "from": "from",
    _NS + "to": "to",
    _NS + "thread": "thread",
    _NS + "id": "id",
    _NS + "re": "re",
    _NS + "traceparent": "traceparent",
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope. ``payload`` is the payload's root element.

    ``re`` is set on replies: the id of the external message the reply answers.
    ``traceparent`` is the W3C trace context the sender gave, if it was valid.
    """

    sender: str
    to: str | None
    thread: str | None
    id: str | None
    payload: etree._Element
    re: str | None = None
    traceparent: str | None = None

    @property
    def qname(self) -> str:
        """The payload's routing key, ``{namespace}local``."""
        return str(self.payload.tag)


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def parse_envelope(data: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> Envelope:
    """Parse and check one envelope from outside.

    Raises:
        MalformedMessage, MessageTooLarge: from the hardened parser.
        EnvelopeError: well-formed XML that is not a valid envelope.
    """
    root = parse_bytes(data, limits)
    return envelope_from_element(root)


def envelope_from_element(root: etree._Element) -> Envelope:
    """Check an already parsed ``<message>`` element. Raises EnvelopeError."""
    return Envelope(*_read_envelope(root))


_EnvelopeValues = tuple[
    str, str | None, str | None, str | None, etree._Element, str | None, str | None
]


def _read_envelope(root: etree._Element) -> _EnvelopeValues:
    """:func:`envelope_from_element`'s checks, giving ``Envelope``'s fields in order.

    For the pump's ingress, which reads the fields at once: building the frozen
    ``Envelope`` costs about a third of the checks.
    """
    # Every check reads the tree through lxml proxies, each a few tens of ns: the
    # children are taken by index (no list), attributes by ``keys()`` (no attribute
    # proxy) and blank text by ``isspace()``, which agrees with ``_blank`` on every
    # string (tests/test_envelope.py). Measured: benchmarks/stages.py, envelope.
    if root.tag != _MESSAGE:
        raise EnvelopeError(
            f"the root element must be {{{ENVELOPE_NAMESPACE}}}message, not {root.tag!r}"
        )
    if root.keys():
        raise EnvelopeError("<message> takes no attributes")
    text = root.text
    if text and not text.isspace():
        raise EnvelopeError("text directly inside <message> is not allowed")
    count = len(root)
    meta = root[0] if count else None  # one proxy, held: lxml makes one per access
    if meta is None or meta.tag != _META:
        raise EnvelopeError("<message> must start with <meta>")
    if count != 2:
        raise EnvelopeError(
            f"<message> must hold <meta> and exactly one payload element (found {count - 1})"
        )
    payload = root[1]
    if str(payload.tag).startswith(_NS):
        raise EnvelopeError(f"the payload cannot be in the envelope namespace ({payload.tag!r})")
    meta_tail, payload_tail, meta_text = meta.tail, payload.tail, meta.text
    if (
        (meta_tail and not meta_tail.isspace())
        or (payload_tail and not payload_tail.isspace())
        or (meta_text and not meta_text.isspace())
        or meta.keys()
    ):
        raise EnvelopeError("stray text or attributes in the envelope")
    values: dict[str, str] = {}
    for field in meta:
        name = _FIELDS.get(field.tag)
        if name is None:
            raise EnvelopeError(f"unknown element in <meta>: {field.tag!r}")
        if name in values:
            raise EnvelopeError(f"<{name}> given more than once")
        if len(field) or field.keys():
            raise EnvelopeError(f"<{name}> must hold text only")
        tail = field.tail
        if tail and not tail.isspace():
            raise EnvelopeError("stray text in <meta>")
        text = field.text or ""
        if name == "traceparent":
            # Ignored unless valid (a trace is not worth refusing a message for).
            values[name] = valid_traceparent(text) or ""
            continue
        if len(text) > MAX_META_CHARS:
            raise EnvelopeError(f"<{name}> is longer than {MAX_META_CHARS} characters")
        values[name] = text
    sender = values.get("from")
    if not sender:
        raise EnvelopeError("<meta> must have a non-empty <from>")
    get = values.get
    return (
        sender,
        get("to") or None,
        get("thread") or None,
        get("id") or None,
        payload,
        get("re") or None,
        get("traceparent") or None,
    )


def parse_payload(data: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> etree._Element:
    """Parse a bare payload element from outside (to be wrapped by the pump).

    A full ``<message>`` is refused here: the caller decides which form it expects.

    Raises:
        MalformedMessage, MessageTooLarge: from the hardened parser.
        EnvelopeError: the document is an envelope, not a bare payload.
    """
    root = parse_bytes(data, limits)
    if str(root.tag).startswith(_NS):
        raise EnvelopeError("expected a bare payload element, got an envelope element")
    return root


def build_envelope(
    *,
    sender: str,
    payload: etree._Element,
    to: str | None = None,
    thread: str | None = None,
    id: str | None = None,  # noqa: A002 - the wire name
    re: str | None = None,
    traceparent: str | None = None,
) -> bytes:
    """Serialize an envelope.

    Raises:
        ValueError: a text value holds characters XML cannot carry (NUL, most
            control characters, lone surrogates).
    """
    if payload.tag[0] == "{":
        nsmap: dict[str | None, str] = {None: ENVELOPE_NAMESPACE}
    else:
        # A payload without a namespace under a default-namespaced envelope would be
        # serialized without xmlns="" and read back in the envelope's namespace:
        # give the envelope a prefix instead.
        nsmap = {"env": ENVELOPE_NAMESPACE}
    message = etree.Element(_MESSAGE, nsmap=nsmap)  # type: ignore[arg-type]
    meta = etree.SubElement(message, _META)
    etree.SubElement(meta, _NS + "from").text = sender
    if to is not None:
        etree.SubElement(meta, _NS + "to").text = to
    if thread is not None:
        etree.SubElement(meta, _NS + "thread").text = thread
    if id is not None:
        etree.SubElement(meta, _NS + "id").text = id
    if re is not None:
        etree.SubElement(meta, _NS + "re").text = re
    if traceparent is not None:
        etree.SubElement(meta, _NS + "traceparent").text = traceparent
    if payload.getparent() is not None:
        payload = copy.deepcopy(payload)
    message.append(payload)
    return etree.tostring(message)


_OPEN = f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta>'.encode()
_ENVELOPE_NS_BYTES = ENVELOPE_NAMESPACE.encode()


def _envelope_around(
    payload_xml: bytes,
    *,
    sender: str,
    to: str | None = None,
    thread: str | None = None,
    id: str | None = None,  # noqa: A002 - the wire name
    re: str | None = None,
    traceparent: str | None = None,
) -> bytes | None:
    """:func:`build_envelope` around an already serialized, namespaced payload.

    The same bytes as ``build_envelope(payload=etree.fromstring(payload_xml), ...)``,
    without parsing the payload. ``payload_xml`` must be what ``etree.tostring`` wrote
    for an element in a namespace (so it declares what it uses on its root). Returns
    None when a value needs the general path (text XML cannot carry: it raises there).
    """
    if _ENVELOPE_NS_BYTES in payload_xml:
        return None  # lxml would drop or move that declaration inside the envelope
    parts = [_OPEN]
    fields = (
        ("from", sender), ("to", to), ("thread", thread), ("id", id), ("re", re),
        ("traceparent", traceparent),
    )  # fmt: skip
    for tag, value in fields:
        if value is None:
            continue
        if NOT_XML.search(value) is not None:
            return None
        parts.append(b"<%b>%b</%b>" % (tag.encode(), escape(value), tag.encode()))
    parts.append(b"</meta>")
    parts.append(payload_xml)
    parts.append(b"</message>")
    return b"".join(parts)
