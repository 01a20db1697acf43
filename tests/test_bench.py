"""The bench command: every example organism, --json, --input, --duration, errors, TTY."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from cli_process import SIGNALS, CliProcess, wait_until

from xml_pipeline import ENVELOPE_NAMESPACE, load_organism
from xml_pipeline.cli.bench import BenchMessage, BenchOptions, run_bench

ROOT = Path(__file__).resolve().parent.parent
ORGANISMS = ROOT / "organisms"
GREETING = '<Greeting xmlns="https://example.org/hello"><name>{}</name></Greeting>'
TABLE_ROWS = ("messages/s", "hops/s", "latency ms", "errors", "CPU s", "peak RSS MB")
JSON_KEYS = {
    "organism", "organism_file", "date", "xml_pipeline", "python", "implementation",
    "machine", "cpus", "loop", "options", "interrupted", "messages", "replied", "ok",
    "errors", "elapsed_s", "msgs_per_s", "hops", "hops_per_s", "hops_per_message",
    "latency_ms", "cpu_s", "workers_cpu_s", "peak_rss_mb", "workers_peak_rss_mb",
    "listeners", "pump", "pool",
}  # fmt: skip


def bench(
    *args: str | Path, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xml_pipeline", "bench", *map(str, args)],
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def check_table(stdout: str, organism: str, messages: int) -> None:
    lines = stdout.splitlines()
    labels = {line.split("  ")[0].strip() for line in lines}
    for row in TABLE_ROWS:
        assert row in labels, stdout
    assert any(line.startswith("listener ") for line in lines), stdout
    summary = lines[-1]
    assert summary.startswith(f"bench {organism} {messages} msgs "), summary
    for figure in ("msg/s", "hops/s", "p50", "p99"):
        assert figure in summary


def check_report(report: dict[str, Any], messages: int) -> None:
    assert set(report) == JSON_KEYS
    errors = report["errors"]
    assert report["messages"] == messages
    assert report["ok"] == messages, errors
    assert report["replied"] == report["ok"] + errors["huh"]
    assert messages == (
        report["replied"] + errors["rejected"] + errors["timeouts"] + errors["no_reply"]
        + errors["abandoned"]
    )  # fmt: skip
    assert report["hops"] >= messages
    assert report["hops"] == sum(s["received"] for s in report["listeners"].values())
    assert report["elapsed_s"] > 0
    assert report["msgs_per_s"] == pytest.approx(messages / report["elapsed_s"])
    assert report["hops_per_s"] == pytest.approx(report["hops"] / report["elapsed_s"])
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["cpu_s"]["total"] == pytest.approx(
        report["cpu_s"]["user"] + report["cpu_s"]["system"]
    )
    assert report["peak_rss_mb"] > 10
    assert report["pump"]["ingress"] == messages
    assert report["pump"]["egress"] >= messages
    assert not report["interrupted"]
    assert report["options"]["messages"] == messages


# -- every example organism --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "messages", "hops_per_message"),
    [("hello", 200, 3), ("relay", 200, 5), ("shared", 200, 1), ("wordcount", 8, 3)],
)
def test_bench_runs_every_example_organism(
    tmp_path: Path, name: str, messages: int, hops_per_message: int
) -> None:
    out = tmp_path / "bench.json"
    result = bench(ORGANISMS / f"{name}.yaml", "--messages", messages, "--json", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not a terminal: no progress bar, and no warnings
    report = json.loads(out.read_text())
    check_table(result.stdout, report["organism"], messages)
    check_report(report, messages)
    assert report["hops"] == messages * hops_per_message
    assert report["options"]["source"] == "boot"
    if name == "wordcount":  # cpu_bound: the workers' CPU is counted apart
        assert report["pool"]["tasks"] == messages
        assert report["options"]["workers"] == 2
        assert report["workers_cpu_s"] > 0.2  # ~65 ms of hashing per message
        assert report["cpu_s"]["total"] < report["workers_cpu_s"]
        assert report["pool"]["worker_cpu_s"] >= report["workers_cpu_s"]
        assert report["workers_peak_rss_mb"] > 10  # read while the workers were alive
        assert "workers CPU s" in result.stdout and "workers RSS MB" in result.stdout
    else:
        assert report["pool"] is None and report["workers_cpu_s"] is None
        assert "workers CPU s" not in result.stdout


def test_bench_hello_on_redis(redis_server: Any, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = bench(ORGANISMS / "hello_redis.yaml", "--backend", redis_server.url,
                   "--messages", 200, "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    check_table(result.stdout, "hello-redis", 200)
    check_report(report, 200)
    assert report["options"]["backend"] == redis_server.url


def test_unreachable_backend_is_one_line(tmp_path: Path) -> None:
    result = bench(ORGANISMS / "hello_redis.yaml", "--backend", "redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("xml_pipeline: error: ")
    assert result.stderr.count("\n") == 1


# -- options -------------------------------------------------------------------------


def test_input_file_of_bare_payloads_and_envelopes(tmp_path: Path) -> None:
    envelope = (
        f'<message xmlns="{ENVELOPE_NAMESPACE}"><meta><from>file-user</from><to>greeter</to>'
        f"<thread>not-a-known-thread</thread><id>same-id</id></meta>"
        f"{GREETING.format('Env')}</message>"
    )
    source = tmp_path / "input.xml"
    source.write_text(f"{GREETING.format('Bob')}\r\n\n   \n{GREETING.format('Eve')}\n{envelope}\n")
    out = tmp_path / "bench.json"
    result = bench(ORGANISMS / "hello.yaml", "--input", source, "--to", "greeter", "--messages", 90,
                   "--concurrency", 8, "--loop", "asyncio", "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    # The envelope's <thread> and <id> are dropped: every replay is a new conversation,
    # not a retry ignored as a duplicate.
    check_report(report, 90)
    assert report["pump"]["duplicates"] == 0
    assert report["hops"] == 90 * 3
    assert report["loop"] == "asyncio"
    opts = report["options"]
    assert (opts["source"], opts["distinct_messages"], opts["to"]) == ("input", 3, "greeter")
    assert (opts["concurrency"], opts["input"]) == (8, str(source))
    assert "3 line(s) of" in result.stdout


def test_input_from_stdin_counts_refused_lines(tmp_path: Path) -> None:
    lines = f"{GREETING.format('Bob')}\nnot xml\n".encode()
    out = tmp_path / "bench.json"
    result = bench(ORGANISMS / "hello.yaml", "--input", "-", "--to", "greeter",
                   "--messages", 40, "--json", out, stdin=lines)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["messages"] == 40
    assert report["ok"] == 20
    assert report["errors"]["rejected"] == 20
    assert report["errors"]["codes"] == {"malformed": 20}
    assert "rejected 20" in result.stdout


def test_duration_stops_injecting(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    started = time.monotonic()
    result = bench(ORGANISMS / "relay.yaml", "--duration", "0.5", "--json", out)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["options"]["messages"] is None
    assert report["options"]["duration_s"] == 0.5
    assert 0.5 <= report["elapsed_s"] < 5
    assert took < 15
    assert report["messages"] > 0
    assert report["ok"] == report["messages"]
    assert report["hops"] == 5 * report["messages"]
    check_table(result.stdout, "relay", report["messages"])


def test_duration_and_messages_stop_at_the_first_reached(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = bench(ORGANISMS / "relay.yaml", "--duration", "30", "--messages", 50, "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["messages"] == 50
    assert report["elapsed_s"] < 10


def test_workers_option(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = bench(ORGANISMS / "wordcount.yaml", "--messages", 4, "--workers", 1, "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["options"]["workers"] == report["pool"]["workers"] == 1
    assert report["ok"] == 4


# -- errors --------------------------------------------------------------------------


@pytest.fixture
def no_boot(tmp_path: Path) -> Path:
    path = tmp_path / "quiet.yaml"
    path.write_text(textwrap.dedent("""\
        organism:
          name: quiet
        listeners:
          - name: greeter
            payload: [hello:Greeting, hello:Shouted]
            handler: hello:handle_greeting
            peers: [shouter]
          - name: shouter
            payload: hello:Shout
            handler: hello:shout
        """))  # fmt: skip
    (tmp_path / "hello.py").write_text((ORGANISMS / "hello.py").read_text())
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--messages", "0"], "argument --messages: must be at least 1"),
        (["--messages", "ten"], "argument --messages: expected a whole number"),
        (["--concurrency", "-3"], "argument --concurrency: must be at least 1"),
        (["--duration", "0"], "argument --duration: must be a positive number"),
        (["--timeout", "nan"], "argument --timeout: must be a positive number"),
        (["--workers", "0"], "argument --workers: must be at least 1"),
        (["--loop", "trio"], "argument --loop: invalid choice"),
        (["--to", "nobody"], "--to 'nobody' names no listener"),
        (["--input", "missing.xml"], "--input missing.xml: cannot read"),
        (["--input", "organisms"], "--input organisms: cannot read"),
        (["--input", os.devnull], f"--input {os.devnull}: no messages in it"),
        (["--json", "no/such/folder/out.json"], "--json no/such/folder/out.json: cannot write"),
    ],
)
def test_errors_are_one_line_and_status_2(args: list[str], message: str) -> None:
    result = bench(ORGANISMS / "hello.yaml", *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"xml_pipeline: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_organism_without_boot_messages_needs_input(no_boot: Path) -> None:
    result = bench(no_boot)
    assert result.returncode == 2
    assert result.stderr.startswith("xml_pipeline: error: ")
    assert "no boot messages" in result.stderr and "--input" in result.stderr
    assert result.stderr.count("\n") == 1
    source = no_boot.parent / "in.xml"
    source.write_text(GREETING.format("Ann") + "\n")
    result = bench(no_boot, "--input", source, "--to", "greeter", "--messages", 20)
    assert result.returncode == 0, result.stderr
    check_table(result.stdout, "quiet", 20)


def test_missing_organism_and_missing_argument() -> None:
    for args in (["organisms/nope.yaml"], []):
        result = bench(*args)
        assert result.returncode == 2
        assert result.stderr.startswith("xml_pipeline: error: ")
        assert result.stderr.count("\n") == 1


# -- terminal and signals ------------------------------------------------------------


def test_progress_bar_only_on_a_terminal() -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "xml_pipeline", "bench", "organisms/relay.yaml",
             "--duration", "0.7"],
            stdout=subprocess.PIPE, stderr=terminal, cwd=ROOT,
        )  # fmt: skip
        os.close(terminal)
        terminal = -1
        seen = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the terminal's other end closed
                    break
                if not chunk:
                    break
                seen += chunk
            elif process.poll() is not None:
                break
        stdout, _ = process.communicate(timeout=30)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert process.returncode == 0
    assert b"\r[#" in seen and b" msg/s" in seen  # the bar, redrawn in place
    assert seen.endswith(b"\r")  # and wiped at the end
    assert b"bench relay " in stdout  # the table still goes to stdout


READY = """
import asyncio
from pathlib import Path

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

HERE = Path(__file__).parent


class Job(Payload):
    xml_ns = "https://example.org/bench-ready"
    n: int = 0


async def work(payload: Job, meta: HandlerMetadata) -> HandlerResponse:
    (HERE / "ready").touch()  # the bench is sending: a readiness signal for the test
    if payload.n < 0:
        (HERE / "stuck").touch()
        await asyncio.sleep(-payload.n)
    return HandlerResponse.respond(payload)
"""


def ready_organism(tmp_path: Path, n: int) -> Path:
    (tmp_path / "bench_ready_handlers.py").write_text(READY)
    path = tmp_path / "ready.yaml"
    path.write_text(textwrap.dedent(f"""\
        organism:
          name: ready
        listeners:
          - name: worker
            payload: bench_ready_handlers:Job
            handler: bench_ready_handlers:work
        boot:
          - to: worker
            payload: '<Job xmlns="https://example.org/bench-ready"><n>{n}</n></Job>'
        """))  # fmt: skip
    return path


@pytest.mark.parametrize("signum", SIGNALS)
def test_first_signal_stops_injecting_and_reports(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "bench.json"
    with CliProcess("bench", ready_organism(tmp_path, 1), "--duration", "60",
                    "--json", out) as process:  # fmt: skip
        wait_for_file_to_exist(tmp_path / "ready")
        process.signal(signum)
        stdout, stderr = process.finish(timeout=30)
    assert process.returncode == 0, stderr
    name = signal.Signals(signum).name
    assert stderr.decode() == (
        f"xml_pipeline: {name}: stopping; waiting for the messages in flight "
        "(a second signal stops at once)\n"
    )
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert report["messages"] > 0 and report["ok"] == report["messages"]
    assert b"(interrupted)" in stdout


@pytest.mark.parametrize("signum", SIGNALS)
def test_second_signal_stops_at_once_with_128_plus_signal(tmp_path: Path, signum: int) -> None:
    with CliProcess("bench", ready_organism(tmp_path, -60), "--messages", "5",
                    "--timeout", "120") as process:  # fmt: skip
        wait_for_file_to_exist(tmp_path / "stuck")
        process.signal(signum)
        process.wait_for_stderr(b"waiting for the messages in flight")
        assert process.running()
        process.signal(signum)
        stdout, stderr = process.finish(timeout=30)
    assert process.returncode == 128 + signum, stderr  # 130 for SIGINT, 143 for SIGTERM
    assert stdout == b""
    assert stderr.endswith(b"xml_pipeline: error: interrupted twice: stopped without results\n")
    assert b"Traceback" not in stderr


def test_bench_applies_the_gc_threshold_of_the_organism(tmp_path: Path) -> None:
    (tmp_path / "bench_gc_handlers.py").write_text(textwrap.dedent("""\
        import gc
        from pathlib import Path
        from xml_pipeline import HandlerResponse, Payload

        class Job(Payload):
            xml_ns = "https://example.org/bench-gc"
            n: int = 0

        async def work(payload, meta):
            Path(__file__).with_name("threshold").write_text(str(gc.get_threshold()[0]))
            return HandlerResponse.respond(payload)
        """))  # fmt: skip
    path = tmp_path / "gc.yaml"
    path.write_text(textwrap.dedent("""\
        organism: {name: gc}
        pump: {gc_threshold: 23456}
        listeners: [{name: w, payload: bench_gc_handlers:Job, handler: bench_gc_handlers:work}]
        boot: [{to: w, payload: '<Job xmlns="https://example.org/bench-gc"/>'}]
        """))  # fmt: skip
    result = bench(path, "--messages", 3)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "threshold").read_text() == "23456"


def wait_for_file_to_exist(path: Path) -> None:
    wait_until(path.exists, f"file {path}")


# -- in process, on asyncio and uvloop -----------------------------------------------


SINK = """
from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/bench-sink"


class Drop(Payload):
    xml_ns = NS
    text: str = ""


async def sink(payload: Drop, meta: HandlerMetadata) -> HandlerResponse | None:
    if payload.text == "boom":
        raise RuntimeError("boom")
    if payload.text == "answer":
        return HandlerResponse.respond(Drop(text="ok"))
    return None  # the conversation ends without a reply
"""


def drop(text: str) -> BenchMessage:
    xml = f'<Drop xmlns="https://example.org/bench-sink"><text>{text}</text></Drop>'
    return BenchMessage(xml.encode(), "sink", "tester")


async def test_run_bench_in_process() -> None:
    organism = load_organism(ORGANISMS / "relay.yaml")
    result = await run_bench(
        organism, [BenchMessage(b.payload, b.to, b.sender) for b in organism.boot],
        BenchOptions(messages=300, concurrency=16),
    )  # fmt: skip
    assert (result.messages, result.ok, result.hops) == (300, 300, 1500)
    assert len(result.latencies_s) == 300
    p = result.percentiles_ms()
    assert p["p50"] is not None and p["max"] is not None and p["p50"] <= p["max"]
    assert result.workers_cpu_s is None and result.workers_peak_rss_mb is None
    assert result.cpu_user_s + result.cpu_system_s > 0


async def test_huh_and_no_reply_are_counted_apart_without_waiting(tmp_path: Path) -> None:
    (tmp_path / "bench_sink_handlers.py").write_text(SINK)
    (tmp_path / "sink.yaml").write_text(textwrap.dedent("""\
        organism:
          name: sink
        listeners:
          - name: sink
            payload: bench_sink_handlers:Drop
            handler: bench_sink_handlers:sink
        """))  # fmt: skip
    organism = load_organism(tmp_path / "sink.yaml")
    started = time.monotonic()
    result = await run_bench(
        organism, [drop("answer"), drop("boom"), drop("drop")],
        BenchOptions(messages=90, concurrency=8, timeout_s=30),
    )  # fmt: skip
    # A conversation that ends without a reply is given up once the pump is idle,
    # not after the 30 s timeout.
    assert time.monotonic() - started < 10
    assert (result.ok, result.huh, result.no_reply, result.timeouts) == (30, 30, 30, 0)
    assert result.error_codes == {"handler-error": 30}
    assert result.messages == 90 and result.hops == 90
