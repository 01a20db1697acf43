"""What a crashed pump left unanswered is listed and can be fed again, once; what it
answered is not run again when a client sends it again (real processes, SIGKILL, a
real redis-server).

Before: after ``kill -9`` of a pump on the in-process transport the accepted,
unanswered conversations were nowhere to be seen; their inputs sat in the histories.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from cli_process import ROOT, CliProcess, wait_until
from lxml import etree

from xml_pipeline import build_envelope, parse_envelope

HANDLERS = """
    import asyncio
    import os
    from pathlib import Path
    from xml_pipeline import HandlerResponse, Payload

    CALLS = Path(__file__).with_name("calls")

    class Job(Payload):
        xml_ns = "urn:jobs"
        n: int

    async def work(payload, meta):
        with CALLS.open("a") as calls:
            calls.write(f"{payload.n}\\n")
        if payload.n % 2 and os.environ.get("HANG"):
            await asyncio.sleep(3600)  # the odd jobs are still running at the crash
        return HandlerResponse.respond(payload)
"""

JOBS = 20


def organism(tmp_path: Path, url: str) -> Path:
    (tmp_path / "jobs.py").write_text(textwrap.dedent(HANDLERS))
    path = tmp_path / "jobs.yaml"
    path.write_text(
        textwrap.dedent(f"""
        organism: {{name: jobs}}
        backend: {url}
        redis: {{prefix: unanswered-{tmp_path.name}}}
        listeners:
          - {{name: worker, payload: jobs:Job, handler: jobs:work}}
          - {{name: sleeper, payload: jobs:Job, handler: jobs:work, concurrency: 16}}
        """)
    )
    return path


def job(n: int) -> bytes:
    """Job n, to ``sleeper`` when odd (it hangs there while HANG is set), else ``worker``."""
    payload = etree.fromstring(f'<Job xmlns="urn:jobs"><n>{n}</n></Job>')
    to = "sleeper" if n % 2 else "worker"
    return build_envelope(sender="client", to=to, id=f"job-{n}", payload=payload)


ODD_FIRST = [*range(1, JOBS, 2), *range(0, JOBS, 2)]


def cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "xml_pipeline", *map(str, args)],
                          capture_output=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip


def calls(tmp_path: Path) -> list[int]:
    path = tmp_path / "calls"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_a_crash_leaves_its_unanswered_conversations_listed_and_replayable(
    tmp_path: Path, redis_server: Any
) -> None:
    path = organism(tmp_path, redis_server.url)
    env = {**os.environ, "HANG": "1"}
    with CliProcess(path, "--input", "-", env=env) as pump:
        # The odd ones first: once the even ones are answered, every job was accepted.
        pump.send(b"".join(job(n) + b"\n" for n in ODD_FIRST))
        answered = [parse_envelope(pump.readline()) for _ in range(JOBS // 2)]
        pump.signal(signal.SIGKILL)
        pump.proc.wait(10)
    assert sorted(e.re or "" for e in answered) == sorted(f"job-{n}" for n in range(0, JOBS, 2))

    listed = cli("deadletters", path, "unanswered", "--json")
    assert listed.returncode == 0, listed.stderr
    left = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(u["message_id"] for u in left) == sorted(f"job-{n}" for n in range(1, JOBS, 2))
    assert {(u["sender"], u["to"], u["replayed"]) for u in left} == {("client", "sleeper", False)}

    refused = cli("deadletters", path, "replay-unanswered")
    assert refused.returncode == 2 and b"needs --older-than" in refused.stderr
    replay = cli("deadletters", path, "replay-unanswered", "--older-than", "0.001")
    assert replay.returncode == 0, replay.stderr
    replies = [parse_envelope(line) for line in replay.stdout.splitlines()]
    # Each answer is on its own conversation, about its own input, to its client.
    assert {(e.thread, e.re, e.to) for e in replies} == {
        (u["thread_id"], u["message_id"], "client") for u in left
    }
    assert sorted(calls(tmp_path)[-JOBS // 2 :]) == list(range(1, JOBS, 2)), "each replayed once"

    again = cli("deadletters", path, "replay-unanswered", "--older-than", "0.001", "--again")
    assert again.returncode == 0 and again.stdout == b"", "answered now: nothing to feed"
    assert cli("deadletters", path, "unanswered").stdout == b""

    # The client sends everything again after the restart: all of it was accepted
    # before, so nothing runs again and nothing is answered twice.
    resent = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", str(path), "--input", "-"],
        input=b"".join(job(n) + b"\n" for n in range(JOBS)),
        capture_output=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert resent.returncode == 0, resent.stderr
    assert resent.stdout == b""
    assert sorted(calls(tmp_path)[-JOBS // 2 :]) == list(range(1, JOBS, 2)), "nothing ran again"


def test_a_conversation_is_replayed_once_unless_again(tmp_path: Path, redis_server: Any) -> None:
    path = organism(tmp_path, redis_server.url)
    with CliProcess(path, "--input", "-", env={**os.environ, "HANG": "1"}) as pump:
        pump.send(job(1) + b"\n")
        wait_until(lambda: calls(tmp_path) == [1], "the job started")  # it hangs
        pump.signal(signal.SIGKILL)
        pump.proc.wait(10)
    # Replayed while it hangs again: fed once, then claimed.
    old = ("--older-than", "0.001")
    with CliProcess("deadletters", path, "replay-unanswered", *old,
                    env={**os.environ, "HANG": "1"}):  # fmt: skip
        wait_until(lambda: calls(tmp_path) == [1, 1], "the replay started")
        second = cli("deadletters", path, "replay-unanswered", *old)
        assert b"replayed 0 unanswered conversation(s); 1 skipped" in second.stderr
    listed = cli("deadletters", path, "unanswered", "--json")
    [left] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert left["replayed"] is True
    forced = cli("deadletters", path, "replay-unanswered", "--id", left["thread_id"], "--again")
    assert b"replayed 1 unanswered" in forced.stderr
    [reply] = [parse_envelope(line) for line in forced.stdout.splitlines()]
    assert (reply.thread, reply.re) == (left["thread_id"], "job-1")
    assert calls(tmp_path) == [1, 1, 1]
