"""The command line, run as a real process: run, check, schema, errors, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lxml import etree

from xml_pipeline import ENVELOPE_NAMESPACE, load_organism
from xml_pipeline.parser import parse_trusted
from xml_pipeline.payload import codec_for

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "organisms" / "hello.yaml"
GREETING = b'<Greeting xmlns="https://example.org/hello"><name>%s</name></Greeting>'


def cli(
    *args: str, stdin: bytes | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "xml_pipeline", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def replies(stdout: bytes) -> list[etree._Element]:
    return [parse_trusted(line) for line in stdout.splitlines()]


def payload_text(reply: etree._Element) -> str:
    payload = reply[1]
    return "".join(payload.itertext())


def test_hello_prints_replies_to_its_boot_messages() -> None:
    result = cli(str(HELLO))
    assert result.returncode == 0, result.stderr
    lines = replies(result.stdout)
    assert sorted(payload_text(r) for r in lines) == ["HELLO, ALICE!", "HELLO, WORLD!"]
    for reply in lines:
        assert reply.tag == f"{{{ENVELOPE_NAMESPACE}}}message"
        assert reply.findtext(f"{{{ENVELOPE_NAMESPACE}}}meta/{{{ENVELOPE_NAMESPACE}}}to") == "boot"
    assert b"Traceback" not in result.stderr


def test_run_subcommand_with_stdin_lines_and_a_malformed_line() -> None:
    lines = b"\n".join([GREETING % b"Bob", b"<oops", b"", b"   ", GREETING % b"Eve", b""])
    result = cli("run", str(HELLO), "--input", "-", "--to", "greeter", "--no-boot", "--stats",
                 stdin=lines)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = replies(result.stdout)
    texts = [payload_text(r) for r in out]
    assert "HELLO, BOB!" in texts and "HELLO, EVE!" in texts
    huhs = [r for r in out if r[1].tag == "{https://xml-pipeline.org/ns/core/v1}huh"]
    assert len(huhs) == 1
    assert huhs[0][1].findtext("{https://xml-pipeline.org/ns/core/v1}code") == "malformed"
    assert b"greeter" in result.stderr and b"received" in result.stderr  # --stats table


def test_envelope_lines_from_a_file(tmp_path: Path) -> None:
    env = (
        f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>file-user</from><to>greeter</to>'
        "</meta>" + (GREETING % b"Zed").decode() + "</message>"
    )
    source = tmp_path / "input.xml"
    source.write_text(env + "\r\n" + env + "\n")
    result = cli(str(HELLO), "--input", str(source), "--no-boot")
    assert result.returncode == 0, result.stderr
    out = replies(result.stdout)
    assert [payload_text(r) for r in out] == ["HELLO, ZED!", "HELLO, ZED!"]
    assert {
        r.findtext(f"{{{ENVELOPE_NAMESPACE}}}meta/{{{ENVELOPE_NAMESPACE}}}to") for r in out
    } == {"file-user"}


def test_over_long_line_is_answered_and_reading_goes_on(tmp_path: Path) -> None:
    organism = tmp_path / "small.yaml"
    organism.write_text(
        HELLO.read_text().replace("listeners:", "pump: {max_message_bytes: 1000}\n\nlisteners:")
    )
    (tmp_path / "hello.py").write_text((ROOT / "organisms" / "hello.py").read_text())
    lines = GREETING % (b"x" * 5000) + b"\n" + GREETING % b"Ann" + b"\n"
    result = cli(str(organism), "--input", "-", "--to", "greeter", "--no-boot", stdin=lines)
    assert result.returncode == 0, result.stderr
    out = replies(result.stdout)
    codes = [r[1].findtext("{https://xml-pipeline.org/ns/core/v1}code") for r in out]
    assert codes[0] == "too-large"
    assert payload_text(out[1]) == "HELLO, ANN!"


def test_check_prints_the_routing_table() -> None:
    result = cli("check", str(HELLO))
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "{https://example.org/hello}Greeting  hello:Greeting  -> greeter" in text
    assert "{https://example.org/hello}Shout  hello:Shout  -> shouter" in text
    assert "peers shouter" in text


def test_schema_validates_real_payloads(tmp_path: Path) -> None:
    result = cli("schema", str(HELLO), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    organism = load_organism(HELLO)
    hello = sys.modules["hello"]
    samples = {
        "Greeting": hello.Greeting(name="Ann"),
        "Shout": hello.Shout(text="hi"),
        "Shouted": hello.Shouted(text="HI"),
    }
    assert {p.stem for p in tmp_path.glob("*.xsd")} == set(samples)
    for name, model in samples.items():
        schema = etree.XMLSchema(parse_trusted((tmp_path / f"{name}.xsd").read_bytes()))
        element = parse_trusted(etree.tostring(codec_for(type(model)).encode(model)))
        assert schema.validate(element), schema.error_log
        wrong = parse_trusted(
            f'<{name} xmlns="https://example.org/hello"><bogus/></{name}>'.encode()
        )
        assert not schema.validate(wrong)
    assert organism.name == "hello"
    stdout = cli("schema", str(HELLO)).stdout
    assert stdout.count(b"<xs:schema") == 3


def write_organism(tmp_path: Path, yaml_text: str, module: str = "") -> Path:
    path = tmp_path / "organism.yaml"
    path.write_text(textwrap.dedent(yaml_text))
    if module:
        (tmp_path / "handlers.py").write_text(textwrap.dedent(module))
    return path


HANDLERS = """
    from xml_pipeline import Payload, HandlerResponse

    class Ping(Payload):
        xml_ns = "urn:t"
        n: int

    async def echo(payload, meta):
        return HandlerResponse.respond(payload)
"""


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            """
            organism: {name: t}
            listeners:
              - name: a
                payload: handlers:Ping
                handler: handlers:echo
                colour: blue
            """,
            "listeners[0].colour (line 7): unknown key",
        ),
        (
            """
            organism: {name: t}
            listeners:
              - name: a
                payload: handlers:Ping
                handler: handlers:nope
            """,
            "listeners[0].handler (line 6): cannot import 'handlers:nope'",
        ),
        (
            """
            organism: {name: t}
            listeners:
              - name: a
                payload: handlers:Missing
                handler: handlers:echo
            """,
            "listeners[0].payload (line 5): cannot import 'handlers:Missing'",
        ),
        (
            """
            organism: {name: t}
            pump: {queue_size: 0}
            listeners: [{name: a, payload: handlers:Ping, handler: handlers:echo}]
            """,
            "pump.queue_size (line 3): Input should be greater than or equal to 1",
        ),
        (
            """
            organism: {name: t}
            listeners: [{name: a, payload: handlers:Ping, handler: handlers:echo, peers: [zz]}]
            """,
            "unknown peer 'zz'",
        ),
        ("organism: {name: t}\nlisteners: [\n", "invalid YAML (line 3)"),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = write_organism(tmp_path, yaml_text, HANDLERS)
    for command in ("run", "check", "schema"):
        result = cli(command, str(path))
        assert result.returncode == 2
        err = result.stderr.decode()
        assert err.count("\n") == 1, err
        assert err.startswith("xml_pipeline: error: ") and str(path) in err
        assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["NOPE.yaml"], b"cannot read"),
        ([str(HELLO), "--to", "nobody"], b"--to 'nobody' names no listener"),
        ([str(HELLO), "--input", "NOPE.txt"], b"NOPE.txt: cannot read"),
        ([str(HELLO), "--input", str(ROOT / "organisms")], b"organisms: cannot read"),
        ([str(HELLO), "--log-level", "chatty"], b"invalid choice"),
        (["check", str(HELLO), "--backend", "pigeon://x"], b"schemes available are memory://"),
        ([str(HELLO), "--sender", "a\x01b"], b"--sender must be printable"),
        ([str(HELLO), "--backend", "pigeon://x"], b"schemes available are memory://"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], expected: bytes) -> None:
    args = [str(tmp_path / a) if a.startswith("NOPE") else a for a in args]
    result = cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr and result.stderr.count(b"\n") == 1, result.stderr


# -- signals -------------------------------------------------------------------------


SLOW = """
    import asyncio
    from xml_pipeline import Payload, HandlerResponse

    class Ping(Payload):
        xml_ns = "urn:t"
        n: int

    async def echo(payload, meta):
        if payload.n < 0:
            await asyncio.sleep(-payload.n)
        return HandlerResponse.respond(payload)
"""


def start(path: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", str(path), "--input", "-", "--to", "e", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def send(proc: subprocess.Popen[bytes], n: int) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b'<Ping xmlns="urn:t"><n>%d</n></Ping>\n' % n)
    proc.stdin.flush()


def slow_organism(tmp_path: Path, drain: float) -> Path:
    return write_organism(
        tmp_path,
        f"""
        organism: {{name: slow}}
        pump: {{drain_timeout_s: {drain}}}
        listeners: [{{name: e, payload: handlers:Ping, handler: handlers:echo}}]
        """,
        SLOW,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_ingress_drains_and_exits_zero(tmp_path: Path, signum: int) -> None:
    proc = start(slow_organism(tmp_path, 10))
    try:
        send(proc, 1)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the reply proves the pump is up and serving
        assert b"<n>1</n>" in first
        send(proc, -1)  # a message that takes one second
        time.sleep(0.3)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"<n>-1</n>" in out, "the in-flight message was drained, not dropped"
    assert b"draining" in err and b"Traceback" not in err


def test_drain_timeout_then_exit(tmp_path: Path) -> None:
    proc = start(slow_organism(tmp_path, 0.5))
    try:
        send(proc, 1)
        assert proc.stdout is not None and b"<n>1</n>" in proc.stdout.readline()
        send(proc, -30)
        time.sleep(0.3)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        elapsed = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert elapsed < 15
    assert b"drain timeout" in err and b"dead-letter" in err


def test_second_signal_cancels_at_once(tmp_path: Path) -> None:
    proc = start(slow_organism(tmp_path, 60))
    try:
        send(proc, 1)
        assert proc.stdout is not None and b"<n>1</n>" in proc.stdout.readline()
        send(proc, -30)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "still draining after the first signal"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"second signal" in err and b"Traceback" not in err


def test_exits_when_stdin_closes(tmp_path: Path) -> None:
    proc = start(slow_organism(tmp_path, 10))
    try:
        out, err = proc.communicate(b'<Ping xmlns="urn:t"><n>4</n></Ping>', timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.count(b"\n") == 1 and b"<n>4</n>" in out


def test_closed_stdout_stops_quietly(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(b"\n".join(GREETING % f"p{i}".encode() for i in range(200)) + b"\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", str(HELLO), "--input", str(source), "--to",
         "greeter"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"<message")
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 0, err
    assert b"Traceback" not in err


def test_closed_stdin_and_unwritable_schema_dir_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", str(HELLO), "--input", "-"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd=ROOT, check=False,
        preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert result.returncode == 2 and b"standard input is closed" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("schema", str(HELLO), "--out", str(blocker / "dir"))
    assert result.returncode == 1 and result.stderr.count(b"\n") == 1
    assert b"Traceback" not in result.stderr


def test_dev_null_as_input_and_closed_stdout_at_start() -> None:
    result = cli(str(HELLO), "--input", "/dev/null")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    with open(os.devnull, "rb") as devnull:
        result = subprocess.run(
            [sys.executable, "-m", "xml_pipeline", str(HELLO), "--input", "-"],
            stdin=devnull, capture_output=True, timeout=30, cwd=ROOT, check=False,
        )  # fmt: skip
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", str(HELLO)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30, cwd=ROOT, check=False,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert result.returncode == 2 and b"standard output is closed" in result.stderr
