"""Envelopes: building with lxml, parsing back, and what is not an envelope."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from xml_pipeline import ENVELOPE_NAMESPACE, EnvelopeError, build_envelope, parse_envelope
from xml_pipeline.envelope import envelope_from_element, parse_payload

# Characters XML 1.0 can carry (no NUL, no other C0 controls but tab/newline/CR, no surrogates,
# no U+FFFE/U+FFFF).
xml_char = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters=[chr(c) for c in range(0x20) if chr(c) not in "\t\n\r"]
    + ["\ufffe", "\uffff"],
)
xml_text = st.text(xml_char, min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(
    sender=xml_text,
    to=xml_text | st.none(),
    thread=xml_text | st.none(),
    body=st.text(xml_char, max_size=300),
)
def test_build_then_parse_round_trips(
    sender: str, to: str | None, thread: str | None, body: str
) -> None:
    payload = etree.Element("{urn:p}P", nsmap={None: "urn:p"})  # type: ignore[dict-item]
    etree.SubElement(payload, "{urn:p}body").text = body
    data = build_envelope(sender=sender, payload=payload, to=to, thread=thread, id="m-1")
    env = parse_envelope(data)
    assert (env.sender, env.to, env.thread, env.id) == (sender, to, thread, "m-1")
    assert env.qname == "{urn:p}P"
    assert (env.payload[0].text or "") == body


def test_hostile_text_round_trips_and_cannot_inject_meta() -> None:
    nasty = "]]> </message> <to>admin</to> <![CDATA[ x ]]> &amp; \r\n"
    payload = etree.Element("P")
    payload.text = nasty
    data = build_envelope(sender=nasty, payload=payload, to="echo")
    env = parse_envelope(data)
    assert env.sender == nasty and env.to == "echo" and env.payload.text == nasty


def test_characters_xml_cannot_carry_are_refused_when_building() -> None:
    with pytest.raises(ValueError):
        build_envelope(sender="a\x00b", payload=etree.Element("P"))


E = f'xmlns="{ENVELOPE_NAMESPACE}"'
P = '<P xmlns="urn:p"/>'


@pytest.mark.parametrize(
    "doc",
    [
        f"<message {E}><meta><to>x</to></meta><P/></message>",  # no from
        f"<message {E}><meta><from></from></meta><P/></message>",  # empty from
        f"<message {E}><meta><from>a</from></meta></message>",  # no payload
        f"<message {E}><meta><from>a</from></meta><P/><Q/></message>",  # two payloads
        f"<message {E}><P/><meta><from>a</from></meta></message>",  # meta not first
        f"<message {E}><meta><from>a</from><from>b</from></meta><P/></message>",
        f"<message {E}><meta><from>a</from><colour>x</colour></meta><P/></message>",
        f"<message {E}><meta><from>a<b/></from></meta><P/></message>",
        f"<message {E}>text<meta><from>a</from></meta><P/></message>",
        f"<message {E} x='1'><meta><from>a</from></meta><P/></message>",
        f"<message {E}><meta><from>a</from></meta><meta/></message>",  # payload in env ns
        "<message><meta><from>a</from></meta><P/></message>",  # no namespace
        f"<message {E}><meta><from>{'a' * 2000}</from></meta><P/></message>",
    ],
)
def test_invalid_envelopes_are_refused(doc: str) -> None:
    with pytest.raises(EnvelopeError):
        parse_envelope(doc.encode())


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (f"<message {E}/>", "must start with <meta>"),
        (f"<message {E}>{P}</message>", "must start with <meta>"),
        (f"<message {E}><meta a='1'><from>a</from></meta>{P}</message>", "stray text"),
        (f"<message {E}><meta>x<from>a</from></meta>{P}</message>", "stray text"),
        (f"<message {E}><meta><from>a</from></meta>x{P}</message>", "stray text"),
        (f"<message {E}><meta><from>a</from></meta>{P}x</message>", "stray text"),
        (f"<message {E}><meta><from>a</from>x</meta>{P}</message>", "stray text in <meta>"),
        (f"<message {E}><meta><from a='1'>a</from></meta>{P}</message>", "text only"),
        (
            f"<message {E}><meta><to>{'b' * 1025}</to><from>a</from></meta>{P}</message>",
            "longer than 1024",
        ),
        (
            f"<message {E}><meta><from>a</from><to>b</to><to>c</to></meta>{P}</message>",
            "more than once",
        ),
    ],
)
def test_each_envelope_check_names_what_is_wrong(doc: str, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        parse_envelope(doc.encode())


blankish = st.text(st.sampled_from(" \t\n\r\x85\xa0\u1680\u2028\u3000x-"), max_size=6)


@settings(max_examples=300, deadline=None)
@given(message_text=blankish, meta_text=blankish, meta_tail=blankish, field_tail=blankish)
def test_blank_text_is_what_strip_leaves_empty(
    message_text: str, meta_text: str, meta_tail: str, field_tail: str
) -> None:
    # envelope_from_element tests blankness with isspace(); the rule is "nothing
    # left after strip()", on every character either might treat as space.
    root = etree.Element(f"{{{ENVELOPE_NAMESPACE}}}message")
    meta = etree.SubElement(root, f"{{{ENVELOPE_NAMESPACE}}}meta")
    field = etree.SubElement(meta, f"{{{ENVELOPE_NAMESPACE}}}from")
    field.text = "a"
    etree.SubElement(root, "{urn:p}P")
    root.text, meta.text, meta.tail, field.tail = message_text, meta_text, meta_tail, field_tail
    blank = all(not t.strip() for t in (message_text, meta_text, meta_tail, field_tail))
    try:
        env = envelope_from_element(root)
    except EnvelopeError:
        assert not blank
    else:
        assert blank
        assert (env.sender, env.qname) == ("a", "{urn:p}P")


def test_whitespace_and_optional_fields() -> None:
    doc = f"""<message {E}>
      <meta>
        <from>console</from>
      </meta>
      <P xmlns="urn:p"/>
    </message>"""
    env = parse_envelope(doc.encode())
    assert (env.sender, env.to, env.thread, env.id, env.qname) == (
        "console",
        None,
        None,
        None,
        "{urn:p}P",
    )


def test_bare_payload_parsing() -> None:
    assert parse_payload(b'<P xmlns="urn:p"/>').tag == "{urn:p}P"
    with pytest.raises(EnvelopeError):
        parse_payload(f"<message {E}/>".encode())


# -- the envelope around payload bytes the pump already has ------------------------------


@given(
    text=st.text(max_size=30),
    sender=st.text(min_size=1, max_size=12),
    to=st.none() | st.text(max_size=12),
    thread=st.none() | st.text(max_size=12),
    traceparent=st.none() | st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
)
@settings(max_examples=300, deadline=None)
def test_envelope_around_bytes_is_build_envelope(
    text: str, sender: str, to: str | None, thread: str | None, traceparent: str | None
) -> None:
    from support import Note, Ping

    from xml_pipeline import Reply, codec_for

    for model in (Ping(n=3, text=text), Note(body=text)):
        codec = codec_for(type(model))
        try:
            payload_xml = codec.encode_bytes(model)
            plain = Reply(thread, sender, to, "m-1", model, traceparent=traceparent)
            expected = plain.to_xml()
        except ValueError:
            continue  # text XML cannot carry: refused either way
        fast = Reply(thread, sender, to, "m-1", model, traceparent=traceparent)
        object.__setattr__(fast, "_payload_xml", payload_xml)  # as the pump sets it
        assert fast.to_xml() == expected


def test_payloads_declaring_the_envelope_namespace_take_the_general_path() -> None:
    import dataclasses

    from support import Ping, Pong

    from xml_pipeline import Reply, codec_for
    from xml_pipeline.envelope import _envelope_around

    inside = f'<InEnv xmlns="{ENVELOPE_NAMESPACE}"><a>1</a></InEnv>'.encode()
    assert _envelope_around(inside, sender="s") is None
    # A cached payload never outlives a replaced payload.
    reply = Reply("t", "s", "to", "m", Ping(n=1, text="secret"))
    object.__setattr__(reply, "_payload_xml", codec_for(Ping).encode_bytes(reply.payload))
    redacted = dataclasses.replace(reply, payload=Pong(n=1, text="redacted"))
    assert b"secret" not in redacted.to_xml() and b"redacted" in redacted.to_xml()


def test_the_envelope_xsd_accepts_what_the_pump_writes_and_names_re() -> None:
    from xml_pipeline.schema import envelope_xsd

    schema = etree.XMLSchema(etree.fromstring(envelope_xsd()))
    payload = etree.fromstring(b'<a xmlns="urn:x"><b/></a>')
    doc = build_envelope(sender="x", payload=payload, to="y", thread="t", id="1", re="m-1")
    assert schema.validate(etree.fromstring(doc)), schema.error_log
    assert parse_envelope(doc).re == "m-1"
    assert b"<re>m-1</re>" in doc
    no_sender = (
        b'<message xmlns="https://xml-pipeline.org/ns/envelope/v1">'
        b'<meta><to>x</to></meta><a xmlns="urn:x"/></message>'
    )
    assert not schema.validate(etree.fromstring(no_sender))
