"""``run --metrics``: /metrics in the Prometheus text format, /healthz and /readyz,
scraped over HTTP from a real process (or a real server around an in-process pump)
and parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cli_process import ROOT, CliProcess, until, wait_until
from prometheus_client.parser import text_string_to_metric_families
from redis_server import free_port
from support import Ping, Pong, ping_xml

from xml_pipeline import (
    HandlerMetadata,
    HandlerResponse,
    Listener,
    Organism,
    StreamPump,
    load_organism,
)
from xml_pipeline.metrics import parse_address, serve_metrics

CHECKER = """
from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/check"


class Check(Payload):
    xml_ns = NS
    name: str


class Checked(Payload):
    xml_ns = NS
    name: str


async def check(payload: Check, meta: HandlerMetadata) -> HandlerResponse:
    if payload.name == "boom":
        raise ValueError("boom")
    return HandlerResponse.respond(Checked(name=payload.name))
"""
ORGANISM = """
organism: {name: checks}
listeners:
  - name: checker
    payload: metrics_checker:Check
    handler: metrics_checker:check
"""


def check(name: str) -> bytes:
    return f'<Check xmlns="https://example.org/check"><name>{name}</name></Check>\n'.encode()


@pytest.fixture
def checks(tmp_path: Path) -> Path:
    (tmp_path / "metrics_checker.py").write_text(CHECKER)
    path = tmp_path / "checks.yaml"
    path.write_text(ORGANISM)
    return path


def get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on the loopback port: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    status, text = get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {text}")
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_run_serves_counters_that_match_the_input(checks: Path) -> None:
    port = free_port()
    with CliProcess(checks, "--metrics", f"127.0.0.1:{port}", "--input", "-") as cli:
        wait_until(lambda: get_or_none(port, "/healthz") == (200, "ok\n"), "/healthz")
        for name in ("a", "b", "boom", "c", "boom"):
            cli.send(check(name))
        cli.send(b"<<<not xml\n")
        cli.send(b'<Nope xmlns="https://example.org/none"/>\n')

        # Served values are up to a probe interval old: wait until they are the input's.
        latency = "xml_pipeline_listener_latency_seconds"
        failed = "xml_pipeline_listener_failed_total"
        expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
            ("xml_pipeline_egress_total", ()): 7,
            ("xml_pipeline_ingress_total", ()): 7,
            ("xml_pipeline_listener_received_total", (("listener", "checker"),)): 5,
            ("xml_pipeline_listener_handled_total", (("listener", "checker"),)): 3,
            (failed, (("code", "handler-error"), ("listener", "checker"))): 2,
            ("xml_pipeline_rejected_total", (("code", "malformed"),)): 1,
            ("xml_pipeline_rejected_total", (("code", "no-route"),)): 1,
            ("xml_pipeline_dead_letters_total", ()): 4,
            ("xml_pipeline_listener_in_flight", (("listener", "checker"),)): 0,
            ("xml_pipeline_listener_queued", (("listener", "checker"),)): 0,
            # The histogram counts every delivery once, cumulatively, +Inf = count.
            (f"{latency}_count", (("listener", "checker"),)): 5,
            (f"{latency}_bucket", (("le", "+Inf"), ("listener", "checker"))): 5,
        }
        found = {}

        def counted() -> bool:
            nonlocal found
            found = samples(port)
            return all(found.get(key) == v for key, v in expected.items())

        try:
            wait_until(counted, "the input's counts")
        except TimeoutError:
            assert {key: found.get(key) for key in expected} == expected
            raise
        buckets = sorted(
            (float(dict(labels)["le"]), v)
            for (name, labels), v in found.items()
            if name == f"{latency}_bucket"
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
        assert 0 < (value(found, f"{latency}_sum", listener="checker") or 0) < 60
        # The in-memory backend's calls are not timed (that would cost more than them).
        assert not any(name.startswith("xml_pipeline_backend_call") for name, _ in found)
        assert value(found, "xml_pipeline_backend_up") == 1
        assert value(found, "process_resident_memory_bytes") is not None

        wait_until(lambda: get(port, "/readyz") == (200, "ready\n"), "/readyz ready")
        assert get(port, "/nothing")[0] == 404
        out, err = cli.finish()
    assert cli.returncode == 0, err
    assert len(out.splitlines()) == 7
    assert port_closed(port)  # nothing is left serving once the run is over


def test_backend_calls_are_timed_per_operation(checks: Path) -> None:
    port = free_port()
    env = {"XML_PIPELINE_MANAGER_AUTHKEY": "metrics-test-key"}
    backend = "manager://127.0.0.1:0?serve=1"  # a store this process serves
    args = ("--backend", backend, "--metrics", f"127.0.0.1:{port}", "--input", "-")
    with CliProcess(checks, *args, env={**os.environ, **env}) as cli:
        wait_until(lambda: get_or_none(port, "/healthz") == (200, "ok\n"), "/healthz")
        for name in ("a", "b"):
            cli.send(check(name))
        found = {}

        def counted() -> bool:
            # Served values are up to a probe interval old; the pings are the probe's.
            nonlocal found
            found = samples(port)
            calls = "xml_pipeline_backend_calls_total"
            return (
                value(found, "xml_pipeline_egress_total") == 2
                and value(found, calls, operation="ping") is not None
                # A conversation: a root and a child frame, two slots each way... >= 4.
                and (value(found, calls, operation="buffer_append") or 0) >= 4
            )

        wait_until(counted, "2 replies and the pings counted")
        appends = value(found, "xml_pipeline_backend_calls_total", operation="buffer_append")
        seconds = "xml_pipeline_backend_call_seconds"
        assert value(found, f"{seconds}_count", operation="buffer_append") == appends
        assert value(found, f"{seconds}_bucket", operation="buffer_append", le="+Inf") == appends
        assert 0 < (value(found, f"{seconds}_sum", operation="buffer_append") or 0) < 60
        assert value(found, "xml_pipeline_backend_errors_total", operation="buffer_append") == 0
        wait_until(lambda: value(samples(port), "xml_pipeline_backend_up") == 1, "backend up")
        _, err = cli.finish()
    assert cli.returncode == 0, err
    assert port_closed(port)


def get_or_none(port: int, path: str) -> tuple[int, str] | None:
    try:
        return get(port, path)
    except OSError:
        return None


def test_the_default_host_is_loopback() -> None:
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("localhost:http")


@pytest.mark.parametrize(
    ("address", "message"),
    [("nowhere:99999", "--metrics: expected HOST:PORT"), ("127.0.0.1:", "HOST:PORT")],
)
def test_a_bad_address_is_a_usage_error(address: str, message: str) -> None:
    with CliProcess("organisms/hello.yaml", "--metrics", address) as cli:
        _, err = cli.finish()
    assert cli.returncode == 2
    assert message.encode() in err
    assert b"Traceback" not in err


def test_a_port_in_use_is_a_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with CliProcess("organisms/hello.yaml", "--metrics", f"127.0.0.1:{port}") as cli:
            _, err = cli.finish()
    assert cli.returncode == 2, err
    assert f"--metrics 127.0.0.1:{port}: cannot listen".encode() in err
    assert b"Traceback" not in err


def test_metrics_without_prometheus_client_name_the_extra(tmp_path: Path) -> None:
    # A prometheus_client that cannot be imported, ahead of the installed one.
    (tmp_path / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    with CliProcess("organisms/hello.yaml", "--metrics", "9464", env=env) as cli:
        _, err = cli.finish()
    assert cli.returncode == 2
    assert b"pip install 'xml-pipeline[metrics]'" in err
    assert b"Traceback" not in err


@pytest.mark.anyio
async def test_readyz_follows_the_pump_and_the_drain() -> None:
    organism = load_organism(ROOT / "organisms" / "hello.yaml")
    pump = StreamPump(organism)
    draining = asyncio.Event()
    async with serve_metrics(pump, "127.0.0.1", 0, draining=draining.is_set) as served:
        port = served.address[1]
        status, body = await asyncio.to_thread(get, port, "/readyz")
        assert status == 503
        assert body.startswith("not ready: pump new")
        assert await asyncio.to_thread(get, port, "/healthz") == (200, "ok\n")
        async with pump:

            async def ready() -> bool:
                return await asyncio.to_thread(get, port, "/readyz") == (200, "ready\n")

            await until(ready, "ready once the pump runs and the backend answered")
            draining.set()
            status, body = await asyncio.to_thread(get, port, "/readyz")
            assert (status, body) == (503, "not ready: draining\n")
        status, body = await asyncio.to_thread(get, port, "/readyz")
        assert status == 503
        assert body.startswith("not ready: pump closed")
    assert port_closed(port)


def test_the_dashboard_uses_only_metrics_the_exporter_serves() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    used = {
        name
        for expr in exprs
        for name in re.findall(r"\b((?:xml_pipeline|process)_[a-z_]+)\b", expr)
    }
    served = _served_names()
    assert used - served == set()


def _served_names() -> set[str]:
    """The sample names a running hello organism serves (pool and transport aside)."""
    port = free_port()
    with CliProcess(
        "organisms/hello.yaml", "--metrics", f"127.0.0.1:{port}", "--input", "-"
    ) as cli:
        wait_until(
            lambda: (get_or_none(port, "/metrics") or (0, ""))[1].count("_bucket") > 0,
            "/metrics with histograms",
        )
        names = {name for name, _ in samples(port)}
        # Families served without samples yet (no failure so far, say) count too.
        for family in text_string_to_metric_families(get(port, "/metrics")[1]):
            names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        cli.finish()
    if sys.platform.startswith("linux"):
        assert "process_cpu_seconds_total" in names
    return names


# -- the probes see the event loop; the server never holds it up ------------------------

released = threading.Event()  # lets the handler below give the event loop back


async def hold_the_loop(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    released.wait(30)  # a blocking call in an async handler: the loop runs nothing else
    return HandlerResponse.respond(Pong(n=payload.n))


@pytest.mark.anyio
async def test_probes_fail_while_the_event_loop_is_held() -> None:
    listener = Listener(name="hold", payloads=(Ping,), handler=hold_the_loop)
    replies: list[Any] = []
    pump = StreamPump(Organism(name="held", listeners=(listener,)), egress=replies.append)
    released.clear()
    seen: list[tuple[tuple[int, str], tuple[int, str]]] = []

    def watch(port: int) -> None:
        # A thread: the test's own coroutine cannot run while the loop is held. It lets
        # the handler go once both probes failed (/healthz after 10 intervals, 1 s).
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ready, live = get(port, "/readyz"), get(port, "/healthz")
                if ready[0] == 503 and live[0] == 503:
                    seen.append((ready, live))
                    return
        finally:
            released.set()

    async with serve_metrics(pump, "127.0.0.1", 0, probe_interval_s=0.1) as served:
        port = served.address[1]
        async with pump:

            async def ready() -> bool:
                return await asyncio.to_thread(get, port, "/readyz") == (200, "ready\n")

            await until(ready, "ready before the loop is held")
            watcher = threading.Thread(target=watch, args=(port,))
            watcher.start()
            try:
                await pump.inject(ping_xml(1), to="hold")
                await until(lambda: bool(replies), "the held handler's reply")
            finally:
                released.set()
                await asyncio.to_thread(watcher.join)
            assert seen, "/readyz and /healthz kept answering 200 while the loop was held"
            (_, ready_body), (_, live_body) = seen[0]
            assert ready_body.startswith("not ready: event loop not responding for ")
            assert live_body.startswith("event loop not responding for ")
            await until(ready, "ready again once the loop runs")
            assert await asyncio.to_thread(get, port, "/healthz") == (200, "ok\n")


def connect_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` clients that connect, send a byte of a request and nothing more."""
    clients = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"G")
        clients.append(client)
    return clients


def test_slow_clients_do_not_hold_up_the_exit() -> None:
    port = free_port()
    with CliProcess(
        "organisms/hello.yaml", "--metrics", f"127.0.0.1:{port}", "--input", "-"
    ) as cli:
        wait_until(lambda: get_or_none(port, "/readyz") == (200, "ready\n"), "/readyz")
        clients = connect_idle(port, 3)
        try:
            # Answered after them: the server has accepted the slow ones.
            assert get(port, "/healthz") == (200, "ok\n")
            start = time.monotonic()
            cli.signal(signal.SIGTERM)
            cli.proc.wait(20)
            took = time.monotonic() - start
        finally:
            for client in clients:
                client.close()
        _, err = cli.finish()
    assert cli.returncode == 0, err
    assert took < 3, f"run took {took:.1f} s to exit with slow metrics clients connected"
    assert port_closed(port)


def test_a_silent_client_leaves_json_logs_intact() -> None:
    port = free_port()
    args = ("--metrics", f"127.0.0.1:{port}", "--input", "-", "--log-format", "json")
    with CliProcess("organisms/hello.yaml", *args, "--log-level", "debug") as cli:
        wait_until(lambda: get_or_none(port, "/healthz") == (200, "ok\n"), "/healthz")
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            start = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b"", "the server answered a request never sent"
            # Closed by the server at the request timeout (5 s), not at once.
            assert 3 < time.monotonic() - start < 15
        _, err = cli.finish()
    assert cli.returncode == 0, err
    for line in err.decode().splitlines():
        json.loads(line)  # every stderr line is a JSON record, no traceback


@pytest.mark.anyio
async def test_connections_past_the_limit_are_closed_at_once() -> None:
    pump = StreamPump(load_organism(ROOT / "organisms" / "hello.yaml"))
    async with serve_metrics(pump, "127.0.0.1", 0) as served:
        port = served.address[1]
        clients = await asyncio.to_thread(connect_idle, port, 17)  # the limit is 16
        try:
            readable, _, _ = await asyncio.to_thread(select.select, clients, [], [], 3)
            assert readable == [clients[-1]], "only the connection past the limit closed"
            assert clients[-1].recv(1) == b""
        finally:
            for client in clients:
                client.close()
        # Once they are gone, the server answers again.
        assert await asyncio.to_thread(get, port, "/healthz") == (200, "ok\n")


def test_a_node_serves_its_transport_metrics(checks: Path, redis_server: Any) -> None:
    """On the Redis Streams transport, /metrics says the transport is up and measures
    each listener's inbox: once everything is answered, nothing is queued or pending."""
    port = free_port()
    url = redis_server.url
    checks.write_text(f"redis: {{prefix: metrics-{checks.parent.name}}}\n{ORGANISM}")
    args = ("--backend", url, "--transport", url, "--node", "n1",
            "--metrics", f"127.0.0.1:{port}", "--input", "-")  # fmt: skip
    with CliProcess(checks, *args) as cli:
        wait_until(lambda: get_or_none(port, "/healthz") == (200, "ok\n"), "/healthz")
        for name in ("a", "b", "c"):
            cli.send(check(name))
        found: dict[Any, float] = {}

        def measured() -> bool:
            nonlocal found
            found = samples(port)
            return (
                value(found, "xml_pipeline_egress_total") == 3
                and value(found, "xml_pipeline_transport_up") == 1
                and value(found, "xml_pipeline_transport_stream_length", listener="checker") == 0
            )

        wait_until(measured, "3 replies, the transport up and its inbox measured empty")
        assert value(found, "xml_pipeline_transport_pending", listener="checker") == 0
        assert value(found, "xml_pipeline_transport_lag", listener="checker") == 0
        assert get(port, "/readyz")[0] == 200
        cli.signal(signal.SIGTERM)  # a node serves until it is stopped
        _, err = cli.finish()
    assert cli.returncode == 0, err
    assert port_closed(port)
