"""Helpers shared by the benchmark scripts: the floor, the relay organisms, reports.

**The floor.** Every script measures, in its own process run, the least any safe pump
must do per delivery: for each message, parse it with the hardened parser (and check
the envelope), look up a handler in a dict by the payload's qualified name, call it,
and build the reply envelope. One message at a time, no routing, frames, history,
queues or tasks. The handler does the case's own work (nothing for a relay hop, an echo
of the payload for large payloads, the SHA-256 rounds of a heavy job). A case's
``ratio`` is its throughput over the floor's, measured on the same machine a few seconds
apart, so ratios compare across noisy machines where absolute figures do not.

**Reports.** Each script prints one summary line per case and writes JSON with the
same shape: ``benchmark``, the machine, the arguments, ``floor`` and ``cases``, each
case holding ``case``, ``summary`` (the printed line), ``ratio`` (to the floor, where
it is a throughput case), ``aims`` (``what``, ``value``, ``op``, ``target``, ``met``)
and its own figures. ``run_all.py`` reads ``cases`` from every script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lxml import etree

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xml_pipeline import (  # noqa: E402
    HistoryLimits,
    Listener,
    Organism,
    StreamPump,
    build_envelope,
    load_organism,
)
from xml_pipeline._stats import percentile as _percentile  # noqa: E402
from xml_pipeline.cli import gc_tuning  # noqa: E402
from xml_pipeline.envelope import (  # noqa: E402
    ENVELOPE_NAMESPACE,
    Envelope,
    envelope_from_element,
)
from xml_pipeline.metrics import serve_metrics  # noqa: E402
from xml_pipeline.parser import ParseLimits, parse_bytes  # noqa: E402

NS = "https://example.org/relay"
_MESSAGE_TAG = "{" + ENVELOPE_NAMESPACE + "}message"

FloorHandler = Callable[[etree._Element], etree._Element]


# -- messages ------------------------------------------------------------------------


def hop_envelope(seq: int, last: int) -> bytes:
    """A ``Hop`` for organisms/relay.yaml's chain, addressed to relay.1."""
    payload = etree.Element(f"{{{NS}}}Hop", nsmap={None: NS})  # type: ignore[dict-item]
    etree.SubElement(payload, f"{{{NS}}}seq").text = str(seq)
    etree.SubElement(payload, f"{{{NS}}}last").text = str(last)
    return build_envelope(sender="bench", to="relay.1", payload=payload)


def percentile(samples: Sequence[float], q: float) -> float:
    """The package's percentile (the same rank rule everywhere), of unsorted samples."""
    return _percentile(sorted(samples), q)


# -- the floor -----------------------------------------------------------------------


def done_reply(payload: etree._Element) -> etree._Element:
    """The floor's minimal handler: a ``Done`` carrying the payload's first child's text."""
    reply = etree.Element(f"{{{NS}}}Done", nsmap={None: NS})  # type: ignore[dict-item]
    etree.SubElement(reply, f"{{{NS}}}seq").text = payload[0].text
    return reply


def floor(
    messages: Sequence[bytes],
    handler: FloorHandler = done_reply,
    *,
    limits: ParseLimits | None = None,
) -> dict[str, Any]:
    """parse → look up → call → build reply, one message at a time, no pump.

    A message may be an envelope or a bare payload (as ``inject(..., to=...)`` takes).
    """
    limits = limits or ParseLimits()
    first = parse_bytes(messages[0], limits)
    qname = str((first[1] if first.tag == _MESSAGE_TAG else first).tag)
    table: dict[str, FloorHandler] = {qname: handler}
    latencies = []
    gc.collect()
    start = time.perf_counter()
    for data in messages:
        t0 = time.perf_counter()
        root = parse_bytes(data, limits)
        if root.tag == _MESSAGE_TAG:
            env = envelope_from_element(root)
        else:
            env = Envelope("api", None, None, None, root)
        reply = table[env.qname](env.payload)
        out = build_envelope(sender="floor", to=env.sender, thread="t", id="i", payload=reply)
        latencies.append(time.perf_counter() - t0)
        assert out
    elapsed = time.perf_counter() - start
    n = len(messages)
    return {
        "case": "floor",
        "messages": n,
        "seconds": elapsed,
        "msgs_per_s": n / elapsed,
        "hops_per_s": n / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


class Floor:
    """Floor runs of one script, interleaved with its cases; the best one counts.

    Taking the best of runs spread over the script's run keeps a burst of load from
    elsewhere on the machine from skewing one side of the ratio only.
    """

    def __init__(
        self, messages: Sequence[bytes], handler: FloorHandler = done_reply, label: str = "floor"
    ) -> None:
        self.messages = messages
        self.handler = handler
        self.label = label
        self.runs: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        result = floor(self.messages, self.handler)
        self.runs.append(result)
        return result

    @property
    def best(self) -> dict[str, Any]:
        if not self.runs:
            self.run()
        best = dict(max(self.runs, key=lambda r: r["hops_per_s"]))
        best["case"] = self.label
        best["hops_per_s_runs"] = [r["hops_per_s"] for r in self.runs]
        return best

    @property
    def hops_per_s(self) -> float:
        return float(self.best["hops_per_s"])

    def ratio(self, hops_per_s: float) -> float:
        """A throughput (deliveries per second) over the floor's."""
        return hops_per_s / self.hops_per_s

    def summary(self, prefix: str) -> str:
        b = self.best
        return (
            f"{prefix:<28} {b['messages']:>7} msgs  {b['hops_per_s']:>9,.0f} hops/s  "
            f"p50 {b['p50_ms']:.3f} ms  p99 {b['p99_ms']:.3f} ms  "
            f"(best of {len(self.runs)}; ratio 1.00 by definition)"
        )


# -- organisms -----------------------------------------------------------------------


def relay_organism(last: int, history: HistoryLimits | None = None) -> Organism:
    """organisms/relay.yaml's chain with ``last`` listeners, relay.1 → … → relay.<last>.

    The handler and payload classes are organisms/relay.py's (``relay:hop`` handles any
    ``relay.N``); the pump and history settings are relay.yaml's unless ``history``
    replaces the latter.
    """
    loaded = sys.modules.get("relay")
    if loaded is not None and Path(loaded.__file__ or "").parent != ROOT / "organisms":
        # benchmarks/relay.py imported as "relay" would shadow organisms/relay.py.
        raise RuntimeError(f"module 'relay' is {loaded.__file__}, not organisms/relay.py")
    # The organism's modules come first for this script (an application may choose
    # so; load_organism only appends their folder): benchmarks/ holds a relay.py too.
    organisms = str(ROOT / "organisms")
    if organisms in sys.path:
        sys.path.remove(organisms)
    sys.path.insert(0, organisms)
    base = load_organism(ROOT / "organisms" / "relay.yaml")
    template = base.listeners[0]
    hop_cls, done_cls = template.payloads
    listeners = []
    for i in range(1, last + 1):
        listeners.append(
            dataclasses.replace(
                template,
                name=f"relay.{i}",
                payloads=(hop_cls, done_cls) if i < last else (hop_cls,),
                peers=frozenset({f"relay.{i + 1}"} if i < last else ()),
            )
        )
    return dataclasses.replace(
        base,
        name=f"relay{last}",
        listeners=tuple(listeners),
        boot=(),
        history=history or base.history,
    )


def organism_of(
    name: str, listeners: Sequence[Listener], *, queue_size: int = 2048, **history: Any
) -> Organism:
    """An organism for a benchmark, with relay.yaml's pump settings and the given history."""
    base = relay_organism(3)  # loads relay.yaml with organisms/relay.py first on sys.path
    return Organism(
        name=name,
        listeners=tuple(listeners),
        history=dataclasses.replace(base.history, **history),
        settings=dataclasses.replace(base.settings, queue_size=queue_size),
    )


class GcPauses:
    """Times the garbage collector's pauses while in use (``with GcPauses() as gc_pauses``)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((int(info["generation"]), time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        """Collections and the longest pause (ms), per generation."""
        out: dict[str, Any] = {}
        for gen in (0, 1, 2):
            times = [t for g, t in self.pauses if g == gen]
            out[f"gen{gen}"] = {"count": len(times), "max_ms": max(times, default=0.0) * 1e3}
        return out

    def text(self) -> str:
        s = self.summary()
        return "gc " + ", ".join(
            f"gen{g} {s[f'gen{g}']['count']}x max {s[f'gen{g}']['max_ms']:.1f} ms"
            for g in (0, 1, 2)
            if s[f"gen{g}"]["count"]
        )


# -- running -------------------------------------------------------------------------


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    if name != "asyncio":
        raise SystemExit(f"unknown loop {name!r} (asyncio or uvloop)")
    return None


def run_on(loop_name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run the coroutine ``fn(*args)`` on a fresh event loop of the given kind."""
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        return runner.run(fn(*args))


def parser(doc: str | None, name: str, *, loop: str | None = "uvloop") -> argparse.ArgumentParser:
    """An argument parser with the options every script has (``--json``, ``--loop``)."""
    p = argparse.ArgumentParser(
        description=(doc or name).splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="JSON output")
    if loop is not None:
        p.add_argument("--loop", choices=("asyncio", "uvloop"), default=loop, help="event loop")
    return p


# -- reports -------------------------------------------------------------------------


def aim(what: str, value: float | None, op: str, target: float) -> dict[str, Any]:
    """One aim of a case; ``op`` is one of ``<``, ``<=``, ``>=``, ``>``."""
    checks: dict[str, Callable[[float, float], bool]] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
        ">": lambda a, b: a > b,
    }
    met = value is not None and checks[op](value, target)
    return {"what": what, "value": value, "op": op, "target": target, "met": met}


def aims_text(aims: Sequence[dict[str, Any]]) -> str:
    """``[aim p99 < 2: met]`` marks for a summary line."""
    parts = [
        f"aim {a['what']} {a['op']} {a['target']:g}: {'met' if a['met'] else 'NOT MET'}"
        for a in aims
    ]
    return f"  [{'; '.join(parts)}]" if parts else ""


def emit(cases: list[dict[str, Any]], name: str, summary: str, **fields: Any) -> dict[str, Any]:
    """Print a case's summary line (with its aims) and keep the case for the report."""
    fields.setdefault("aims", [])
    fields.setdefault("ratio", None)
    line = summary + aims_text(fields["aims"])
    case = {"case": name, "summary": line, **fields}
    cases.append(case)
    print(line, flush=True)
    return case


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(
    path: Path,
    benchmark: str,
    args: argparse.Namespace,
    cases: list[dict[str, Any]],
    floor_result: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    report = {
        "benchmark": benchmark,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: _plain(v) for k, v in vars(args).items()},
        "floor": floor_result,
        "cases": cases,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


@contextlib.asynccontextmanager
async def running(
    organism: Organism,
    *,
    metrics: list[tuple[str, int]] | None = None,
    web: bool = False,
    **kwargs: Any,
) -> AsyncIterator[StreamPump]:
    """``StreamPump(organism, **kwargs)`` with the collector tuned as ``run`` tunes it.

    GC tuning is process-wide, so the library leaves it to applications: a benchmark
    is one, and measures the pump as the command line runs it (``pump.gc_threshold``).
    ``metrics``: a list to get the address of the metrics served on a free loopback
    port, as ``run --metrics`` serves them (None: no metrics); ``web``: with the
    dashboard too, as ``run --metrics ... --web`` serves it.
    """
    with gc_tuning(organism.settings.gc_threshold):
        pump = StreamPump(organism, **kwargs)
        async with contextlib.AsyncExitStack() as stack:
            if metrics is not None:
                dashboard = None
                if web:
                    from xml_pipeline.dashboard import Dashboard

                    dashboard = Dashboard()
                served = await stack.enter_async_context(
                    serve_metrics(pump, "127.0.0.1", 0, dashboard=dashboard,
                                  probe_interval_s=1.0 if web else 2.0)
                )  # fmt: skip
                metrics.append(served.address)
            async with pump:
                yield pump


def scrape(address: tuple[str, int]) -> str:
    """GET /metrics at ``address`` (a blocking call)."""
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    if "xml_pipeline_listener_handled_total" not in text:
        raise RuntimeError("the metrics lack the listeners' counters")
    return text


# -- servers the scripts start --------------------------------------------------------


def free_port() -> int:
    """A free TCP port on the loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Return once something listens on ``127.0.0.1:port``; exit the script otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``redis-server`` without persistence on a free loopback port: (URL, process)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_port(port)
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            proc.terminate()
            proc.wait(10)
