from __future__ import annotations

from support import Ping, ping_xml, pong

from xml_pipeline import Listener


async def test_request_roundtrip(run_pump) -> None:
    async with run_pump([Listener("echo", (Ping,), pong)]) as h:
        reply = await h.pump.request(ping_xml(1, "hi"), to="echo", timeout=5)
        assert reply.payload.n == 1 and reply.payload.by == "echo"
