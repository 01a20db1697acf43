"""``run --framing xml``: consecutive XML documents on the input, cut without parsing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from xml_pipeline import ENVELOPE_NAMESPACE
from xml_pipeline.cli._framing import TOO_LARGE as SKIPPED
from xml_pipeline.cli._framing import DocumentSplitter, LineSplitter
from xml_pipeline.parser import parse_trusted

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "organisms" / "hello.yaml"
CORE = "https://xml-pipeline.org/ns/core/v1"
TOO_LARGE = "too large"


def split(data: bytes, cap: int = 1 << 20, chunks: list[int] | None = None) -> list[object]:
    """The items of ``data`` fed in pieces of the sizes in ``chunks`` (default: at once)."""
    splitter = DocumentSplitter(cap)
    items: list[bytes | object] = []
    at = 0
    for size in chunks or []:
        items += splitter.feed(data[at : at + size])
        at += size
    items += splitter.feed(data[at:])
    items += splitter.close()
    return [TOO_LARGE if item is SKIPPED else item for item in items]


# -- the splitter --------------------------------------------------------------------

TRICKY = b"""\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment with <tags> and > signs -->
<?style type="text/css" href="a>b"?>
<a x=">" y='<' z="'">
  <![CDATA[ </a> <a> ]]> ]] >
  <?pi > </a> ?>
  <!-- </a> -->
  <b/><c></c><d
     e="1"
  />
</a>
junk between <e/>
<!-- between documents --> <?pi between?>
<!DOCTYPE f [ <!ENTITY x ">"> <!-- ] > --> ]><f/>
"""


def test_documents_comments_cdata_and_processing_instructions() -> None:
    first = TRICKY[3 : TRICKY.index(b"</a>\n") + 4]
    assert split(TRICKY) == [
        first,
        b"junk between",
        b"<e/>",
        b'<!DOCTYPE f [ <!ENTITY x ">"> <!-- ] > --> ]><f/>',
    ]


def test_every_chunking_gives_the_same_documents() -> None:
    whole = split(TRICKY)
    for size in (1, 2, 3, 5, 8, 13):
        chunks = [size] * (len(TRICKY) // size)
        assert split(TRICKY, chunks=chunks) == whole, size


def test_a_document_is_complete_as_soon_as_its_root_ends() -> None:
    splitter = DocumentSplitter(1000)
    assert splitter.feed(b"<a/>") == [b"<a/>"]  # nothing more needed to know it ended
    assert splitter.feed(b"\n<b>\n  <c/>\n") == []
    assert splitter.feed(b"</b>") == [b"<b>\n  <c/>\n</b>"]
    assert splitter.close() == []


def test_over_long_documents_are_skipped_and_reading_goes_on() -> None:
    data = b"<a>" + b"x" * 500 + b"<b>" + b"y" * 500 + b"</b></a>\n<ok/>\n" + b"z" * 300 + b"<ok2/>"
    expected = [TOO_LARGE, b"<ok/>", TOO_LARGE, b"<ok2/>"]
    assert split(data, cap=200) == expected
    assert split(data, cap=200, chunks=[7] * 200) == expected
    assert split(b"<a>" + b"x" * 193 + b"</a>", cap=200) == [b"<a>" + b"x" * 193 + b"</a>"]
    assert split(b"<a>" + b"x" * 194 + b"</a>", cap=200) == [TOO_LARGE]


def test_memory_stays_bounded_while_skipping() -> None:
    splitter = DocumentSplitter(100)
    assert splitter.feed(b"<a>") == []
    results = []
    for _ in range(1000):
        results += splitter.feed(b"<b>text</b>" * 10)
        assert len(splitter._buf) < 1000
    assert results == [SKIPPED]
    assert splitter.feed(b"</a><c/>") == [b"<c/>"]


def test_broken_documents_do_not_swallow_the_rest() -> None:
    # An XML declaration ends a truncated document; a stray end tag is an item.
    data = b'<?xml version="1.0"?><a><b>\n<?xml version="1.0"?><c/>\n</x>\n<d/>\n<e'
    assert split(data) == [b'<?xml version="1.0"?><a><b>\n', b'<?xml version="1.0"?><c/>',
                           b"</x>", b"<d/>", b"<e"]  # fmt: skip


def test_a_declaration_after_an_over_long_document_starts_the_next_one_in_any_chunks() -> None:
    # While skipping, the splitter keeps no bytes: a declaration at the very start of
    # what it keeps (a chunk boundary) still begins the next document.
    truncated = b'<?xml version="1.0"?><a>' + b"x" * 300
    following = b'<?xml version="1.0"?><b/>'
    data = truncated + following
    expected = [TOO_LARGE, following]
    assert split(data, cap=100) == expected
    for cut in range(len(truncated) - 4, len(truncated) + 6):
        assert split(data, cap=100, chunks=[cut]) == expected, cut


# Well-formed documents with the constructs the splitter must step over.
_names = st.sampled_from(["a", "b", "d-e", "f.g", "h_1"])
_texts = st.text(alphabet="ab <>&'\"]-?\n", max_size=12)


def _escape(text: str, quote: str = "") -> str:
    out = text.replace("&", "&amp;").replace("<", "&lt;")
    return out.replace(quote, "&quot;" if quote == '"' else "&apos;") if quote else out


@st.composite
def _misc(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["comment", "pi", "space"]))
    text = draw(_texts)
    if kind == "comment":
        return "<!--" + text.replace("-", "_") + "-->"
    if kind == "pi":
        return "<?p " + text.replace("?>", "? >") + "?>"
    return draw(st.sampled_from([" ", "\n", "\n  "]))


@st.composite
def _element(draw: st.DrawFn, depth: int = 0) -> str:
    name = draw(_names)
    attrs = ""
    for i, (value, quote) in enumerate(draw(st.lists(st.tuples(_texts, st.sampled_from("\"'")),
                                                     max_size=2))):  # fmt: skip
        attrs += f"\n  at{i}={quote}{_escape(value, quote)}{quote}"
    if depth > 2 or draw(st.booleans()):
        return f"<{name}{attrs}/>" if draw(st.booleans()) else f"<{name}{attrs}></{name} >"
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["element", "text", "cdata", "misc"]))
        if kind == "element":
            parts.append(draw(_element(depth + 1)))
        elif kind == "text":
            parts.append(_escape(draw(_texts)).replace("]]>", "]]&gt;"))
        elif kind == "cdata":
            parts.append("<![CDATA[" + draw(_texts).replace("]]>", "]] >") + "]]>")
        else:
            parts.append(draw(_misc()))
    return f"<{name}{attrs}>{''.join(parts)}</{name}>"


@st.composite
def _document(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A document, and what the splitter gives for it.

    Without an XML declaration, the comments and processing instructions before
    the root element are skipped with the gap between documents.
    """
    root = draw(_element()).encode()
    misc = "".join(draw(st.lists(_misc(), max_size=2))).lstrip().encode()
    if draw(st.booleans()):
        document = b'<?xml version="1.0"?>\n' + misc + root
        return document, document
    return misc + root, root


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_document(), min_size=1, max_size=4),
    st.lists(_misc(), max_size=4),
    st.lists(st.integers(1, 40), max_size=30),
)
def test_generated_documents_come_out_as_they_went_in(
    documents: list[tuple[bytes, bytes]], between: list[str], chunks: list[int]
) -> None:
    data = ("".join(between) or "\n").encode().join(document for document, _ in documents)
    items = split(data, chunks=chunks)
    assert items == [expected for _, expected in documents]
    for item in items:
        assert isinstance(item, bytes)
        parse_trusted(item)  # the test may parse; the splitter does not


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 20), max_size=20))
@example(data=b"\x0b<", chunks=[])  # a vertical tab is garbage, not space to strip
def test_any_bytes_split_alike_in_any_chunks_and_within_the_cap(
    data: bytes, chunks: list[int]
) -> None:
    items = split(data, cap=64, chunks=chunks)
    assert items == split(data, cap=64)
    for item in items:
        assert item == TOO_LARGE or (isinstance(item, bytes) and 0 < len(item) <= 64)


# -- the command line ----------------------------------------------------------------

PRETTY_ENVELOPE = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- a pretty-printed envelope -->
<message xmlns="{ENVELOPE_NAMESPACE}">
  <meta>
    <from>pretty</from>
    <to>greeter</to>
  </meta>
  <Greeting xmlns="https://example.org/hello">
    <name>Ann</name>
  </Greeting>
</message>
""".encode()

PRETTY_BARE = b"""<?xml version="1.0"?>
<Greeting xmlns="https://example.org/hello">
  <!-- </Greeting> is not the end -->
  <?note > < ?>
  <name><![CDATA[<Bob>]]></name>
</Greeting>
"""


def run(*args: str | Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "xml_pipeline", *map(str, args)],
        input=stdin, capture_output=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


def replies(stdout: bytes) -> list[tuple[str, str]]:
    """(to, text) of each reply: the greeting's answer, or the Huh's code."""
    out = []
    for line in stdout.splitlines():
        reply = parse_trusted(line)
        to = reply.findtext(f"{{{ENVELOPE_NAMESPACE}}}meta/{{{ENVELOPE_NAMESPACE}}}to") or ""
        payload = reply[1]
        if payload.tag == f"{{{CORE}}}huh":
            out.append((to, "huh " + (payload.findtext(f"{{{CORE}}}code") or "")))
        else:
            out.append((to, "".join(payload.itertext())))
    return out


def test_pretty_printed_envelopes_and_bare_payloads(tmp_path: Path) -> None:
    source = tmp_path / "in.xml"
    source.write_bytes(PRETTY_ENVELOPE + PRETTY_BARE + b"\n" + PRETTY_ENVELOPE)
    result = run(HELLO, "--input", source, "--framing", "xml", "--to", "greeter", "--no-boot",
                 stdin=b"")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(replies(result.stdout)) == [
        ("console", "HELLO, <BOB>!"),
        ("pretty", "HELLO, ANN!"),
        ("pretty", "HELLO, ANN!"),
    ]
    assert result.stderr == b""


def test_lines_framing_cannot_read_pretty_printed_documents() -> None:
    # The positive control: the same input, one message per line, is refused.
    result = run(HELLO, "--input", "-", "--to", "greeter", "--no-boot", stdin=PRETTY_BARE)
    assert result.returncode == 0, result.stderr
    answers = [text for _, text in replies(result.stdout)]
    assert answers and all(text.startswith("huh ") for text in answers)


def test_over_long_malformed_and_garbage_are_answered_and_reading_goes_on(tmp_path: Path) -> None:
    organism = tmp_path / "small.yaml"
    organism.write_text(
        HELLO.read_text().replace("listeners:", "pump: {max_message_bytes: 1000}\n\nlisteners:")
    )
    (tmp_path / "hello.py").write_text((ROOT / "organisms" / "hello.py").read_text())
    greeting = b'<Greeting xmlns="https://example.org/hello">\n  <name>%s</name>\n</Greeting>\n'
    stream = b"".join([
        greeting % (b"x" * 5000),           # too large: skipped while read
        greeting % b"Ann",
        b"not xml at all\n",                # garbage between documents
        greeting % b"Eve",
        b"<Greeting xmlns='https://example.org/hello'><name>Zed</nam></Greeting>\n",
        greeting % b"Max",
    ])  # fmt: skip
    result = run(organism, "--input", "-", "--framing", "xml", "--to", "greeter", "--no-boot",
                 "--sender", "feeder", stdin=stream)  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = replies(result.stdout)
    huhs = [text for _, text in got if text.startswith("huh")]
    assert sorted(huhs) == ["huh malformed", "huh malformed", "huh too-large"]
    assert sorted(text for _, text in got if not text.startswith("huh")) == [
        "HELLO, ANN!", "HELLO, EVE!", "HELLO, MAX!"
    ]  # fmt: skip
    assert {to for to, _ in got} == {"feeder"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    st.lists(st.integers(1, 200), max_size=20),
)
def test_lines_over_the_cap_are_skipped_however_they_arrive(
    lines: list[bytes], chunks: list[int]
) -> None:
    """The cap holds for every line: one that arrives whole in a chunk with its newline
    too (it used to pass through)."""
    data = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(cap=16)
    items: list[object] = []
    position = 0
    for size in [*chunks, len(data)]:
        items += splitter.feed(data[position : position + size])
        position += size
    items += splitter.close()
    assert items == [line if len(line) <= 16 else SKIPPED for line in lines]
