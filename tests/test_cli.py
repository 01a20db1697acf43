"""The command line, run as a real process: run, check, schema, errors, signals, exit statuses."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import os
import shlex
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_process import SIGNALS, CliProcess, closed_pipe, wait_for_file, wait_until
from lxml import etree

from xml_pipeline import ENVELOPE_NAMESPACE, load_organism
from xml_pipeline.cli import gc_tuning
from xml_pipeline.cli._writer import ReplyWriter
from xml_pipeline.parser import parse_trusted
from xml_pipeline.payload import codec_for

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "organisms" / "hello.yaml"
CORE = "https://xml-pipeline.org/ns/core/v1"
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


# -- signals and exit statuses --------------------------------------------------------


SLOW = """
    import asyncio
    from pathlib import Path
    from xml_pipeline import Payload, HandlerResponse

    STARTED = Path(__file__).with_name("started")

    class Ping(Payload):
        xml_ns = "urn:t"
        n: int

    class Mark(Payload):
        xml_ns = "urn:t"

    async def echo(payload, meta):
        if getattr(payload, "n", 0) < 0:
            with STARTED.open("a") as log:  # a readiness signal for the test
                log.write(f"{payload.n}\\n")
            await asyncio.sleep(-payload.n)
        return HandlerResponse.respond(payload)
"""


def start(path: Path, *extra: str) -> CliProcess:
    return CliProcess(path, "--input", "-", "--to", "e", *extra)


def send(proc: CliProcess, n: int) -> None:
    proc.send(b'<Ping xmlns="urn:t"><n>%d</n></Ping>\n' % n)


def slow_organism(tmp_path: Path, drain: float, backend: str = "") -> Path:
    return write_organism(
        tmp_path,
        f"""
        organism: {{name: slow}}
        {backend}
        pump: {{drain_timeout_s: {drain}}}
        listeners:
          - {{name: e, payload: handlers:Ping, handler: handlers:echo}}
          - {{name: m, payload: handlers:Mark, handler: handlers:echo}}
        """,
        SLOW,
    )


def wait_until_accepted(proc: CliProcess) -> None:
    """Wait until every message sent so far is inside the pump.

    Input is read in order: the reply to a marker sent last (to a listener of its
    own, so it waits behind nothing) shows that what came before it was accepted.
    """
    proc.send(
        f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>t</from><to>m</to></meta>'
        '<Mark xmlns="urn:t"/></message>\n'.encode()
    )
    line = proc.readline()
    if b"<Mark" not in line:
        raise RuntimeError(f"expected the marker's reply, got {line!r}")


def wait_until_started(tmp_path: Path, count: int = 1) -> None:
    """Wait until ``count`` slow messages are inside their handler."""
    started = tmp_path / "started"
    wait_until(
        lambda: started.exists() and started.read_text().count("\n") >= count,
        f"{count} slow message(s) in the handler",
    )


def summaries(err: bytes) -> list[str]:
    return [line for line in err.decode().splitlines() if "dead-letter" in line]


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_stops_ingress_drains_and_exits_zero(tmp_path: Path, signum: int) -> None:
    with start(slow_organism(tmp_path, 10)) as proc:
        send(proc, 1)
        assert b"<n>1</n>" in proc.readline()  # the reply proves the pump is up and serving
        send(proc, -1)  # a message that takes one second
        wait_until_started(tmp_path)
        proc.signal(signum)
        out, err = proc.finish(timeout=20)
    assert proc.returncode == 0, err
    assert b"<n>-1</n>" in out, "the in-flight message was drained, not dropped"
    assert b"draining" in err and b"Traceback" not in err
    assert not summaries(err)


def test_drain_timeout_exits_1_with_one_summary_line(tmp_path: Path) -> None:
    with start(slow_organism(tmp_path, 0.5)) as proc:
        send(proc, 1)
        assert b"<n>1</n>" in proc.readline()
        for _ in range(3):
            send(proc, -30)
        wait_until_accepted(proc)
        wait_until_started(tmp_path)  # at least one hangs in its handler (all 3 may not:
        # messages of different conversations share a listener's workers by hash)
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        out, err = proc.finish(timeout=20)
        elapsed = time.monotonic() - began
    assert proc.returncode == 1, (err, out)
    assert elapsed < 15
    lines = err.decode().splitlines()
    assert len(lines) == 2, err  # one line for the signal, one summary: not one per message
    assert lines[0].endswith("SIGTERM: stopping ingress, draining")
    (summary,) = summaries(err)
    assert summary == lines[1]
    assert "WARNING" in summary
    assert "3 accepted message(s) dead-lettered at shutdown" in summary, (summary, elapsed, out)
    assert "the drain timed out after 0.5 s" in summary and "code shutdown" in summary
    assert "memory:// keeps dead letters only while this process runs" in summary
    assert "Traceback" not in err.decode()


def test_drain_timeout_summary_says_how_to_read_the_letters(
    tmp_path: Path, redis_server: Any
) -> None:
    backend = f"backend: {redis_server.url}\n        redis: {{prefix: cli-{tmp_path.name}}}"
    path = slow_organism(tmp_path, 0.2, backend)
    with start(path) as proc:
        send(proc, 1)
        assert b"<n>1</n>" in proc.readline()
        send(proc, -30)
        send(proc, -31)
        wait_until_accepted(proc)
        wait_until_started(tmp_path)
        proc.signal(signal.SIGINT)
        _, err = proc.finish(timeout=20)
    assert proc.returncode == 1, err
    (summary,) = summaries(err)
    assert "2 accepted message(s) dead-lettered at shutdown" in summary
    assert f"they are kept in {redis_server.url}" in summary
    command = summary.split("read them with: ", 1)[1]
    assert command == f"python -m xml_pipeline deadletters {path} list"
    listed = cli(*shlex.split(command)[3:], "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(letter["code"] for letter in letters) == ["shutdown", "shutdown"]
    assert sorted(b"<n>-3" in letter["data"].encode() for letter in letters) == [True, True]


@pytest.mark.parametrize("signum", SIGNALS)
def test_second_signal_cancels_at_once_with_128_plus_signal(tmp_path: Path, signum: int) -> None:
    with start(slow_organism(tmp_path, 60)) as proc:
        send(proc, 1)
        assert b"<n>1</n>" in proc.readline()
        send(proc, -30)
        wait_until_started(tmp_path)
        proc.signal(signum)
        proc.wait_for_stderr(b"stopping ingress, draining")
        assert proc.running(), "still draining after the first signal"
        began = time.monotonic()
        proc.signal(signum)
        _, err = proc.finish(timeout=20)
        elapsed = time.monotonic() - began
    assert proc.returncode == 128 + signum, err  # 130 for SIGINT, 143 for SIGTERM
    assert elapsed < 10
    assert b"second signal" in err and b"Traceback" not in err
    (summary,) = summaries(err)
    assert (
        "1 accepted message(s) dead-lettered at shutdown (cancelled by a second signal" in summary
    )


def test_exits_zero_when_stdin_closes(tmp_path: Path) -> None:
    with start(slow_organism(tmp_path, 10)) as proc:
        proc.send(b'<Ping xmlns="urn:t"><n>4</n></Ping>')
        out, err = proc.finish(timeout=20)
    assert proc.returncode == 0, err
    assert err == b""
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


# -- stdout: a slow reader, a full disk ---------------------------------------------

CLOG = """
    import asyncio
    import time
    from pathlib import Path
    from xml_pipeline import Payload, HandlerResponse

    HERE = Path(__file__).parent

    class Blob(Payload):
        xml_ns = "urn:t"
        n: int
        text: str

    class Tick(Payload):
        xml_ns = "urn:t"
        n: int

    class Hang(Payload):
        xml_ns = "urn:t"
        n: int

    async def echo(payload, meta):
        return HandlerResponse.respond(payload)

    async def tick(payload, meta):
        began = time.monotonic()
        await asyncio.sleep(0.2)
        (HERE / "tick").write_text(f"{time.monotonic() - began}")
        return HandlerResponse.respond(payload)

    async def hang(payload, meta):
        began = time.monotonic()
        try:
            await asyncio.sleep(60)
        finally:
            (HERE / "hang").write_text(f"{time.monotonic() - began}")
"""


def unread_bytes(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def test_a_slow_reader_of_stdout_stalls_neither_timers_nor_timeouts(tmp_path: Path) -> None:
    path = write_organism(
        tmp_path,
        """
        organism: {name: clog}
        listeners:
          - {name: echo, payload: handlers:Blob, handler: handlers:echo}
          - {name: tick, payload: handlers:Tick, handler: handlers:tick}
          - {name: hang, payload: handlers:Hang, handler: handlers:hang, timeout_s: 0.3}
        """,
        CLOG,
    )
    count = 200  # replies of 8 kB each: far more than the pipe to this test holds
    blob = b'<Blob xmlns="urn:t"><n>%d</n><text>' + b"x" * 8000 + b"</text></Blob>\n"
    with CliProcess(path, "--input", "-", "--no-boot") as proc:
        for n in range(count):
            proc.send(blob % n)
        assert proc.proc.stdout is not None
        fd = proc.proc.stdout.fileno()
        capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        # The test reads nothing: wait until the pipe is full and the writer is stuck.
        wait_until(lambda: unread_bytes(fd) > capacity - 9000, "stdout pipe full")
        proc.send(b'<Tick xmlns="urn:t"><n>1</n></Tick>\n<Hang xmlns="urn:t"><n>2</n></Hang>\n')
        slept = float(wait_for_file(tmp_path / "tick", timeout=20))
        hung = float(wait_for_file(tmp_path / "hang", timeout=20))
        assert unread_bytes(fd) > capacity - 9000, "the reader still has not read"
        assert slept < 1.0, "a 0.2 s timer fired late"
        # uvloop's clock is read once per loop turn, in ms: a hair early is on time.
        assert 0.28 <= hung < 1.5, "the handler's timeout_s fired late"
        out, err = proc.finish(timeout=30)
    assert proc.returncode == 0, err
    lines = replies(out)
    blobs = sorted(int(r[1].findtext("{urn:t}n") or -1) for r in lines if r[1].tag == "{urn:t}Blob")
    assert blobs == list(range(count)), "nothing is lost once the reader resumes"
    assert [r[1].tag for r in lines if r[1].tag != "{urn:t}Blob"].count("{urn:t}Tick") == 1
    codes = [r[1].findtext(f"{{{CORE}}}code") for r in lines if r[1].tag == f"{{{CORE}}}huh"]
    assert codes == ["timeout"]


def test_a_write_error_on_stdout_stops_with_status_1() -> None:
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "xml_pipeline", str(HELLO)],
            stdout=full, stderr=subprocess.PIPE, timeout=30, cwd=ROOT, check=False,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert b"cannot write to standard output (No space left on device): stopping" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["schema", "check"])
def test_closed_stdout_or_a_reader_gone_is_one_line(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", command, str(HELLO)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30, cwd=ROOT, check=False,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == b"xml_pipeline: error: standard output is closed\n"
    gone = closed_pipe()  # like `| head -1` once head has exited
    try:
        result = subprocess.run(
            [sys.executable, "-m", "xml_pipeline", command, str(HELLO)],
            stdout=gone, stderr=subprocess.PIPE, timeout=30, cwd=ROOT, check=False,
        )  # fmt: skip
    finally:
        os.close(gone)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(b"\n") == 1, result.stderr
    assert result.stderr.endswith(
        b"WARNING xml_pipeline.cli: standard output is closed: stopping\n"
    )


# -- usage errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "give an organism file to run, such as: python -m xml_pipeline organisms/hello.yaml"),
        (["run"], "run: missing the organism file (usage: python -m xml_pipeline run ORGANISM"),
        (["check"], "check: missing the organism file (usage: python -m xml_pipeline check "),
        (["schema"], "schema: missing the organism file"),
        (["bench"], "bench: missing the organism file"),
        (["deadletters"], "deadletters: missing the organism file and the action (list, replay"),
        (["deadletters", str(HELLO)],
         "deadletters: missing the action (list, replay, purge, unanswered or replay-unanswered)"),
        (["deadletters", str(HELLO), "frob"],
         "deadletters: 'frob' is not a valid action; choose from 'list', 'replay', 'purge', "
         "'unanswered', 'replay-unanswered'"),
        (["manager"], "manager: missing --address (usage: python -m xml_pipeline manager "),
        ([str(HELLO), "--frob"], "run: unknown option --frob (see python -m xml_pipeline run"),
        (["check", str(HELLO), "extra"], "check: unexpected argument 'extra'"),
        ([str(HELLO), "--input"], "run: --input needs a value"),
        ([str(HELLO), "--framing", "json"], "argument --framing: invalid choice: 'json'"),
        ([str(HELLO), "--framing", "xml"], "--framing applies to --input"),
        ([str(HELLO), "--workers", "two"], "argument --workers: expected a whole number"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_in_the_users_terms(args: list[str], expected: str) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode()
    assert err.startswith(f"xml_pipeline: error: {expected}"), err
    assert err.count("\n") == 1, err
    for internal in ("argument command", "arguments are required", "Traceback"):
        assert internal not in err, err


# -- GC tuning is the application's ----------------------------------------------------

GC_HANDLERS = """
    import gc
    from xml_pipeline import Payload, HandlerResponse

    class Ping(Payload):
        xml_ns = "urn:t"
        n: int

    async def threshold(payload, meta):
        return HandlerResponse.respond(Ping(n=gc.get_threshold()[0]))
"""


@pytest.mark.parametrize("setting", ["12345", "null"])
def test_run_applies_the_gc_threshold_of_the_organism(tmp_path: Path, setting: str) -> None:
    path = write_organism(
        tmp_path,
        f"""
        organism: {{name: gc}}
        pump: {{gc_threshold: {setting}}}
        listeners: [{{name: g, payload: handlers:Ping, handler: handlers:threshold}}]
        """,
        GC_HANDLERS,
    )
    result = cli(
        str(path), "--input", "-", "--to", "g", stdin=b'<Ping xmlns="urn:t"><n>0</n></Ping>'
    )
    assert result.returncode == 0, result.stderr
    (reply,) = replies(result.stdout)
    default = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_threshold()[0])"],
                             capture_output=True, check=True).stdout  # fmt: skip
    expected = 12345 if setting != "null" else int(default)
    assert reply[1].findtext("{urn:t}n") == str(expected)


def test_gc_tuning_restores_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, before[1], before[2])
        with gc_tuning(50_000):
            assert gc.get_threshold() == (50_000, before[1], before[2])
        assert gc.get_threshold() == (700, before[1], before[2])
        with gc_tuning(None):
            assert gc.get_threshold()[0] == 700
        gc.set_threshold(90_000, before[1], before[2])
        with gc_tuning(50_000):  # a higher threshold already in place is kept
            assert gc.get_threshold()[0] == 90_000
        with pytest.raises(RuntimeError), gc_tuning(50_000):
            raise RuntimeError
        assert gc.get_threshold()[0] == 90_000
    finally:
        gc.set_threshold(*before)


# -- the reply writer, in process on asyncio and uvloop ------------------------------


def small_pipe() -> tuple[int, int, int]:
    """A pipe shrunk to one page: (read end, write end, capacity)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    return read_end, write_end, fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)


async def test_reply_writer_waits_for_the_reader_and_loses_nothing() -> None:
    read_end, write_end, capacity = small_pipe()
    errors: list[OSError] = []
    try:
        writer = ReplyWriter(write_end, errors.append, high_water=2000, low_water=500)
        chunks = [bytes([65 + n % 26]) * 700 for n in range(40)]  # 28 kB: 7 pipes full
        waits = [writer.write(chunk) for chunk in chunks]
        blocked = [w for w in waits if w is not None]
        assert waits[0] is None and blocked, "past high_water, write() returns a wait"
        tasks = [asyncio.ensure_future(w) for w in blocked]
        # Nothing is read yet: the pipe fills, and the waits stay pending meanwhile.
        await wait_until_async(lambda: unread_bytes(read_end) == capacity, "pipe full")
        assert not any(task.done() for task in tasks)
        received = bytearray()
        loop = asyncio.get_running_loop()
        while len(received) < sum(map(len, chunks)):
            received += await loop.run_in_executor(None, os.read, read_end, 65536)
        await asyncio.gather(*tasks)  # the reader caught up: every wait is over
        assert bytes(received) == b"".join(chunks), "in order, nothing lost"
        await writer.aclose()
        assert errors == []
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_reply_writer_stays_blocked_when_it_fills_up_again_before_the_loop_runs() -> None:
    """The thread's "room again" must not reopen a buffer that filled up meanwhile."""
    read_end, write_end, capacity = small_pipe()
    errors: list[OSError] = []
    try:
        writer = ReplyWriter(write_end, errors.append, high_water=100, low_water=50)
        first = writer.write(b"x" * capacity)  # blocked; the thread fills the pipe exactly
        assert first is not None
        # Without yielding to the loop: the thread wrote it all and asked the loop to
        # open the room; then the buffer fills up again before that request runs.
        # (A blocking poll on purpose: the loop must not run in between.)
        wait_until(lambda: not writer._blocked, "room decided", timeout=10)
        assert unread_bytes(read_end) == capacity
        second = writer.write(b"y" * 200)
        assert second is not None
        await asyncio.sleep(0)  # the loop runs the thread's request now
        await asyncio.sleep(0)
        third = writer.write(b"z" * 200)
        assert third is not None
        waiting = asyncio.ensure_future(third)
        await asyncio.sleep(0)
        assert not writer._room.is_set(), "the buffer is over high_water: no room"
        assert not waiting.done()
        loop = asyncio.get_running_loop()
        received = 0
        while received < capacity + 400:
            received += len(await loop.run_in_executor(None, os.read, read_end, 65536))
        await asyncio.gather(first, second, waiting)
        await writer.aclose()
        assert errors == []
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_reply_writer_reports_a_reader_gone_and_refuses_more() -> None:
    read_end, write_end, _ = small_pipe()
    os.close(read_end)
    errors: list[OSError] = []
    try:
        writer = ReplyWriter(write_end, errors.append)
        assert writer.write(b"<reply/>\n") is None  # queued: the thread finds out
        await wait_until_async(lambda: bool(errors), "the write error reported")
        assert isinstance(errors[0], BrokenPipeError)
        with pytest.raises(BrokenPipeError):
            writer.write(b"<another/>\n")
        await writer.aclose()
    finally:
        os.close(write_end)


async def wait_until_async(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)
