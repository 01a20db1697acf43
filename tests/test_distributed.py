"""One organism on several pump processes through Redis Streams (real redis-server,
real node processes, real signals): every accepted conversation is answered exactly
once, whatever happens to the nodes."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import re
import signal
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_process import CliProcess, until, wait_until
from redis_server import RedisServer, running_redis

from xml_pipeline import Client, ConfigError, NoReply, Reply, StreamPump, _node, load_organism
from xml_pipeline.backends.redis import RedisBackend
from xml_pipeline.exceptions import BackendError
from xml_pipeline.transport.redis import RedisStreams

CHAIN_PY = """
import asyncio
import os

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/chain"


class Ask(Payload):
    xml_ns = NS
    n: int


class Told(Payload):
    xml_ns = NS
    n: int


async def front(payload: Ask | Told, meta: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, Ask):
        return HandlerResponse(payload, to="middle")
    return HandlerResponse.respond(payload)


async def middle(payload: Ask, meta: HandlerMetadata) -> HandlerResponse | None:
    if payload.n == -1:  # a poison message: it kills the node that handles it
        os._exit(3)
    if payload.n == -2:  # a conversation that ends without a reply
        return None
    await asyncio.sleep(0.02)
    return HandlerResponse.respond(Told(n=payload.n))


async def own_slot(payload: Ask, meta: HandlerMetadata) -> HandlerResponse:
    # How many times the history holds this delivery's own "in" slot (1: as in one
    # process, though it is committed only after this handler returns).
    history = await meta.history()
    mine = [s for s in history if s.direction == "in" and s.message_id == meta.message_id]
    return HandlerResponse.respond(Told(n=len(mine)))
"""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: these tests leave tens of thousands of keys
    (histories, frames) that would slow the other tests' scans of the shared one."""
    with running_redis(tmp_path / "redis-own") as server:
        yield server


def chain_organism(
    folder: Path,
    url: str,
    *,
    queue_size: int = 2048,
    cpu_bound: bool = False,
    middle: str = "middle",
    history_snapshot: bool = False,
) -> Path:
    """A two-listener organism (``front`` forwards to ``middle``, which answers after
    20 ms) on the Redis transport, under a prefix of its own."""
    (folder / "chain.py").write_text(CHAIN_PY)
    path = folder / "chain.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            organism:
              name: chain
            backend: {url}
            transport: {url}
            redis:
              prefix: c{uuid.uuid4().hex[:10]}
            pump:
              queue_size: {queue_size}
            listeners:
              - name: front
                payload: [chain:Ask, chain:Told]
                handler: chain:front
                peers: [middle]
              - name: middle
                payload: chain:Ask
                handler: chain:{middle}
                concurrency: 8
                cpu_bound: {str(cpu_bound).lower()}
                history_snapshot: {str(history_snapshot).lower()}
            process_pool:
              workers: 1
            """)
    )
    return path


def ask(n: int) -> str:
    return f'<Ask xmlns="https://example.org/chain"><n>{n}</n></Ask>'


@contextmanager
def node(organism: Path, name: str, *listeners: str, **options: Any) -> Iterator[CliProcess]:
    """A node process serving ``listeners``; yields once it runs."""
    args: list[str | Path] = ["run", organism, "--node", name, "--no-boot", "--log-level", "info"]
    if listeners:
        args += ["--listeners", ",".join(listeners)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}"] + ([str(value)] if value != "" else [])
    with CliProcess(*args) as proc:
        proc.wait_for_stderr(b"is running")
        yield proc
        if proc.running():
            proc.signal(signal.SIGTERM)
            proc.finish()


async def _leftovers(organism: Path) -> tuple[int, int]:
    """Entries still in the inboxes, and entries still pending, over every listener."""
    org = load_organism(organism)
    backend = RedisBackend.from_url(org.backend, **org.backend_options)
    streams = RedisStreams(org.backend, backend)
    try:
        inboxes = [
            streams.inbox(listener.name, shard)
            for listener in org.listeners
            for shard in range(listener.shards)
        ]
        length = sum([await streams.length(s) for s in inboxes])
        pending = sum([await streams.pending(s) for s in inboxes])
        return length, pending
    finally:
        await streams.aclose()
        await backend.aclose()


def _exactly_once(replies: list[Reply], count: int) -> None:
    by_re = Counter(reply.re for reply in replies)
    twice = {re: n for re, n in by_re.items() if n > 1}
    if twice:
        raise AssertionError(f"answered more than once: {twice}")
    if len(by_re) != count:
        raise AssertionError(f"{count - len(by_re)} conversation(s) never answered")
    huhs = [reply for reply in replies if reply.is_huh]
    if huhs:
        raise AssertionError(f"errors instead of answers: {huhs[:3]}")


async def test_two_nodes_in_one_process_answer_every_conversation_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    organism = load_organism(chain_organism(tmp_path, redis_server.url))
    replies: list[Reply] = []
    async with (
        StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a,
        StreamPump(organism, node="b", serve=["middle"]),
    ):
        answers = await asyncio.gather(
            *(a.request(ask(i), to="front", timeout=30) for i in range(200))
        )
        assert sorted(r.payload.n for r in answers) == list(range(200))  # type: ignore[attr-defined]
        history = await a.backend.buffer_get_thread(answers[0].thread_id or "")
        assert [(s.direction, s.sender) for s in history] == [("out", "api"), ("in", "front")]
    _exactly_once(replies, 200)
    assert await _leftovers(tmp_path / "chain.yaml") == (0, 0)


def test_a_node_killed_and_restarted_loses_nothing_and_repeats_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 of the node serving ``middle`` while conversations are in flight; the
    node restarted under the same name takes up what it held."""
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)
    total = 1000

    async def main() -> list[Reply]:
        replies: list[Reply] = []
        async with StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a:
            with node(path, "b", "middle") as b:
                requests = [
                    asyncio.ensure_future(a.request(ask(i), to="front", timeout=60))
                    for i in range(total)
                ]
                await asyncio.to_thread(wait_until, lambda: len(replies) >= 30, "30 answers")
                b.signal(signal.SIGKILL)
                b.finish()
                in_flight = total - len(replies)
            assert in_flight > 0, "the node died with work in flight"
            with node(path, "b", "middle"):
                await asyncio.gather(*requests)
                await asyncio.to_thread(
                    wait_until, lambda: len(replies) >= total, "every answer", 60
                )
        return replies

    replies = asyncio.run(main())
    _exactly_once(replies, total)
    assert asyncio.run(_leftovers(path)) == (0, 0)


def test_a_frozen_node_is_taken_over_and_its_late_commits_are_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGSTOP of one of two nodes serving ``middle`` past claim_idle_ms: the other
    takes its entries over and answers them; resumed (SIGCONT), the frozen node's
    commits are fenced off: nothing is answered twice."""
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)
    total = 200

    async def main() -> list[Reply]:
        replies: list[Reply] = []
        async with StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a:
            with (
                node(path, "b1", "middle", claim_idle_ms=1500) as b1,
                node(path, "b2", "middle", claim_idle_ms=1500),
            ):
                requests = [
                    asyncio.ensure_future(a.request(ask(i), to="front", timeout=60))
                    for i in range(total)
                ]
                await asyncio.to_thread(wait_until, lambda: len(replies) >= 20, "20 answers")
                b1.signal(signal.SIGSTOP)
                await asyncio.gather(*requests)  # b2 took over what b1 held
                b1.signal(signal.SIGCONT)
                # Resumed, it finishes what it held and tries to commit: refused.
                await asyncio.to_thread(b1.wait_for_stderr, b"was not committed", 30)
                b1.signal(signal.SIGTERM)
                b1.finish()
        return replies

    replies = asyncio.run(main())
    _exactly_once(replies, total)
    assert asyncio.run(_leftovers(path)) == (0, 0)


def test_a_message_that_kills_its_node_is_dead_lettered_after_max_deliveries(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A message whose handler kills the node every time: the node is restarted (as a
    supervisor would) until the message has been delivered max_deliveries times; then
    it is dead-lettered and the other messages flow."""
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)

    async def main() -> tuple[list[Reply], list[Any]]:
        replies: list[Reply] = []
        async with StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a:
            await a.inject(ask(-1), to="front")
            calls = [a.request(ask(i), to="front", timeout=60) for i in range(20)]
            rest = [asyncio.ensure_future(call) for call in calls]
            deaths = 0
            while not all(r.done() for r in rest):
                with node(path, "b", "middle", max_deliveries=2) as b:
                    await asyncio.to_thread(
                        wait_until, lambda: not b.running() or all(r.done() for r in rest),
                        "the node dies or everything is answered", 60,
                    )  # fmt: skip
                    if not b.running():
                        deaths += 1
                        b.finish()
                if deaths > 5:
                    raise AssertionError("the poison message was never dead-lettered")
            await asyncio.gather(*rest)
            letters = await a.backend.deadletter_list()
        return replies, [deaths, letters]

    replies, (deaths, letters) = asyncio.run(main())
    assert 1 <= deaths <= 3, f"the node died {deaths} times"
    [letter] = [x for x in letters if b"<n>-1</n>" in x.data]
    assert letter.code == "handler-error" and "max_deliveries 2" in letter.reason
    [huh] = [r for r in replies if r.is_huh]  # its sender is told, as in one process
    assert huh.payload.code == "handler-error"  # type: ignore[attr-defined]
    _exactly_once([r for r in replies if not r.is_huh], 20)
    assert asyncio.run(_leftovers(path)) == (0, 0)


def test_status_shows_the_nodes_and_what_each_inbox_holds(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)

    def status(*extra: str) -> str:
        with CliProcess("status", path, *extra) as proc:
            out, err = proc.finish()
        if proc.returncode != 0:
            raise RuntimeError(f"status failed ({proc.returncode}): {err.decode()}")
        return out.decode()

    async def main() -> None:
        async with StreamPump(organism, node="a", serve=["front"]) as a:
            with node(path, "b", "middle") as b:
                await asyncio.gather(*(a.request(ask(i), to="front") for i in range(10)))
                b.signal(signal.SIGSTOP)  # what reaches middle now stays in its inbox
                try:
                    for i in range(10, 15):
                        await a.inject(ask(i), to="front")
                    await asyncio.to_thread(
                        wait_until,
                        lambda: json.loads(status("--json"))["listeners"]["middle"]["length"] == 5,
                        "5 entries waiting in middle's inbox",
                    )
                    report = json.loads(status("--json"))
                    assert sorted(report["nodes"]) == ["a", "b"]
                    assert report["nodes"]["b"]["listeners"] == ["middle"]
                    assert report["nodes"]["b"]["pid"] == b.proc.pid
                    middle = report["listeners"]["middle"]
                    assert middle["length"] == 5 and middle["pending"] + middle["lag"] == 5
                    text = status()
                    assert "2 node(s) alive" in text and "middle" in text
                finally:
                    b.signal(signal.SIGCONT)
            # Leaving the block above stopped b with the loop blocked: a's heartbeat may
            # have lapsed meanwhile on a loaded machine; it beats again within 2 s.
            await asyncio.to_thread(
                wait_until,
                lambda: sorted(json.loads(status("--json"))["nodes"]) == ["a"],
                "a node that stopped no longer listed, a listed",
            )

    asyncio.run(main())


def test_redis_killed_and_restarted_with_aof_loses_no_accepted_message(tmp_path: Path) -> None:
    """redis-server (appendfsync always) killed with SIGKILL mid-run and restarted on
    the same port: the nodes wait for it and go on; every accepted conversation is
    answered exactly once."""
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    try:
        path = chain_organism(tmp_path, server.url)
        organism = load_organism(path)
        total = 200

        async def main() -> list[Reply]:
            replies: list[Reply] = []
            async with StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a:
                with node(path, "b", "middle") as b:
                    calls = [a.request(ask(i), to="front", timeout=90) for i in range(total)]
                    requests = [asyncio.ensure_future(call) for call in calls]
                    await asyncio.to_thread(wait_until, lambda: len(replies) >= 30, "30 answers")
                    server.kill()
                    server.start()  # same port, same append-only file
                    await asyncio.gather(*requests)
                    await asyncio.to_thread(
                        wait_until, lambda: len(replies) >= total, "every answer", 60
                    )
                    assert b"retrying" in b.stderr, "node b saw Redis go away"
            return replies

        replies = asyncio.run(main())
        _exactly_once(replies, total)
        assert asyncio.run(_leftovers(path)) == (0, 0)
    finally:
        server.stop()


def test_a_client_and_send_feed_an_organism_served_by_a_node(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)

    async def with_client() -> tuple[int, bool]:
        async with Client(redis_server.url, path) as client:
            reply = await client.request(ask(7), to="front", timeout=30)
            stream = RedisStreams(organism.backend, RedisBackend.from_url(organism.backend,
                                  **organism.backend_options))  # fmt: skip
            replies = stream.replies(client.name)
        try:
            gone = await stream.length(replies) == 0 and await stream.pending(replies) == 0
        finally:
            await stream.aclose()
            await stream.backend.aclose()
        return reply.payload.n, gone  # type: ignore[attr-defined]

    with node(path, "all"):
        assert asyncio.run(with_client()) == (7, True), "answered; its reply stream is gone"
        lines = b"".join(ask(i).encode() + b"\n" for i in range(20))
        with CliProcess("send", path, "--to", "front") as send:
            send.send(lines)
            out, err = send.finish()
        assert send.returncode == 0, err.decode()
        told = sorted(int(n) for n in re.findall(rb"<n>(-?\d+)</n>", out))
        assert told == list(range(20)), out.decode()[:500]


async def test_input_waits_while_the_target_inbox_is_full(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """queue_size bounds each inbox stream for input: with nobody serving ``front``,
    10 messages are accepted and the 11th waits; once a node serves, all go on."""
    organism = load_organism(chain_organism(tmp_path, redis_server.url, queue_size=10))
    async with StreamPump(organism, node="entry", serve=()) as entry:
        for i in range(10):
            await entry.inject(ask(i), to="front")
        assert entry._node is not None
        streams = entry._node.streams
        assert await streams.depth("front", 4) == 10
        waiting = asyncio.ensure_future(entry.inject(ask(10), to="front"))
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        assert not done, "the 11th message waits for room"
        assert await streams.depth("front", 4) == 10
        async with StreamPump(organism, node="worker"):
            assert await asyncio.wait_for(waiting, 30) is not None


def test_a_node_added_mid_run_takes_a_share_of_the_work(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)
    total = 800

    async def main() -> tuple[list[Reply], bytes]:
        replies: list[Reply] = []
        async with StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a:
            with node(path, "b1", "middle"):
                calls = [a.request(ask(i), to="front", timeout=60) for i in range(total)]
                requests = [asyncio.ensure_future(call) for call in calls]
                await asyncio.to_thread(wait_until, lambda: len(replies) >= 20, "20 answers")
                with node(path, "b2", "middle", stats="") as b2:
                    await asyncio.gather(*requests)
                    b2.signal(signal.SIGTERM)
                    _, err = b2.finish()
        return replies, err

    replies, err = asyncio.run(main())
    _exactly_once(replies, total)
    row = re.search(rb"^middle\s+(\d+)\s+(\d+)", err, re.MULTILINE)
    assert row is not None, err.decode()[-2000:]
    assert int(row[2]) > 0, "the node that joined handled some of the messages"


async def test_a_cpu_bound_listener_runs_in_the_worker_pool_of_the_node_serving_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    organism = load_organism(chain_organism(tmp_path, redis_server.url, cpu_bound=True))
    async with (
        StreamPump(organism, node="a", serve=["front"]) as a,
        StreamPump(organism, node="b", serve=["middle"]) as b,
    ):
        answers = await asyncio.gather(
            *(a.request(ask(i), to="front", timeout=60) for i in range(20))
        )
        assert sorted(r.payload.n for r in answers) == list(range(20))  # type: ignore[attr-defined]
        assert a.statistics().pool is None, "a serves no cpu_bound listener: no pool"
        pool = b.statistics().pool
        assert pool is not None and pool.tasks == 20


async def test_a_handler_sees_its_own_in_slot_before_the_commit(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """meta.history() during a delivery from a stream holds the delivery's own ``in``
    slot once, as in one process: inline, and cpu_bound with history_snapshot."""
    for cpu_bound in (False, True):
        folder = tmp_path / str(cpu_bound)
        folder.mkdir()
        path = chain_organism(
            folder, redis_server.url, cpu_bound=cpu_bound, middle="own_slot",
            history_snapshot=cpu_bound,
        )  # fmt: skip
        organism = load_organism(path)
        async with (
            StreamPump(organism, node="a", serve=["front"]) as a,
            StreamPump(organism, node="b", serve=["middle"]),
        ):
            answers = await asyncio.gather(
                *(a.request(ask(i), to="front", timeout=60) for i in range(5))
            )
        assert [r.payload.n for r in answers] == [1] * 5, cpu_bound  # type: ignore[attr-defined]


STEPS_PY = """
import asyncio
import os
import random
import time

from xml_pipeline import HandlerMetadata, HandlerResponse, Payload

NS = "https://example.org/steps"
LOG = os.environ["STEPS_LOG"]


class Burst(Payload):
    xml_ns = NS
    steps: int


class Step(Payload):
    xml_ns = NS
    n: int


async def split(payload: Burst, meta: HandlerMetadata) -> list[HandlerResponse]:
    return [HandlerResponse(Step(n=n), to="work") for n in range(payload.steps)]


async def work(payload: Step, meta: HandlerMetadata) -> None:
    start = time.time()
    await asyncio.sleep(random.random() * 0.01)
    line = f"{meta.thread_id} {payload.n} {start:.6f} {time.time():.6f} {os.getpid()}\\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
"""


def test_one_frames_messages_reach_a_listener_in_order_across_nodes(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: Any
) -> None:
    """Each conversation sends 10 steps to ``work`` on one frame; three nodes serve
    ``work`` (the third joins mid-run, so shards change hands): every frame's steps
    run one after the other, in order, as in one process, and all three nodes work."""
    log = tmp_path / "steps.log"
    monkeypatch.setenv("STEPS_LOG", str(log))
    (tmp_path / "steps.py").write_text(STEPS_PY)
    path = tmp_path / "steps.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            organism:
              name: steps
            backend: {redis_server.url}
            transport: {redis_server.url}
            redis:
              prefix: s{uuid.uuid4().hex[:10]}
            listeners:
              - name: split
                payload: steps:Burst
                handler: steps:split
              - name: work
                payload: steps:Step
                handler: steps:work
                concurrency: 2
                shards: 6
            """)
    )
    organism = load_organism(path)
    conversations, steps = 300, 10
    total = conversations * steps

    def lines() -> list[list[str]]:
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    async def main() -> None:
        async with StreamPump(organism, node="a", serve=["split"]) as a:
            with node(path, "w1", "work"), node(path, "w2", "work"):
                for _ in range(conversations):
                    burst = '<Burst xmlns="https://example.org/steps"><steps>10</steps></Burst>'
                    await a.inject(burst, to="split")
                await asyncio.to_thread(wait_until, lambda: len(lines()) >= total // 4, "a quarter")
                with node(path, "w3", "work"):
                    await asyncio.to_thread(wait_until, lambda: len(lines()) >= total, "all", 90)

    asyncio.run(main())
    by_frame: dict[str, list[tuple[int, float, float]]] = {}
    pids = Counter()
    for frame, n, start, end, pid in lines():
        by_frame.setdefault(frame, []).append((int(n), float(start), float(end)))
        pids[pid] += 1
    assert len(by_frame) == conversations
    for frame, runs in by_frame.items():
        assert [n for n, _, _ in runs] == list(range(steps)), f"{frame}: {runs}"
        for (_, _, end), (_, start, _) in itertools.pairwise(runs):
            assert start >= end, f"{frame}: a step started before the previous one ended"
    assert len(pids) == 3, f"every node worked: {pids}"
    assert asyncio.run(_leftovers(path)) == (0, 0)


def test_three_nodes_one_killed_mid_run_answer_every_conversation_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """10,000 conversations through three nodes serving ``middle``; one is killed
    with SIGKILL in the middle and never comes back: the other two take its shards
    over after claim_idle_ms, and every conversation is answered exactly once, each
    frame's history holds each message once, and nothing is left in the inboxes."""
    path = chain_organism(tmp_path, redis_server.url, queue_size=20_000)
    organism = load_organism(path)
    total = 10_000

    async def main() -> tuple[list[Reply], list[list[Any]]]:
        replies: list[Reply] = []
        async with StreamPump(organism, node="a", serve=["front"], egress=replies.append) as a:
            with (
                node(path, "b1", "middle", claim_idle_ms=1500),
                node(path, "b2", "middle", claim_idle_ms=1500) as b2,
                node(path, "b3", "middle", claim_idle_ms=1500),
            ):
                conversations = [await a.inject(ask(i), to="front") for i in range(total)]
                await asyncio.to_thread(wait_until, lambda: len(replies) >= total // 3, "a third")
                b2.signal(signal.SIGKILL)
                b2.finish()
                assert len(replies) < total, "b2 died with work in flight"
                await asyncio.to_thread(wait_until, lambda: len(replies) >= total, "all", 120)
            histories = await asyncio.gather(
                *(a.backend.buffer_get_thread(c or "") for c in conversations[::50])
            )
        return replies, [[(s.direction, s.message_id) for s in h] for h in histories]

    replies, histories = asyncio.run(main())
    _exactly_once(replies, total)
    for history in histories:
        assert len(history) == 2 and len(set(history)) == 2, history  # the input, the answer
    assert asyncio.run(_leftovers(path)) == (0, 0)


def test_a_second_process_under_a_running_nodes_name_is_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two consumers of one name would commit what the other holds: a node whose name
    is taken by a live process refuses to start; once that process was killed (its
    heartbeat goes stale), a node of that name starts."""
    path = chain_organism(tmp_path, redis_server.url)
    organism = load_organism(path)

    async def start() -> None:
        async with StreamPump(organism, node="b", serve=["middle"]):
            pass

    with node(path, "b", "middle") as b:
        with pytest.raises(ConfigError, match="another process runs as node 'b'"):
            asyncio.run(start())
        b.signal(signal.SIGKILL)
        b.finish()
    asyncio.run(start())  # the dead node's heartbeat is stale: no one runs as b


async def _until_owners(streams: RedisStreams, wanted: set[str | None], timeout: float) -> None:
    """Wait until the shards of ``middle`` are held by exactly ``wanted``."""

    async def held() -> bool:
        return set(await streams.owners("middle", 4)) == wanted

    await until(held, f"the shards of middle held by {wanted}", timeout)


async def test_nodes_share_a_listeners_shards_and_a_draining_node_hands_its_over(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    organism = load_organism(chain_organism(tmp_path, redis_server.url))
    async with (
        StreamPump(organism, node="a", serve=["middle"]) as a,
        StreamPump(organism, node="b", serve=["middle"]),
    ):
        assert a._node is not None
        streams = a._node.streams
        await _until_owners(streams, {"a", "b"}, 10)
        assert sorted(await streams.owners("middle", 4)).count("a") == 2, "an even share"
        assert await a.drain(10)
        await _until_owners(streams, {"b"}, 10)  # while a is still open


async def test_a_request_whose_conversation_ends_without_a_reply_gets_noreply(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The conversation ends on another node (middle answers nothing): the requesting
    node hears it through its reply stream and request() raises NoReply, as in one
    process; answered conversations leave no counter and no notice behind."""
    organism = load_organism(chain_organism(tmp_path, redis_server.url))
    async with (
        StreamPump(organism, node="a", serve=["front"]) as a,
        StreamPump(organism, node="b", serve=["middle"]),
    ):
        with pytest.raises(NoReply, match="without a reply"):
            await a.request(ask(-2), to="front", timeout=30)
        answers = await asyncio.gather(
            *(a.request(ask(i), to="front", timeout=30) for i in range(20))
        )
        assert sorted(r.payload.n for r in answers) == list(range(20))  # type: ignore[attr-defined]
        async with Client(redis_server.url, organism) as client:
            with pytest.raises(NoReply):
                await client.request(ask(-2), to="front", timeout=30)
        assert a._node is not None
        streams = a._node.streams
        prefix = organism.backend_options["prefix"]
        assert await streams._commands.call(b"KEYS", f"{prefix}:open:*".encode()) == []
        assert await streams.length(streams.replies("a")) == 0, "no notice left"


GATED_PY = """
import asyncio

from xml_pipeline import HandlerMetadata, Payload

NS = "https://example.org/gated"
STARTS = []  # the n of each handler start, in order
GATES = {}  # n -> asyncio.Event the handler of n waits for


class Job(Payload):
    xml_ns = NS
    n: int


async def work(payload: Job, meta: HandlerMetadata) -> None:
    STARTS.append(payload.n)
    gate = GATES.get(payload.n)
    if gate is not None:
        await gate.wait()
"""


async def test_a_commit_given_up_runs_again_before_the_frames_later_entries(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Message 1 of a frame runs while 2 and 3 wait parked behind it; Redis refuses its
    commit until the node gives up and reads the entry again. 1 must run again before
    2 and 3 run at all (before, they ran and committed first: order broken)."""
    monkeypatch.setattr(_node, "_COMMIT_TRIES", 1)  # give up at the first refusal
    module = f"gated{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(GATED_PY)
    (tmp_path / "gated.yaml").write_text(
        textwrap.dedent(f"""\
        organism: {{name: gated}}
        backend: {redis_server.url}
        transport: {redis_server.url}
        redis: {{prefix: g{uuid.uuid4().hex[:8]}}}
        listeners:
          - {{name: o, payload: "{module}:Job", handler: "{module}:work", concurrency: 2}}
        """)
    )
    organism = load_organism(tmp_path / "gated.yaml")
    gated = importlib.import_module(module)
    gated.GATES[1] = asyncio.Event()

    def job(n: int) -> str:
        return f'<Job xmlns="https://example.org/gated"><n>{n}</n></Job>'

    async with StreamPump(organism, node="a") as pump:
        node = pump._node
        assert node is not None
        commit = node._commit
        refused: list[str] = []

        async def refuse_once(d: Any, box: Any) -> Any:
            if b"<n>1</n>" in d.message.xml() and not refused:
                refused.append(d.message.id)
                raise BackendError("OOM command not allowed when used memory > 'maxmemory'")
            return await commit(d, box)

        monkeypatch.setattr(node, "_commit", refuse_once)
        root = await pump.inject(job(1), to="o")
        for n in (2, 3):
            await pump.inject(job(n), to="o", thread=root)
        await until(lambda: pump.statistics().listeners["o"].queued == 2, "2 and 3 parked")
        gated.GATES[1].set()
        await until(lambda: len(gated.STARTS) == 4, "1 run again, 2 and 3 run", timeout=30)
        await asyncio.wait_for(pump.wait_idle(), 30)
        assert refused
        assert gated.STARTS == [1, 1, 2, 3]
