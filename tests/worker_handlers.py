"""Handlers for cpu_bound tests: importable by module path, so worker processes load them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

from support import Ping, Pong

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload


def _pong(payload: Ping, meta: HandlerMetadata, text: str = "") -> HandlerResponse:
    return HandlerResponse.respond(Pong(n=payload.n, text=text or payload.text, by=meta.own_name))


def echo(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Answers with the pid of the worker process that ran it."""
    return _pong(payload, meta, str(os.getpid()))


async def echo_async(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    await asyncio.sleep(0)
    return _pong(payload, meta, f"async {os.getpid()}")


def forward(payload: Ping | Pong, meta: HandlerMetadata) -> HandlerResponse:
    """Forwards a Ping to the listener ``next``; passes its Pong back to the caller."""
    if isinstance(payload, Pong):
        return HandlerResponse.respond(payload)
    return HandlerResponse(Ping(n=payload.n + 1, text=payload.text), to="next")


def hashing(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """About ``payload.n`` ms of SHA-256 work (n rounds of 64 KiB... roughly)."""
    data = payload.text.encode() * 1024
    digest = b""
    for _ in range(max(payload.n, 1)):
        digest = hashlib.sha256(data + digest).digest()
    return _pong(payload, meta, digest.hex()[:16])


def faulty(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Misbehaves as ``payload.text`` says: raise, exit, kill -9 itself, segfault, hang."""
    if payload.text == "raise":
        raise ValueError(f"bad number {payload.n}")
    if payload.text == "exit":
        os._exit(3)
    if payload.text == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if payload.text == "segfault":
        import ctypes

        ctypes.string_at(0)
    if payload.text == "hang":
        time.sleep(3600)
    if payload.text == "sleep":
        time.sleep(0.05)
    if payload.text == "busy":
        time.sleep(0.001)
    if payload.text == "burn":  # n ms of CPU time
        end = time.process_time() + payload.n / 1000
        while time.process_time() < end:
            pass
    if payload.text == "memory":
        hog = bytearray(2 * 1024**3)
        return _pong(payload, meta, str(len(hog)))
    if payload.text == "bad-return":
        return "nope"  # type: ignore[return-value]
    if payload.text == "control-char":
        return _pong(payload, meta, "a\x01b")
    return _pong(payload, meta, str(os.getpid()))


def marked(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """``text`` is ``FOLDER|MODE``: writes ``FOLDER/<n>.<pid>`` on start, then acts as faulty(MODE).

    The file tells a test that the handler runs, instead of a guess of how long to wait.
    """
    folder, _, mode = payload.text.rpartition("|")
    Path(folder, f"{payload.n}.{os.getpid()}").touch()
    return faulty(Ping(n=payload.n, text=mode), meta)


def rendezvous(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """``text`` is ``FOLDER|K``: writes ``FOLDER/<pid>`` and waits (up to 10 s) until K
    worker processes have; answers ``<its pid> <the pids it found>``.

    Two messages meet here only if they run at the same time in different workers. The
    first to give up says so (``FOLDER/gave-up``), so the others do not wait again.
    """
    folder, _, count = payload.text.rpartition("|")
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 10
    while True:
        found = sorted(p.name for p in Path(folder).iterdir())
        if len(found) >= int(count) or "gave-up" in found:
            break
        if time.monotonic() > deadline:
            Path(folder, "gave-up").touch()
            break
        time.sleep(0.001)
    return _pong(payload, meta, " ".join([str(os.getpid()), *found]))


def stubborn(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Like marked, but its worker ignores SIGTERM first (as a hung C extension might)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return marked(payload, meta)


def module_file(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Answers with the file the module named by ``text`` is imported from in the worker."""
    import importlib

    return _pong(payload, meta, str(importlib.import_module(payload.text).__file__))


class Listy(Payload):
    xml_ns = "https://example.org/test"
    items: list[int] = []


def unencodable(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Answers n=3 with a payload whose serializer raises TypeError (not ValueError)."""
    if payload.n == 3:
        return HandlerResponse.respond(Listy.model_construct(items=5))
    return _pong(payload, meta)


def read_history(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Answers with the directions and senders of its frame's history."""
    slots = meta.history_blocking()
    return _pong(payload, meta, ",".join(f"{s.direction}:{s.sender}" for s in slots))


async def read_history_async(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    slots = await meta.history()
    return _pong(payload, meta, ",".join(f"{s.direction}:{s.sender}" for s in slots))


def traced(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Answers with the trace context it runs under in the worker: ``<trace id>-<span id>``
    of the current span (all zeros: none)."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return _pong(payload, meta, f"{ctx.trace_id:032x}-{ctx.span_id:016x}")
