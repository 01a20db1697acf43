"""A handler that blocks the event loop is timed out.

An ``async def`` handler runs on the pump's event loop: a blocking call in it
(``time.sleep``, a synchronous HTTP client, a long computation) stalls every listener,
and its timer cannot fire meanwhile: a reply that comes after its ``timeout_s`` is a
timeout all the same.
"""

from __future__ import annotations

import time

import pytest
from support import Ping, Pong, ping_xml

from xml_pipeline import (
    HandlerMetadata,
    HandlerResponse,
    Huh,
    Listener,
)

BLOCK_S = 0.7  # how long the blocking handler holds the loop
TIMEOUT_S = 0.3  # its timeout_s: the block overruns it


async def blocks_then_answers(payload: Ping, meta: HandlerMetadata) -> HandlerResponse:
    """Blocks the loop on 'block', then answers without awaiting anything."""
    if payload.text == "block":
        time.sleep(BLOCK_S)  # the fault under test
    return HandlerResponse.respond(Pong(n=payload.n, by=meta.own_name))


@pytest.mark.timeout(30)
async def test_a_late_answer_is_a_timeout(run_pump) -> None:
    listeners = [Listener("blocker", (Ping,), blocks_then_answers, timeout_s=TIMEOUT_S)]
    async with run_pump(listeners) as h:
        reply = await h.pump.request(ping_xml(1, "block"), to="blocker", timeout=10)
        assert isinstance(reply.payload, Huh) and reply.payload.code == "timeout"
        assert "returned after" in reply.payload.message
        await h.pump.wait_idle()
        assert [letter.code for letter in await h.backend.deadletter_list()] == ["timeout"]
        ok = await h.pump.request(ping_xml(2), to="blocker", timeout=5)
        assert ok.payload == Pong(n=2, by="blocker")
