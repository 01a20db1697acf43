"""A running CLI organism with the dashboard on (``run --metrics ... --web``), for the
dashboard's HTTP and browser tests. Helpers raise, they do not assert."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from cli_process import CliProcess, wait_until
from redis_server import free_port

HANDLERS = """
import asyncio
import os

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/check"
_failed = set()


class Check(Payload):
    xml_ns = NS
    name: str


class Checked(Payload):
    xml_ns = NS
    name: str


async def check(payload: Check, meta: HandlerMetadata) -> HandlerResponse:
    if payload.name.startswith("hold") and os.environ.get("CHECK_HOLD"):
        await asyncio.Event().wait()  # a node started so holds it until it is killed
    if payload.name == "boom":
        raise ValueError("boom")
    if payload.name.startswith("flaky") and payload.name not in _failed:
        _failed.add(payload.name)  # fails once: a replay succeeds
        raise ValueError("flaky the first time")
    return HandlerResponse.respond(Checked(name=payload.name))


async def relay(payload: Check, meta: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse(payload, to="checker")
"""
ORGANISM = """
organism: {name: dashboard-check}
listeners:
  - name: checker
    payload: checks:Check
    handler: checks:check
    peers: []
  - name: front
    payload: checks:Check
    handler: checks:relay
    peers: [checker]
"""
TOKEN = "s3cret-token-of-the-tests"
HOSTILE = ('<script>alert("x")</script>', '"><img src=x onerror=alert(1)>')


def check(name: str) -> bytes:
    """One input line: a bare ``Check`` (the run's ``--to`` names the listener)."""
    return (
        f'<Check xmlns="https://example.org/check"><name>{escape(name)}</name></Check>\n'.encode()
    )


def fetch(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the loopback port, a JSON ``body`` if given; (status, headers,
    body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


class Organism:
    """The running organism: its dashboard's port, its replies (stdout lines)."""

    def __init__(self, process: CliProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.replies: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while line := self.process.readline():
            self.replies.append(line)

    def send(self, *names: str) -> None:
        self.process.send(b"".join(check(name) for name in names))

    def replies_with(self, text: str) -> int:
        return sum(text.encode() in line for line in list(self.replies))

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; (status, headers, body)."""
        return fetch(self.port, method, path, body, headers)

    def get_json(self, path: str) -> Any:
        status, _, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body!r}")
        return json.loads(body)

    def dead_letter(self, reason_part: str) -> dict[str, Any]:
        """Wait for a dead letter whose original bytes contain ``reason_part``."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            letters = self.get_json("/api/deadletters")["letters"]
            found[:] = [letter for letter in letters if reason_part in letter["data"]]
            return bool(found)

        wait_until(seen, f"a dead letter with {reason_part!r}")
        return found[0]

    def conversation_of(self, name: str) -> str:
        """Wait for the conversation whose reply carries ``name``; its thread id."""
        wait_until(lambda: self.replies_with(escape(name)) > 0, f"a reply for {name!r}")
        line = next(line for line in self.replies if escape(name).encode() in line)
        thread = line.split(b"<thread>")[1].split(b"</thread>")[0].decode()
        return thread

    def action(self, what: str, letter_id: str, token: str | None = TOKEN,
               origin: str | None = "same") -> tuple[int, Any]:  # fmt: skip
        headers = {}
        if token is not None:
            headers["X-Dashboard-Token"] = token
        if origin is not None:
            headers["Origin"] = self.base if origin == "same" else origin
        status, _, body = self.request(
            "POST", f"/api/deadletters/{what}", {"id": letter_id}, headers
        )
        return status, json.loads(body)


@contextmanager
def running_organism(
    folder: Path,
    *,
    token: str | None = TOKEN,
    extra: Sequence[str] = (),
    head: str = "",
    env: Mapping[str, str] | None = None,
) -> Iterator[Organism]:
    """``run --metrics 127.0.0.1:PORT --web [--web-token] [extra...]`` reading stdin,
    until the block ends (then stdin is closed and the exit awaited). ``head``: YAML put
    before the organism's (a ``backend:`` and its ``redis:`` section, say); ``env``: the
    process's environment (default: this one's)."""
    (folder / "checks.py").write_text(HANDLERS)
    (folder / "organism.yaml").write_text(head + ORGANISM)
    port = free_port()
    args: list[str | Path] = [folder / "organism.yaml", "--input", "-", "--to", "checker",
                              "--metrics", f"127.0.0.1:{port}", "--web"]  # fmt: skip
    if token is not None:
        (folder / "token").write_text(token + "\n")
        args += ["--web-token-file", folder / "token"]
    args += extra
    with CliProcess(*args, env=None if env is None else dict(env)) as process:
        organism = Organism(process, port)

        def serving() -> bool:
            try:
                return organism.request("GET", "/readyz")[0] == 200
            except OSError:
                return False

        wait_until(serving, "the dashboard answering")
        yield organism
        if "transport:" in head:
            process.signal(signal.SIGTERM)  # a node serves until it is stopped
        process.finish()


def transport_head(url: str, prefix: str) -> str:
    """YAML that puts the organism's store and transport on the Redis at ``url``."""
    return f"backend: {url}\ntransport: {url}\nredis: {{prefix: {prefix}}}\n"


@contextmanager
def node(folder: Path, name: str, *, hold: bool = False) -> Iterator[CliProcess]:
    """A node process of the organism ``running_organism`` wrote in ``folder`` (with a
    ``transport_head``), serving ``checker``; yields once it runs. ``hold``: it keeps
    every ``hold…`` check pending until it is killed. Leases live 1.5 s without renewal
    (``--claim-idle-ms``), so a killed node's shards change hands within seconds."""
    env = dict(os.environ, CHECK_HOLD="1") if hold else None
    args = ("run", folder / "organism.yaml", "--node", name, "--listeners", "checker",
            "--claim-idle-ms", "1500", "--log-level", "info")  # fmt: skip
    with CliProcess(*args, env=env) as process:
        process.wait_for_stderr(b"is running")
        yield process
        if process.running():
            process.signal(signal.SIGTERM)
            process.finish()


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
