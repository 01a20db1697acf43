"""``python -m xml_pipeline thread``: a conversation of several hops, run by a real CLI
process on a real Redis, read back as a tree of frames; hostile store contents are
shown escaped."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from xml_pipeline import Slot, open_backend

ROOT = Path(__file__).resolve().parent.parent
RELAY_NS = "https://example.org/relay"


def cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "xml_pipeline", *map(str, args)], input=stdin,
                          capture_output=True, timeout=60, cwd=ROOT, check=False)  # fmt: skip


def relay(tmp_path: Path, url: str) -> Path:
    """organisms/relay.yaml (three hops, dotted names) on ``url``, under a prefix of its own."""
    shutil.copy(ROOT / "organisms" / "relay.py", tmp_path / "relay.py")
    text = (ROOT / "organisms" / "relay.yaml").read_text()
    path = tmp_path / "relay.yaml"
    path.write_text(f"backend: {url}\nredis: {{prefix: thread-{tmp_path.name}}}\n{text}")
    return path


def hop(outside_id: str, seq: int) -> bytes:
    return (
        f'<message xmlns="https://xml-pipeline.org/ns/envelope/v1"><meta><from>tester</from>'
        f"<to>relay.1</to><id>{outside_id}</id></meta>"
        f'<Hop xmlns="{RELAY_NS}"><seq>{seq}</seq><last>3</last></Hop></message>\n'
    ).encode()


def thread_json(path: Path, wanted: str, *more: str) -> dict[str, Any]:
    done = cli("thread", path, wanted, "--json", *more)
    assert done.returncode == 0, done.stderr
    assert done.stdout.isascii()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def walk(frame: dict[str, Any]) -> list[dict[str, Any]]:
    return [frame, *(f for child in frame["children"] for f in walk(child))]


def test_a_conversation_of_several_hops_read_back(tmp_path: Path, redis_server: Any) -> None:
    path = relay(tmp_path, redis_server.url)
    run = cli(path, "--no-boot", "--input", "-", stdin=hop("outside-1", 1) + hop("outside-2", 2))
    assert run.returncode == 0, run.stderr
    replies = run.stdout.decode().splitlines()
    assert len(replies) == 2
    reply = next(r for r in replies if "<re>outside-1</re>" in r)
    match = re.search(r"<thread>([^<]+)</thread>", reply)
    assert match is not None
    conversation = match[1]

    by_outside_id = thread_json(path, "outside-1")
    assert by_outside_id["conversation"] == conversation
    assert by_outside_id["origin"] == "tester"
    frames = walk(by_outside_id["frame"])
    # One chain: the root (the outside's), relay.1, relay.2, relay.3.
    assert [f["hops"] for f in frames] == [[], ["relay.1"], ["relay.1", "relay.2"],
                                           ["relay.1", "relay.2", "relay.3"]]  # fmt: skip
    assert [f["listener"] for f in frames] == [None, "relay.1", "relay.2", "relay.3"]
    assert frames[0]["thread"] == conversation
    assert all(len(f["children"]) == (1 if i < 3 else 0) for i, f in enumerate(frames))
    # Each frame's slots in order: what came in, what its handler sent, ...
    steps = [[(s["direction"], s["from"], s["to"], s["payload"]) for s in f["slots"]]
             for f in frames]  # fmt: skip
    hop_, done_ = f"{{{RELAY_NS}}}Hop", f"{{{RELAY_NS}}}Done"
    assert steps == [
        [("out", "tester", "relay.1", hop_), ("in", "relay.1", "tester", done_)],
        [("in", "tester", "relay.1", hop_), ("out", "relay.1", "relay.2", hop_),
         ("in", "relay.2", "relay.1", done_), ("out", "relay.1", "tester", done_)],
        [("in", "relay.1", "relay.2", hop_), ("out", "relay.2", "relay.3", hop_),
         ("in", "relay.3", "relay.2", done_), ("out", "relay.2", "relay.1", done_)],
        [("in", "relay.2", "relay.3", hop_), ("out", "relay.3", "relay.2", done_)],
    ]  # fmt: skip
    for f in frames:
        assert [s["index"] for s in f["slots"]] == list(range(len(f["slots"])))
        times = [s["time"] for s in f["slots"]]
        assert times == sorted(times)
        assert all("xml" not in s for s in f["slots"])
    assert frames[0]["slots"][0]["message"] == "outside-1"
    reply_id = re.search(r"<id>([^<]+)</id>", reply)
    assert reply_id is not None and reply_id[1] == frames[0]["slots"][1]["message"]

    # The same conversation from its id, from any of its frames, from a reply's <re>.
    deepest = frames[3]["thread"]
    assert thread_json(path, conversation) == by_outside_id
    assert thread_json(path, deepest) == by_outside_id
    assert thread_json(path, frames[1]["thread"]) == by_outside_id
    # The other conversation is another tree.
    other = thread_json(path, "outside-2")
    assert other["conversation"] != conversation
    assert {f["thread"] for f in walk(other["frame"])}.isdisjoint(f["thread"] for f in frames)

    with_payloads = thread_json(path, deepest, "--payloads")
    first = walk(with_payloads["frame"])[3]["slots"][0]["xml"]
    assert first == f'<Hop xmlns="{RELAY_NS}"><seq>1</seq><last>3</last></Hop>'

    # As text: a tree, the root first, each frame's slots in order below it.
    done = cli("thread", path, deepest, "--payloads")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == f"conversation {conversation} from tester: 4 frame(s), 12 slot(s)"
    headers = [line for line in lines[1:] if not re.match(r"^[│ ]*\s+\d+ (in|out)\b|^[│ ]+\s+<",
                                                           line)]  # fmt: skip
    assert headers == [
        f"tester (outside)  {conversation}",
        f"└── relay.1  {frames[1]['thread']}",
        f"    └── relay.2  {frames[2]['thread']}",
        f"        └── relay.3  {deepest}  <= the id given",
    ]
    slot_lines = [line.strip("│ ") for line in lines if re.search(r"^[│ ]+\d+ (in|out) ", line)]
    assert [line.split()[:5] for line in slot_lines[:2]] == [
        ["0", "out", "tester", "->", "relay.1"],
        ["1", "in", "relay.1", "->", "tester"],
    ]
    assert len(slot_lines) == 12
    assert f'<Hop xmlns="{RELAY_NS}"><seq>1</seq><last>3</last></Hop>' in lines[3]


def test_unknown_ids_and_backends_that_keep_nothing(tmp_path: Path, redis_server: Any) -> None:
    path = relay(tmp_path, redis_server.url)
    done = cli("thread", path, "no-such-\x1b[2J-id")
    assert done.returncode == 1 and done.stdout == b""
    assert b"no conversation in redis://" in done.stderr and b"\x1b" not in done.stderr
    assert b"\\x1b[2J" in done.stderr

    done = cli("thread", ROOT / "organisms" / "relay.yaml", "x")
    assert done.returncode == 2
    assert b"memory:// keeps no history after its pump stops" in done.stderr


def test_hostile_store_contents_are_escaped(tmp_path: Path, redis_server: Any) -> None:
    prefix = f"thread-hostile-{tmp_path.name}"
    sender = "ev\x1b[31mil\u202e\x9b2J\\"
    xml = b"<P>\x1b]0;pwned\x07\r\n\xff\xfe<\xe2\x80\xae/P>"

    async def store() -> None:
        backend = open_backend(redis_server.url, prefix=prefix)
        try:
            root, child = "root-1", "child-1"
            await backend.registry_set(json.dumps([sender, root]), root)
            await backend.registry_set(json.dumps([sender, root, "a\x1bb"]), child)
            await backend.buffer_append(
                root, Slot(0, "out", sender, "a\x1bb", "{urn:\x1b}P", "m\x1b1", 1.5, xml)
            )
            await backend.buffer_append(
                child, Slot(0, "in", sender, "a\x1bb", "{urn:\x1b}P", "m\x1b1", 1.5, xml)
            )
        finally:
            await backend.aclose()

    asyncio.run(store())
    path = tmp_path / "o.yaml"
    path.write_text(
        f"organism: {{name: o}}\nbackend: {redis_server.url}\nredis: {{prefix: {prefix}}}\n"
        "listeners: [{name: r, payload: relay:Hop, handler: relay:hop}]\n"
    )
    shutil.copy(ROOT / "organisms" / "relay.py", tmp_path / "relay.py")
    done = cli("thread", path, "m\x1b1", "--payloads")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8")
    for raw in ("\x1b", "\x9b", "\u202e", "\x07", "\r"):
        assert raw not in out
    assert "ev\\x1b[31mil\\u202e\\x9b2J\\\\ (outside)  root-1" in out
    assert "a\\x1bb  child-1" in out
    assert "<P>\\x1b]0;pwned\\x07\\x0d\\x0a\\xff\\xfe<\\u202e/P>" in out
    as_json = thread_json(path, "child-1", "--payloads")
    assert as_json["origin"] == sender
    assert as_json["frame"]["children"][0]["listener"] == "a\x1bb"
    assert as_json["frame"]["slots"][0]["xml"].startswith("<P>\x1b]0;pwned")


def test_an_outside_id_two_senders_used_is_ambiguous(tmp_path: Path, redis_server: Any) -> None:
    """An <id> is unique per sender only: two senders' first messages with one id name
    no single conversation, and the command says so instead of picking one."""
    path = relay(tmp_path, redis_server.url)
    other = hop("same-1", 2).replace(b"<from>tester</from>", b"<from>other</from>")
    run = cli(path, "--no-boot", "--input", "-", stdin=hop("same-1", 1) + other)
    assert run.returncode == 0, run.stderr
    done = cli("thread", path, "same-1")
    assert done.returncode == 1
    assert b"2 conversations have a first message with id 'same-1' (from other, tester)" in (
        done.stderr
    )
