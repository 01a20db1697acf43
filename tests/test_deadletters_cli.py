"""``python -m xml_pipeline deadletters … list|replay|purge`` against a real Redis."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from xml_pipeline import ConfigError, StreamPump, load_organism, open_backend
from xml_pipeline.cli.deadletters import joining_organism, replay_letters

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-deadletters-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HANDLERS = """
    from pathlib import Path
    from xml_pipeline import Payload, HandlerResponse

    FLAG = Path(__file__).with_name("broken")

    class Job(Payload):
        xml_ns = "urn:jobs"
        n: int

    async def work(payload, meta):
        if FLAG.exists():
            raise RuntimeError("the database is down")
        return HandlerResponse.respond(payload)
"""


def organism(tmp_path: Path, url: str) -> Path:
    (tmp_path / "jobs.py").write_text(textwrap.dedent(HANDLERS))
    path = tmp_path / "jobs.yaml"
    prefix = f"dl-{tmp_path.name}"
    path.write_text(
        textwrap.dedent(f"""
        organism: {{name: jobs}}
        backend: {url}
        redis: {{prefix: {prefix}}}
        listeners: [{{name: worker, payload: jobs:Job, handler: jobs:work}}]
        """)
    )
    return path


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "xml_pipeline", *args], input=stdin,
                          capture_output=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip


def test_list_replay_purge(tmp_path: Path, redis_server: Any) -> None:
    path = organism(tmp_path, redis_server.url)
    (tmp_path / "broken").touch()
    lines = b'<Job xmlns="urn:jobs"><n>1</n></Job>\n<oops\n<Job xmlns="urn:jobs"><n>2</n></Job>\n'
    run = cli(str(path), "--input", "-", "--to", "worker", stdin=lines)
    assert run.returncode == 0, run.stderr

    listed = cli("deadletters", str(path), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(letter["code"] for letter in letters) == ["handler-error", "handler-error",
                                                             "malformed"]  # fmt: skip
    plain = cli("deadletters", str(path), "list")
    assert len(plain.stdout.splitlines()) == 3 and b"handler-error" in plain.stdout

    malformed = next(letter["id"] for letter in letters if letter["code"] == "malformed")
    purged = cli("deadletters", str(path), "purge", "--id", malformed)
    assert purged.returncode == 0 and b"purged 1" in purged.stderr

    (tmp_path / "broken").unlink()  # the fault is fixed: replay succeeds
    replayed = cli("deadletters", str(path), "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert b"replayed 2" in replayed.stderr
    assert replayed.stdout.count(b"<Job") == 2
    assert cli("deadletters", str(path), "list").stdout == b""

    (tmp_path / "broken").touch()
    cli(
        str(path), "--input", "-", "--to", "worker", stdin=b'<Job xmlns="urn:jobs"><n>3</n></Job>\n'
    )
    assert b"purged 1" in cli("deadletters", str(path), "purge").stderr


def test_replay_runs_again_a_letter_whose_message_had_an_id(
    tmp_path: Path, redis_server: Any
) -> None:
    # The message's (sender, <id>) was reserved when it was first accepted: the
    # replay must not take it for a retry of itself (and delete the letter unrun).
    path = organism(tmp_path, redis_server.url)
    (tmp_path / "broken").touch()
    lines = b"".join(
        b'<message xmlns="https://xml-pipeline.org/ns/envelope/v1"><meta><from>client</from>'
        b"<to>worker</to><id>job-%d</id></meta>"
        b'<Job xmlns="urn:jobs"><n>%d</n></Job></message>\n' % (n, n)
        for n in (1, 2)
    )
    run = cli(str(path), "--input", "-", stdin=lines)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(b"<huh") == 2
    (tmp_path / "broken").unlink()
    replayed = cli("deadletters", str(path), "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert b"replayed 2" in replayed.stderr
    assert replayed.stdout.count(b"<Job") == 2, replayed.stdout
    assert b"<re>job-1</re>" in replayed.stdout and b"<re>job-2</re>" in replayed.stdout
    assert cli("deadletters", str(path), "list").stdout == b""
    # A client's retry of an answered message is still ignored.
    again = cli(str(path), "--input", "-", stdin=lines[: lines.index(b"\n") + 1])
    assert again.returncode == 0 and again.stdout == b"", again.stdout


def test_memory_backend_is_refused(tmp_path: Path) -> None:
    path = organism(tmp_path, "memory://")
    result = cli("deadletters", str(path), "list")
    assert result.returncode == 2
    assert b"memory:// keeps no dead letters between runs" in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_self_serving_file_and_bad_limit_are_refused(tmp_path: Path) -> None:
    path = organism(tmp_path, "manager://127.0.0.1:0?serve=1")
    result = cli("deadletters", str(path), "list")
    # At port 0 only the serving pump knows the store's address: name it.
    assert result.returncode == 2 and b"--backend manager://HOST:PORT" in result.stderr
    assert result.stderr.count(b"\n") == 1
    result = cli("deadletters", str(path), "list", "--limit", "-1")
    assert result.returncode == 2 and b"at least 1" in result.stderr


def test_check_never_shows_a_password(tmp_path: Path) -> None:
    path = organism(tmp_path, "redis://:s3cret@127.0.0.1:1/0")
    result = cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert b"s3cret" not in result.stdout + result.stderr and b":***@" in result.stdout


# -- joining the store ---------------------------------------------------------------


def test_joining_organism(tmp_path: Path) -> None:
    base = load_organism(organism(tmp_path, "memory://"))
    with pytest.raises(ConfigError, match=r"^memory:// keeps no dead letters between runs"):
        joining_organism(base)

    options = {"authkey": KEY, "serve": True, "connect_timeout_s": 2.0}
    serving = dataclasses.replace(
        base, backend="manager://127.0.0.1:50555?serve=1", backend_options=options
    )
    joined = joining_organism(serving)
    assert joined.backend == "manager://127.0.0.1:50555"
    assert joined.backend_options == {**options, "serve": False}
    assert joined.listeners == base.listeners

    at_port_0 = dataclasses.replace(serving, backend="manager://127.0.0.1:0?serve=1")
    with pytest.raises(ConfigError, match=r"port 0 .*--backend manager://HOST:PORT"):
        joining_organism(at_port_0)

    redis = dataclasses.replace(base, backend="rediss://:pw@h:6380/0", backend_options={"a": 1})
    assert joining_organism(redis) == redis


async def test_a_running_pumps_own_store_is_joined_not_served(tmp_path: Path) -> None:
    port = free_port()
    base = load_organism(organism(tmp_path, "memory://"))
    serving = dataclasses.replace(
        base, backend=f"manager://127.0.0.1:{port}?serve=true", backend_options={"authkey": KEY}
    )
    async with StreamPump(serving) as pump:
        await pump.inject(b"<oops", to="worker", sender="test")
        joined = joining_organism(serving)
        backend = open_backend(joined.backend, joined.history, **joined.backend_options)
        try:
            letters = await backend.deadletter_list()
            assert [letter.code for letter in letters] == ["malformed"]
            assert "serving" not in repr(backend)
        finally:
            await backend.aclose()
        # Replay joins the store too (serving it again would find the address in use).
        accepted, refused = await replay_letters(serving, [], timeout_s=5)
        assert (accepted, refused) == (0, 1), "malformed again: replaced by its new refusal"
        assert [x.code for x in await pump.backend.deadletter_list()] == ["malformed"]


def test_two_replays_at_once_run_each_letter_once(tmp_path: Path, redis_server: Any) -> None:
    """Each letter is claimed (deleted) before it is injected: of two replays running
    at once, exactly one runs it (before: most letters ran twice)."""
    path = organism(tmp_path, redis_server.url)
    (tmp_path / "broken").touch()
    total = 1000
    lines = b"".join(b'<Job xmlns="urn:jobs"><n>%d</n></Job>\n' % n for n in range(total))
    run = cli(str(path), "--input", "-", "--to", "worker", stdin=lines)
    assert run.returncode == 0, run.stderr
    assert len(cli("deadletters", str(path), "list").stdout.splitlines()) == total
    (tmp_path / "broken").unlink()
    command = [sys.executable, "-m", "xml_pipeline", "deadletters", str(path), "replay"]
    replays = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        for _ in range(2)
    ]
    outputs = [replay.communicate(timeout=60) for replay in replays]
    assert [replay.returncode for replay in replays] == [0, 0], [err for _, err in outputs]
    answered = sorted(int(n) for out, _ in outputs for n in re.findall(rb"<n>(\d+)</n>", out))
    assert answered == list(range(total)), f"{len(answered)} answers for {total} letters"
    assert cli("deadletters", str(path), "list").stdout == b""
