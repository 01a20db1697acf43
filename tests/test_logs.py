"""--log-format json: one JSON object per stderr line from the real command line, with
the delivery a record concerns; the text format unchanged; hostile text stays valid."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from lxml import etree
from support import Ping, Pong, ping_xml

from xml_pipeline import (
    ENVELOPE_NAMESPACE,
    HandlerMetadata,
    HandlerResponse,
    Listener,
    Organism,
    StreamPump,
)
from xml_pipeline.cli import _parser
from xml_pipeline.log import DELIVERY_FIELDS, JsonFormatter

HANDLERS = textwrap.dedent("""\
    import logging
    from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

    log = logging.getLogger("app.handlers")
    NS = "https://example.org/logs"

    class Ask(Payload):
        xml_ns = NS
        text: str

    class Told(Payload):
        xml_ns = NS
        text: str

    async def front(payload: Ask, meta: HandlerMetadata):
        # Hostile text: a newline, NUL, an escape sequence and a lone surrogate.
        log.warning("front saw %s\\nsecond line \\x00\\x1b[31m \\udcff end", payload.text)
        if payload.text == "fail":
            raise RuntimeError("boom\\nsecond line of the error")
        return HandlerResponse(Told(text=payload.text), to="upper")

    def upper(payload: Told, meta: HandlerMetadata):
        log.warning("upper (a sync handler, in a thread) saw %s", payload.text)
        return HandlerResponse.respond(Told(text=payload.text.upper()))

    async def back(payload: Told, meta: HandlerMetadata):
        return HandlerResponse.respond(payload)
""")
ORGANISM = textwrap.dedent("""\
    organism: {name: logs}
    listeners:
      - name: front
        payload: log_handlers:Ask
        handler: log_handlers:front
        peers: [upper]
      - name: upper
        payload: log_handlers:Told
        handler: log_handlers:upper
    boot:
      - {to: front, payload: '<Ask xmlns="https://example.org/logs"><text>hi</text></Ask>'}
      - {to: front, payload: '<Ask xmlns="https://example.org/logs"><text>fail</text></Ask>'}
""")
META = f"{{{ENVELOPE_NAMESPACE}}}meta"


def organism_file(folder: Path) -> Path:
    (folder / "log_handlers.py").write_text(HANDLERS)
    path = folder / "logs.yaml"
    path.write_text(ORGANISM)
    return path


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xml_pipeline", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def replies(stdout: str) -> list[dict[str, str]]:
    """The <meta> of each reply on stdout, as {tag: text} (a Huh's text may hold a
    newline: the replies are read as one document)."""
    found = []
    for message in etree.fromstring(f"<replies>{stdout}</replies>".encode()):
        meta = message.find(META)
        if meta is None:
            raise ValueError(f"a reply without <meta>: {etree.tostring(message)!r}")
        found.append({etree.QName(el).localname: el.text or "" for el in meta})
    return found


def test_run_writes_one_json_object_per_line_naming_the_delivery(tmp_path: Path) -> None:
    # (At DEBUG, the pump adds the traceback to a handler's failure.)
    done = run_cli(organism_file(tmp_path), "--log-format", "json", "--log-level", "debug")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines, "nothing was logged"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        when = datetime.datetime.fromisoformat(record["time"])
        assert when.utcoffset() == datetime.timedelta(0)
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")

    answers = {r["re"]: r for r in replies(done.stdout)}
    # The pump's own line about the failed delivery, with its traceback in one field.
    (failed,) = [r for r in records if r["message"].startswith("handler of front raised")]
    assert failed["logger"] == "xml_pipeline.pump" and failed["level"] == "WARNING"
    assert failed["listener"] == "front"
    assert "boom\nsecond line of the error" in failed["message"]
    assert "RuntimeError: boom" in failed["exception"]
    assert failed["exception"].startswith("Traceback (most recent call last):")
    # Its ids are those of the conversation the caller got the Huh in.
    huh = answers[failed["message_id"]]
    assert failed["conversation"] == huh["thread"]
    assert failed["frame"] != failed["conversation"]  # the listener's frame, a child

    # The handlers' own lines carry their delivery too, async and sync alike.
    front = [r for r in records if r["logger"] == "app.handlers" and "front saw" in r["message"]]
    assert len(front) == 2
    for record in front:
        assert record.keys() >= {*DELIVERY_FIELDS}
        assert record["listener"] == "front"
        # Hostile text survives as text; the lone surrogate became U+FFFD.
        assert "\nsecond line \x00\x1b[31m \ufffd end" in record["message"]
    assert {r["message_id"] for r in front} == set(answers)
    (upper,) = [r for r in records if r["logger"] == "app.handlers" and "upper" in r["message"]]
    assert upper["listener"] == "upper"
    hi = next(r for r in front if "saw hi" in r["message"])
    assert upper["conversation"] == hi["conversation"] == answers[hi["message_id"]]["thread"]
    assert upper["frame"] not in (hi["frame"], hi["conversation"])
    assert upper["message_id"] != hi["message_id"]  # the message front forwarded

    # Records that concern no delivery have no delivery fields.
    (started,) = [r for r in records if "is running" in r["message"]]
    assert started["logger"] == "xml_pipeline.cli"
    assert not started.keys() & {*DELIVERY_FIELDS}


def test_text_format_is_unchanged_by_default(tmp_path: Path) -> None:
    done = run_cli(organism_file(tmp_path))
    assert done.returncode == 0, done.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.search(rf"^{stamp} WARNING app\.handlers: front saw hi$", done.stderr, re.M)
    assert re.search(
        rf"^{stamp} WARNING xml_pipeline\.pump: handler of front raised RuntimeError: boom$",
        done.stderr, re.M,
    )  # fmt: skip
    assert "{" not in done.stderr


def test_every_command_with_log_level_takes_log_format() -> None:
    sub = next(
        a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)
    )  # fmt: skip
    with_level = []
    for name, parser in sub.choices.items():
        options = {o for action in parser._actions for o in action.option_strings}
        if "--log-level" in options:
            with_level.append(name)
            assert "--log-format" in options, name
    assert {"run", "bench", "deadletters", "send", "status"} <= set(with_level)


def test_a_bad_log_format_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli(organism_file(tmp_path), "--log-format", "xml")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--log-format" in done.stderr


def format_record(**kwargs: Any) -> str:
    defaults: dict[str, Any] = {"name": "x", "level": logging.ERROR, "pathname": __file__,
                                "lineno": 1, "args": (), "exc_info": None}  # fmt: skip
    record = logging.LogRecord(**{**defaults, **kwargs})
    return JsonFormatter().format(record)


def test_hostile_records_are_one_valid_line_of_ascii() -> None:
    try:
        raise ValueError("bad\r\nvalue \udc80 \u2028 end")
    except ValueError:
        exc_info = sys.exc_info()
    hostile = "a\nb\r\x00\x07\x1b[2J\ud800\udfff \U0001f600 \u2028 Grüße"
    lines = [
        format_record(msg=hostile),
        format_record(msg="%s and %d", args=(hostile, 3), exc_info=exc_info),
        format_record(msg="%d %d", args=("not a number",)),  # a broken call is still logged
        format_record(msg=b"invalid \xff\xfe utf-8\n"),  # not a str
        format_record(msg="stack", sinfo="Stack (most recent call last):\n  line\udcff"),
    ]
    for line in lines:
        assert "\n" not in line and "\r" not in line and "\u2028" not in line
        assert line.isascii()
        record = json.loads(line)
        for value in record.values():
            value.encode("utf-8")  # no lone surrogate survives
    first = json.loads(lines[0])
    assert first["message"] == "a\nb\r\x00\x07\x1b[2J\ufffd\ufffd \U0001f600 \u2028 Grüße"
    second = json.loads(lines[1])
    assert second["message"].endswith(" and 3")
    assert "ValueError: bad\r\nvalue \ufffd \u2028 end" in second["exception"]
    assert "not a number" in json.loads(lines[2])["message"]
    assert json.loads(lines[4])["stack"].endswith("line\ufffd")


async def chatty(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    logging.getLogger("tests.logs.handler").warning("handling %d", payload.n)
    return HandlerResponse.respond(Pong(n=payload.n))


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_the_pump_sets_the_log_context_only_when_asked() -> None:
    logger = logging.getLogger("tests.logs.handler")
    capture = Capture()
    logger.addHandler(capture)
    try:
        organism = Organism(name="t", listeners=(Listener("chatty", (Ping,), chatty),))
        for wanted in (False, True):
            capture.lines.clear()
            async with StreamPump(organism, log_context=wanted) as pump:
                reply = await pump.request(ping_xml(7), to="chatty")
            assert isinstance(reply.payload, Pong)
            (line,) = capture.lines
            assert line["message"] == "handling 7"
            if wanted:
                assert line["listener"] == "chatty" and line["conversation"] == reply.thread_id
                assert line["message_id"] == reply.re
            else:
                assert not line.keys() & {*DELIVERY_FIELDS}
        # Outside a delivery, nothing is set.
        logger.warning("outside")
        assert not capture.lines[-1].keys() & {*DELIVERY_FIELDS}
    finally:
        logger.removeHandler(capture)
