"""``run --metrics ... --web``: the dashboard over plain HTTP (no browser): what it
serves, its security properties (token, CSRF, headers, escaping) and the replay path."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_process import ROOT, CliProcess, until, wait_until
from dashboard_organism import (
    HOSTILE,
    TOKEN,
    Organism,
    fetch,
    node,
    quote,
    running_organism,
    transport_head,
)
from redis_server import free_port

import xml_pipeline.dashboard as dashboard_module
from xml_pipeline import StreamPump, load_organism
from xml_pipeline.backends.base import DeadLetter
from xml_pipeline.backends.manager.protocol import AUTHKEY_ENV
from xml_pipeline.cli.graph import routing_graph
from xml_pipeline.dashboard import (
    TOKEN_ENV,
    TOKEN_HEADER,
    Dashboard,
    graph_layout,
)
from xml_pipeline.exceptions import BackendUnavailable, PumpClosed
from xml_pipeline.metrics import serve_metrics

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def organism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Organism]:
    with running_organism(tmp_path_factory.mktemp("dashboard")) as running:
        yield running


def test_every_response_carries_the_security_headers(organism: Organism) -> None:
    for path in ("/", "/conversations", "/deadletters", "/static/dashboard.js",
                 "/api/graph", "/api/stats", "/api/nothing"):  # fmt: skip
        _, headers, _ = organism.request("GET", path)
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff", path


def test_pages_have_no_inline_script_and_assets_come_from_the_package(
    organism: Organism,
) -> None:
    for path in ("/", "/conversations", "/deadletters"):
        status, _, body = organism.request("GET", path)
        assert status == 200
        page = body.decode()
        assert page.count("<script") == 1 and '<script src="/static/dashboard.js"' in page
        assert "http://" not in page and "https://" not in page  # nothing fetched elsewhere
    _, _, script = organism.request("GET", "/static/dashboard.js")
    assert b"innerHTML" not in script and b"eval(" not in script
    assert organism.request("GET", "/static/../__init__.py")[0] == 404


def test_the_graph_has_every_listener_and_its_peers(organism: Organism) -> None:
    graph = organism.get_json("/api/graph")
    names = {node["name"] for node in graph["nodes"] if node["kind"] == "listener"}
    assert names == {"checker", "front"}
    ids = {node["name"]: node["id"] for node in graph["nodes"]}
    assert {"from": ids["front"], "to": ids["checker"], "dashed": False} in graph["edges"]
    assert graph["actions"] is True


def test_graph_layout_puts_callees_right_of_callers(tmp_path: Path) -> None:
    from xml_pipeline import load_organism

    org = load_organism(Path(__file__).resolve().parent.parent / "organisms" / "hello.yaml")
    layout = graph_layout(routing_graph(org))
    x = {node["name"]: node["x"] for node in layout["nodes"]}
    assert x["outside"] < x["greeter"] < x["shouter"]


def test_counters_move_in_the_event_stream(organism: Organism) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", organism.port, timeout=10)
    try:
        conn.request("GET", "/api/events")
        response = conn.getresponse()
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        before = organism.get_json("/api/stats")["listeners"]["checker"]["handled"]
        organism.send("count-1", "count-2")
        seen: list[int] = []

        def moved() -> bool:
            line = response.readline()
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:])["listeners"]["checker"]["handled"])
            return bool(seen) and seen[-1] >= before + 2

        wait_until(moved, "the handled counter moving by 2 in the event stream")
    finally:
        conn.close()


def test_actions_need_the_token_in_a_header_from_the_same_origin(organism: Organism) -> None:
    organism.send("boom")
    letter = organism.dead_letter("boom")
    assert organism.action("replay", letter["id"], token=None)[0] == 401
    assert organism.action("replay", letter["id"], token="wrong")[0] == 401
    # In the query string it does not count.
    status, _, _ = organism.request(
        "POST", f"/api/deadletters/replay?token={TOKEN}", {"id": letter["id"]},
        {"Origin": organism.base},
    )  # fmt: skip
    assert status == 401
    assert organism.action("purge", letter["id"], origin=None)[0] == 403
    assert organism.action("purge", letter["id"], origin="http://evil.example")[0] == 403
    # A form post (no JSON) is refused even with the token.
    status, _, _ = organism.request(
        "POST", "/api/deadletters/purge", None,
        {"Origin": organism.base, TOKEN_HEADER: TOKEN,
         "Content-Type": "application/x-www-form-urlencoded", "Content-Length": "0"},
    )  # fmt: skip
    assert status in (400, 415)
    assert organism.get_json("/api/deadletters")["total"] >= 1  # nothing happened
    status, body = organism.action("purge", letter["id"])
    assert (status, body["purged"]) == (200, True)
    assert organism.action("purge", letter["id"])[1]["purged"] is False


def test_replay_answers_the_letter_once(organism: Organism) -> None:
    organism.send("flaky-1")
    letter = organism.dead_letter("flaky-1")
    assert letter["code"] == "handler-error" and letter["listener"] == "checker"
    status, body = organism.action("replay", letter["id"])
    assert (status, body["result"]) == (200, "replayed")
    wait_until(lambda: organism.replies_with("<name>flaky-1</name>") == 1, "the replayed answer")
    assert organism.action("replay", letter["id"])[1]["result"] == "gone"
    assert organism.replies_with("<name>flaky-1</name>") == 1


def test_values_from_messages_are_escaped_in_every_json_answer(organism: Organism) -> None:
    organism.send(*HOSTILE, "boom")
    for name in HOSTILE:
        organism.conversation_of(name)
    bodies = [
        organism.request("GET", "/api/conversations")[2],
        organism.request("GET", "/api/deadletters")[2],
        *(organism.request("GET", "/api/conversation?id=" + quote(organism.conversation_of(n)))[2]
          for n in HOSTILE),
    ]  # fmt: skip
    for body in bodies:
        assert b"<" not in body and b">" not in body
    tree = json.loads(bodies[-1])
    xml = tree["frame"]["slots"][0]["xml"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in xml  # the payload, as its XML says it


def test_a_conversation_is_found_by_thread_and_by_first_message_id(organism: Organism) -> None:
    organism.send("tree-1")
    thread = organism.conversation_of("tree-1")
    tree = organism.get_json("/api/conversation?id=" + quote(thread))
    root = tree["frame"]
    assert root["listener"] is None and [s["direction"] for s in root["slots"]] == ["out", "in"]
    assert root["children"][0]["listener"] == "checker"
    by_message = organism.get_json("/api/conversation?id=" + quote(root["slots"][0]["message"]))
    assert by_message["conversation"] == tree["conversation"]
    assert organism.request("GET", "/api/conversation?id=nope")[0] == 404
    # The overview is a copy at most a second old.
    wait_until(
        lambda: any(c["conversation"] == tree["conversation"]
                    for c in organism.get_json("/api/conversations")["recent"]),
        "the conversation in the overview",
    )  # fmt: skip


def test_a_request_naming_another_host_is_refused(organism: Organism) -> None:
    # After a DNS rebinding, a hostile page's requests reach this port naming its host.
    evil = f"evil.example:{organism.port}"
    for path in ("/", "/api/deadletters", "/api/conversations", "/api/stats"):
        status, headers, body = organism.request("GET", path, headers={"Host": evil})
        assert status == 421, path
        assert "error" in json.loads(body)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    organism.send("boom")
    letter = organism.dead_letter("boom")
    status, _, _ = organism.request(
        "POST", "/api/deadletters/purge", {"id": letter["id"]},
        {"Host": evil, "Origin": f"http://{evil}", TOKEN_HEADER: TOKEN},
    )  # fmt: skip
    assert status == 421
    for origin in (f"http://evil.example:{organism.port}", f"https://127.0.0.1:{organism.port}",
                   "null"):  # fmt: skip
        assert organism.action("purge", letter["id"], origin=origin)[0] == 403, origin
    assert any(item["id"] == letter["id"]
               for item in organism.get_json("/api/deadletters")["letters"])  # fmt: skip
    for host in (f"localhost:{organism.port}", f"[::1]:{organism.port}"):
        assert organism.request("GET", "/api/stats", headers={"Host": host})[0] == 200, host


def test_api_requests_a_browser_marks_cross_site_are_refused(organism: Organism) -> None:
    status, _, body = organism.request(
        "GET", "/api/stats", headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert status == 403 and "cross-site" in json.loads(body)["error"]
    same = organism.request("GET", "/api/stats", headers={"Sec-Fetch-Site": "same-origin"})
    assert same[0] == 200


def test_web_host_names_a_proxy_s_host(tmp_path: Path) -> None:
    with running_organism(tmp_path, extra=["--web-host", "dash.example"]) as organism:
        for host in ("dash.example", f"dash.example:{organism.port}"):
            assert organism.request("GET", "/api/stats", headers={"Host": host})[0] == 200
        assert organism.request("GET", "/api/stats", headers={"Host": "other.example"})[0] == 421
        organism.send("boom")
        letter = organism.dead_letter("boom")
        status, _, body = organism.request(
            "POST", "/api/deadletters/purge", {"id": letter["id"]},
            {"Host": "dash.example", "Origin": "http://dash.example", TOKEN_HEADER: TOKEN},
        )  # fmt: skip
        assert (status, json.loads(body)["purged"]) == (200, True)


def test_short_tokens_from_a_file_or_the_environment_are_usage_errors(tmp_path: Path) -> None:
    organism = Path(__file__).resolve().parent.parent / "organisms" / "hello.yaml"
    (tmp_path / "token").write_text("  fifteen-chars!!  \n")  # stripped: 15
    web = ["--metrics", "127.0.0.1:9", "--web"]
    with CliProcess(organism, *web, "--web-token-file", tmp_path / "token") as process:
        _, err = process.finish()
    assert process.returncode == 2
    assert b"--web-token-file: the token needs at least 16 characters" in err
    env = {**os.environ, TOKEN_ENV: "short"}
    with CliProcess(organism, *web, env=env) as process:
        _, err = process.finish()
    assert process.returncode == 2
    assert f"${TOKEN_ENV}: the token needs at least 16 characters".encode() in err


def test_a_token_on_the_command_line_is_warned_about(tmp_path: Path) -> None:
    organism = Path(__file__).resolve().parent.parent / "organisms" / "hello.yaml"
    port = free_port()
    with CliProcess(organism, "--metrics", f"127.0.0.1:{port}", "--web", "--input", "-",
                    "--web-token", TOKEN) as process:  # fmt: skip
        process.wait_for_stderr(b"visible to other local users")
        _, err = process.finish()
    assert b"WARNING" in err and b"--web-token-file" in err and TOKEN_ENV.encode() in err


def test_wrong_tokens_lock_the_actions_out_for_a_while(tmp_path: Path) -> None:
    with running_organism(tmp_path) as organism:
        organism.send("boom")
        letter = organism.dead_letter("boom")
        for n in range(5):
            assert organism.action("purge", letter["id"], token=f"wrong-{n}")[0] == 401
        status, headers, body = organism.request(
            "POST", "/api/deadletters/purge", {"id": letter["id"]},
            {"Origin": organism.base, TOKEN_HEADER: TOKEN},
        )  # fmt: skip
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 10
        assert "too many wrong tokens" in json.loads(body)["error"]
        assert any(item["id"] == letter["id"]
                   for item in organism.get_json("/api/deadletters")["letters"])  # fmt: skip


def test_without_a_token_the_dashboard_is_read_only(tmp_path: Path) -> None:
    with running_organism(tmp_path, token=None) as organism:
        organism.send("boom")
        letter = organism.dead_letter("boom")
        status, body = organism.action("replay", letter["id"], token="anything")
        assert status == 403 and "read-only" in body["error"]
        assert organism.get_json("/api/deadletters")["actions"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--web"], "--web serves the dashboard on the --metrics address"),
        (["--web-token", "x"], "--web-token applies to --web"),
        (["--web-token-file", "x"], "--web-token-file applies to --web"),
        (
            ["--metrics", "127.0.0.1:9", "--web", "--web-token", "fifteen-chars!!"],
            "--web-token: the token needs at least 16 characters",
        ),
        (
            ["--metrics", "127.0.0.1:9", "--web", "--web-token-file", "no/such/file"],
            "--web-token-file no/such/file: cannot read",
        ),
        (
            ["--metrics", "127.0.0.1:9", "--web", "--web-token", "x" * 16, "--web-token-file", "x"],
            "give --web-token or --web-token-file, not both",
        ),
        (["--web-host", "x"], "--web-host applies to --web"),
    ],
)
def test_web_usage_errors(args: list[str], message: str) -> None:
    organism = Path(__file__).resolve().parent.parent / "organisms" / "hello.yaml"
    with CliProcess(organism, *args) as process:
        _, err = process.finish()
    assert process.returncode == 2
    assert message in err.decode()


# -- in-process: a pump with the dashboard on its metrics server -----------------------


@asynccontextmanager
async def served(token: str | None = None) -> AsyncIterator[tuple[StreamPump, int]]:
    """The hello organism running with the dashboard; (pump, port)."""
    pump = StreamPump(load_organism(ROOT / "organisms" / "hello.yaml"))
    async with serve_metrics(pump, "127.0.0.1", 0, dashboard=Dashboard(token)) as server, pump:
        yield pump, server.address[1]


@pytest.mark.anyio
async def test_a_second_expensive_read_meanwhile_is_answered_429() -> None:
    async with served() as (pump, port):
        started, release = asyncio.Event(), asyncio.Event()
        listed = pump.backend.deadletter_list

        async def slow(limit: int | None = None) -> Any:
            started.set()
            await release.wait()
            return await listed(limit)

        pump.backend.deadletter_list = slow  # type: ignore[method-assign]
        first = asyncio.ensure_future(asyncio.to_thread(fetch, port, "GET", "/api/deadletters"))
        await asyncio.wait_for(started.wait(), 10)
        for path in ("/api/conversations", "/api/conversation?id=nope", "/api/deadletters"):
            status, headers, body = await asyncio.to_thread(fetch, port, "GET", path)
            assert (status, headers.get("Retry-After")) == (429, "1"), path
            assert "error" in json.loads(body)
            assert headers["X-Content-Type-Options"] == "nosniff"
        release.set()
        assert (await first)[0] == 200
        assert (await asyncio.to_thread(fetch, port, "GET", "/api/conversations"))[0] == 200


@pytest.mark.anyio
async def test_the_overview_and_the_dead_letters_are_read_once_a_second_at_most() -> None:
    async with served() as (pump, port):
        calls = {"registry": 0, "letters": 0}
        registry, letters = pump.backend.registry_list_all, pump.backend.deadletter_list

        async def count_registry() -> Any:
            calls["registry"] += 1
            return await registry()

        async def count_letters(limit: int | None = None) -> Any:
            calls["letters"] += 1
            return await letters(limit)

        pump.backend.registry_list_all = count_registry  # type: ignore[method-assign]
        pump.backend.deadletter_list = count_letters  # type: ignore[method-assign]
        for _ in range(3):
            for path in ("/api/conversations", "/api/deadletters"):
                assert (await asyncio.to_thread(fetch, port, "GET", path))[0] == 200
        assert calls == {"registry": 1, "letters": 1}


@pytest.mark.anyio
async def test_a_search_by_message_id_is_refused_beyond_the_registry_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard_module, "_SEARCH_CAP", 5)
    async with served() as (pump, port):
        for n in range(6):
            await pump.backend.registry_set(f"chain-{n}", f"uuid-{n}")
        status, _, body = await asyncio.to_thread(fetch, port, "GET", "/api/conversation?id=x")
        assert status == 400
        assert json.loads(body)["error"] == (
            "search by thread id; the registry holds 6 frames, too many to scan"
        )

        async def known() -> bool:
            status, _, _ = await asyncio.to_thread(
                fetch, port, "GET", "/api/conversation?id=uuid-1"
            )
            return status != 400  # a thread id is one lookup: never refused

        await until(known, "a thread id searched")


@pytest.mark.anyio
async def test_a_replay_past_the_deadline_answers_202_and_replays_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard_module, "_LOOP_TIMEOUT_S", 0.2)
    async with served(TOKEN) as (pump, port):
        letter_id = await pump.backend.deadletter_add(DeadLetter(
            id="", timestamp=0.0, code="handler-error", reason="r", listener="greeter",
            thread_id=None, message_id=None, data=b"<x/>",
        ))  # fmt: skip
        fed: list[str] = []
        done = asyncio.Event()
        release = asyncio.Event()

        async def slow_replay(letter: DeadLetter) -> bool:
            fed.append(letter.id)  # fed: a cancel from now on would write it back
            await release.wait()  # the pump's queues full: back-pressure
            done.set()
            return True

        monkeypatch.setattr(pump, "replay", slow_replay)
        headers = {"Origin": f"http://127.0.0.1:{port}", TOKEN_HEADER: TOKEN}
        status, _, body = await asyncio.to_thread(
            fetch, port, "POST", "/api/deadletters/replay", {"id": letter_id}, headers
        )
        assert status == 202
        assert json.loads(body) == {"id": letter_id, "status": "in progress"}
        release.set()

        await asyncio.wait_for(done.wait(), 10)

        async def ended() -> bool:
            # The replay holds the one-at-a-time bound until its task ends.
            status, _, _ = await asyncio.to_thread(fetch, port, "GET", "/api/conversations")
            return status != 429

        await until(ended, "the replay task ended")
        assert await pump.backend.deadletter_list() == []  # never written back
        status, _, body = await asyncio.to_thread(
            fetch, port, "POST", "/api/deadletters/replay", {"id": letter_id}, headers
        )
        assert (status, json.loads(body)["result"]) == (200, "gone")
        assert fed == [letter_id]


def test_too_many_query_fields_are_a_400_not_a_crash(organism: Organism) -> None:
    query = "&".join(f"f{n}=x" for n in range(9))
    for path in ("/api/deadletters", "/api/conversation", "/"):
        status, headers, body = organism.request("GET", f"{path}?{query}")
        assert status == 400, path
        assert "too many query fields" in json.loads(body)["error"]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert b"metrics request failed" not in organism.process.stderr


def test_head_is_refused_and_holds_no_event_stream(organism: Organism) -> None:
    for _ in range(6):  # more than the streams that may be open at once
        status, headers, body = organism.request("HEAD", "/api/events")
        assert (status, headers["Allow"], body) == (405, "GET, POST", b"")
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert organism.request("HEAD", "/")[0] == 405
    conn = http.client.HTTPConnection("127.0.0.1", organism.port, timeout=10)
    try:
        conn.request("GET", "/api/events")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error", [BackendUnavailable("redis down"), PumpClosed("the pump is closed")]
)
async def test_a_backend_or_pump_failure_is_a_json_503(error: Exception) -> None:
    async with served() as (pump, port):

        async def failing(*args: Any) -> Any:
            raise error

        pump.backend.deadletter_list = failing  # type: ignore[method-assign]
        pump.backend.registry_get_chain = failing  # type: ignore[method-assign]
        for path in ("/api/deadletters", "/api/conversation?id=x"):
            status, headers, body = await asyncio.to_thread(fetch, port, "GET", path)
            assert status == 503, path
            assert str(error) in json.loads(body)["error"]
            assert headers["X-Content-Type-Options"] == "nosniff"


def conversations_and_dead_letters(organism: Organism) -> None:
    """A conversation opens by its thread and by its first message's id; a dead letter
    is replayed once (raises AssertionError otherwise)."""
    organism.send("tree-r", "flaky-r")
    thread = organism.conversation_of("tree-r")
    tree = organism.get_json("/api/conversation?id=" + quote(thread))
    root = tree["frame"]
    assert [s["direction"] for s in root["slots"]] == ["out", "in"]
    assert root["children"][0]["listener"] == "checker"
    first = root["slots"][0]["message"]
    assert organism.get_json("/api/conversation?id=" + quote(first))["conversation"] == thread
    overview = organism.get_json("/api/conversations")
    assert thread in {c["conversation"] for c in overview["recent"]}
    letter = organism.dead_letter("flaky-r")
    assert (letter["code"], letter["stage"]) == ("handler-error", "delivery")
    status, body = organism.action("replay", letter["id"])
    assert (status, body["result"]) == (200, "replayed")
    wait_until(lambda: organism.replies_with("<name>flaky-r</name>") == 1, "the answer")
    assert organism.action("replay", letter["id"])[1]["result"] == "gone"
    assert organism.replies_with("<name>flaky-r</name>") == 1


def test_conversations_and_dead_letters_on_redis(tmp_path: Path, redis_server: Any) -> None:
    """The pages read through the pump's backend object: on a Redis store as on memory."""
    head = f"backend: {redis_server.url}\nredis: {{prefix: dash-{tmp_path.name}}}\n"
    with running_organism(tmp_path, head=head) as organism:
        conversations_and_dead_letters(organism)


def test_conversations_and_dead_letters_on_the_manager(tmp_path: Path) -> None:
    """... and on a store served by ``python -m xml_pipeline manager``."""
    env = dict(os.environ, **{AUTHKEY_ENV: "dashboard-manager-key"})
    with CliProcess("manager", "--address", "127.0.0.1:0", env=env) as manager:
        url = manager.readline().decode().strip()
        if not url.startswith("manager://127.0.0.1:"):
            raise RuntimeError(f"the manager did not print its URL: {url!r} {manager.stderr!r}")
        with running_organism(tmp_path, head=f"backend: {url}\n", env=env) as organism:
            conversations_and_dead_letters(organism)
        manager.signal(signal.SIGTERM)
        manager.finish()
    assert manager.returncode == 0, manager.stderr


def test_without_a_transport_the_nodes_page_says_one_process(organism: Organism) -> None:
    status, headers, body = organism.request("GET", "/nodes")
    assert status == 200 and b'data-page="nodes"' in body
    assert headers["Content-Security-Policy"] == dashboard_module.CSP
    assert organism.get_json("/api/graph")["transport"] is False
    assert organism.get_json("/api/stats")["transport"] is None


def test_the_nodes_view_shows_nodes_pending_entries_and_what_was_reclaimed(
    tmp_path: Path, redis_server: Any
) -> None:
    """Three nodes on the Redis transport: ``a`` (the dashboard, serving ``front``), ``b``
    and ``c`` serving ``checker``. The live view lists the three with their shards and
    the entries ``b`` holds pending; once ``b`` is killed (SIGKILL), ``c`` takes over
    what it held, answers it, and the view counts the entries reclaimed."""
    head = transport_head(redis_server.url, f"nodes-{tmp_path.name}")
    extra = ("--node", "a", "--listeners", "front")
    seen: dict[str, Any] = {}

    def view_until(test: Any, what: str) -> dict[str, Any]:
        def check() -> bool:
            seen.update(organism.get_json("/api/stats")["transport"])
            return bool(test(seen))

        wait_until(check, what, timeout=60)
        return seen

    with running_organism(tmp_path, head=head, extra=extra) as organism:
        assert organism.get_json("/api/graph")["transport"] is True
        assert organism.get_json("/api/graph")["node"] == "a"
        with node(tmp_path, "b", hold=True) as b, node(tmp_path, "c"):
            organism.send("hold-1", "hold-2", "hold-3")
            view = view_until(
                lambda v: (
                    set(v["nodes"]) == {"a", "b", "c"}
                    and v["inboxes"]["checker"]["pending_by_node"].get("b", 0) >= 1
                    and v["nodes"]["b"]["held"] >= 1
                ),  # its next heartbeat says so
                "three nodes alive, b holding entries pending",
            )
            assert view["up"] is True
            assert view["nodes"]["a"]["listeners"] == ["front"]
            assert view["nodes"]["b"]["listeners"] == ["checker"]
            assert "b" in view["inboxes"]["checker"]["shards_by_node"]
            assert view["reclaimed"] == 0
            b.signal(signal.SIGKILL)
            b.finish()
            view = view_until(
                lambda v: (
                    v["nodes"].get("c", {}).get("taken_over", 0) >= 1 and "b" not in v["nodes"]
                ),
                "c reclaiming what b held, b gone",
            )
            assert view["reclaimed"] == view["nodes"]["c"]["taken_over"]
            for name in ("hold-1", "hold-2", "hold-3"):
                wait_until(lambda n=name: organism.replies_with(f"<name>{n}</name>") == 1,
                           f"the answer to {name}")  # fmt: skip
            view = view_until(lambda v: v["inboxes"]["checker"]["pending"] == 0, "none pending")
            assert list(view["inboxes"]["checker"]["shards_by_node"]) == ["c"]


def test_with_no_input_the_dashboard_serves_until_a_signal() -> None:
    """``run organisms/hello.yaml --metrics ... --web``: once its boot messages are
    answered the organism keeps running, for the dashboard to be looked at, until
    SIGINT; then it exits 0 and the port is closed."""
    hello = ROOT / "organisms" / "hello.yaml"
    port = free_port()
    with CliProcess(hello, "--metrics", f"127.0.0.1:{port}", "--web") as process:
        process.wait_for_stderr(b"serving until stopped")
        stats: dict[str, Any] = {}

        def answered() -> bool:
            stats.update(json.loads(fetch(port, "GET", "/api/stats")[2]))
            return bool(stats["egress"] == 2 and stats["in_pump"] == 0)

        wait_until(answered, "the boot messages answered")
        assert fetch(port, "GET", "/")[0] == 200
        assert process.running()
        process.signal(signal.SIGINT)
        _, err = process.finish()
    assert process.returncode == 0, err
    with pytest.raises(OSError):
        fetch(port, "GET", "/healthz")
