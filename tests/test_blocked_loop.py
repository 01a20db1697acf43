"""A handler that blocks the event loop is caught, named, counted and timed out.

An ``async def`` handler runs on the pump's event loop: a blocking call in it
(``time.sleep``, a synchronous HTTP client, a long computation) stalls every listener.
The pump times each step of an inline handler and watches its loop's lateness
(``pump.blocked_loop_s``): the handler is named in one WARNING, counted in
``statistics()``, and a reply that comes after its ``timeout_s`` is a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
import time
from pathlib import Path

import pytest
from cli_process import until
from support import Ping, Pong, ping_xml, pong

from xml_pipeline import (
    ConfigError,
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
    PumpSettings,
    load_organism,
)

BLOCK_S = 0.7  # how long the blocking handler holds the loop
TIMEOUT_S = 0.3  # its timeout_s: the block overruns it


async def blocks_then_answers(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Blocks the loop on 'block', then answers without awaiting anything."""
    if payload.text == "block":
        time.sleep(BLOCK_S)  # the fault under test
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


async def blocks_then_awaits(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Blocks the loop on 'block', then awaits once before answering."""
    if payload.text == "block":
        await asyncio.sleep(0)
        time.sleep(BLOCK_S)  # the fault under test
        await asyncio.sleep(0)
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


async def waits_politely(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    await asyncio.sleep(0.8)  # longer than blocked_loop_s, but the loop goes on meanwhile
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


def warnings_about(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "blocked the event loop" in r.getMessage()
        and what in r.getMessage()
    ]  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize("handler", [blocks_then_answers, blocks_then_awaits])
async def test_a_blocking_handler_is_named_counted_and_its_late_reply_is_a_timeout(
    run_pump, caplog: pytest.LogCaptureFixture, handler
) -> None:
    caplog.set_level(logging.DEBUG, logger="xml_pipeline")
    listeners = [
        Listener("blocker", (Ping,), handler, timeout_s=TIMEOUT_S),
        Listener("other", (Ping,), pong),
    ]
    async with run_pump(listeners, blocked_loop_s=0.3) as h:
        pump = h.pump
        blocked = asyncio.create_task(
            pump.request(ping_xml(1, "block"), to="blocker", sender="me", timeout=10)
        )
        bystander = asyncio.create_task(pump.request(ping_xml(2), to="other", timeout=10))
        reply = await blocked
        # The late answer is not delivered: the caller gets what a timeout gives.
        assert isinstance(reply.payload, Huh), reply.payload
        assert reply.payload.code == "timeout" and reply.payload.listener == "blocker"
        assert reply.to == "me"
        assert (await bystander).payload == Pong(n=2, by="other")
        await pump.wait_idle()
        assert [letter.code for letter in await h.backend.deadletter_list()] == ["timeout"]
        assert not [r for r in h.replies if isinstance(r.payload, Pong) and r.payload.n == 1]

        stats = pump.statistics()
        mine = stats.listeners["blocker"]
        assert mine.blocked == 1 and mine.failed == 1 and mine.handled == 0
        assert mine.blocked_max_ms is not None and mine.blocked_max_ms >= BLOCK_S * 1e3 * 0.9
        assert stats.listeners["other"].blocked == 0
        assert stats.listeners["other"].blocked_max_ms is None
        assert stats.blocked_loop == 1  # the monitor does not count it a second time
        [warning] = warnings_about(caplog, "'blocker'")
        assert "sync handler" in warning and "cpu_bound" in warning
        assert f"{handler.__module__}:{handler.__qualname__}" in warning

        # The pump goes on; the listener answers what does not block.
        ok = await pump.request(ping_xml(3), to="blocker", timeout=5)
        assert ok.payload == Pong(n=3, by="blocker")
        assert (await pump.request(ping_xml(4), to="other", timeout=5)).payload.n == 4

        # Once per listener at WARNING: the next block is counted, logged at DEBUG.
        again = await pump.request(ping_xml(5, "block"), to="blocker", timeout=10)
        assert again.payload.code == "timeout"
        assert pump.statistics().listeners["blocker"].blocked == 2
        assert len(warnings_about(caplog, "'blocker'")) == 1
        assert sum("'blocker'" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.DEBUG and "blocked" in r.getMessage()) == 1  # fmt: skip


@pytest.mark.timeout(30)
async def test_well_behaved_handlers_are_not_reported(
    run_pump, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="xml_pipeline")
    listeners = [
        Listener("polite", (Ping,), waits_politely, timeout_s=5, concurrency=4),
        Listener("quick", (Ping,), pong),
    ]
    # A threshold well above what a busy machine's scheduler may hold this process for:
    # the monitor measures wall time, and reports such a stall too.
    async with run_pump(listeners, blocked_loop_s=0.5) as h:
        pump = h.pump
        replies = await asyncio.gather(
            *(pump.request(ping_xml(i), to="polite", timeout=10) for i in range(8)),
            *(pump.request(ping_xml(i), to="quick", timeout=10) for i in range(200)),
        )
        assert all(isinstance(r.payload, Pong) for r in replies)
        stats = pump.statistics()
        reports = [r.getMessage() for r in caplog.records if "blocked the" in r.getMessage()]
        assert stats.blocked_loop == 0, reports
        assert all(s.blocked == 0 and s.blocked_max_ms is None for s in stats.listeners.values())
    assert not reports


@pytest.mark.timeout(30)
async def test_a_block_outside_the_handlers_is_counted_by_the_monitor(
    run_pump, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline")
    async with run_pump([Listener("quick", (Ping,), pong)], blocked_loop_s=0.2) as h:
        pump = h.pump
        # The monitor is running (it measures its own lateness): the test body's
        # own blocking call is what it must see, and no listener is to blame.
        await until(lambda: pump._watch.ticks > 0, "the loop monitor's first tick")
        time.sleep(0.6)  # the fault under test
        await until(lambda: pump.statistics().blocked_loop == 1, "the block counted", 5)
        assert pump.statistics().listeners["quick"].blocked == 0
        [warning] = warnings_about(caplog, "outside the listeners' handlers")
        assert "at least" in warning
        assert (await pump.request(ping_xml(1), to="quick", timeout=5)).payload.n == 1


@pytest.mark.timeout(30)
async def test_detection_off_still_times_out_the_late_reply(
    run_pump, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="xml_pipeline")
    listeners = [Listener("blocker", (Ping,), blocks_then_answers, timeout_s=TIMEOUT_S)]
    async with run_pump(listeners, blocked_loop_s=0) as h:
        reply = await h.pump.request(ping_xml(1, "block"), to="blocker", timeout=10)
        assert isinstance(reply.payload, Huh) and reply.payload.code == "timeout"
        assert "returned after" in reply.payload.message
        stats = h.pump.statistics()
        assert stats.blocked_loop == 0 and stats.listeners["blocker"].blocked == 0
        assert h.pump._watch is None
    assert not [r for r in caplog.records if "blocked the event loop" in r.getMessage()]


def test_blocked_loop_s_is_a_pump_setting(tmp_path: Path) -> None:
    assert PumpSettings().blocked_loop_s == 0.25
    path = tmp_path / "o.yaml"
    text = """
        organism: {name: t}
        pump: {blocked_loop_s: %s}
        listeners: [{name: a, payload: support:Ping, handler: support:pong}]
    """
    path.write_text(textwrap.dedent(text % "0.5"))
    assert load_organism(path).settings.blocked_loop_s == 0.5
    path.write_text(textwrap.dedent(text % "null"))
    assert load_organism(path).settings.blocked_loop_s is None
    path.write_text(textwrap.dedent(text % "-1"))
    with pytest.raises(ConfigError, match="blocked_loop_s"):
        load_organism(path)
