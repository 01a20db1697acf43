"""The 3-hop relay written with FastStream on Redis Streams, for benchmarks/distributed.py.

    python benchmarks/_faststream_relay.py redis://127.0.0.1:6379/0 NAME

What a user would write without xml_pipeline: three subscribers in consumer groups
(``r1`` → ``r2`` → ``r3``, and the answer back ``b2`` → ``b1`` → ``out``), each
acknowledging after its handler (at-least-once), with a small JSON message, no XML
parsing, no history and no commit: it does less per delivery than a node. Runs until
SIGTERM. Needs ``pip install 'faststream[redis]'`` (the benchmark's own dependency).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from faststream.redis import RedisBroker, StreamSub


async def main(url: str, name: str) -> None:
    broker = RedisBroker(url, logger=None)  # its log lines are not the benchmark's

    def sub(stream: str) -> StreamSub:
        return StreamSub(stream, group="relay", consumer=name, polling_interval=1000)

    @broker.subscriber(stream=sub("r1"))
    async def relay1(msg: dict[str, Any]) -> None:
        await broker.publish(msg, stream="r2")

    @broker.subscriber(stream=sub("r2"))
    async def relay2(msg: dict[str, Any]) -> None:
        await broker.publish(msg, stream="r3")

    @broker.subscriber(stream=sub("r3"))
    async def relay3(msg: dict[str, Any]) -> None:
        await broker.publish({"seq": msg["seq"], "hops": 1}, stream="b2")

    @broker.subscriber(stream=sub("b2"))
    async def back2(msg: dict[str, Any]) -> None:
        await broker.publish({"seq": msg["seq"], "hops": msg["hops"] + 1}, stream="b1")

    @broker.subscriber(stream=sub("b1"))
    async def back1(msg: dict[str, Any]) -> None:
        await broker.publish({"seq": msg["seq"], "hops": msg["hops"] + 1}, stream="out")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await broker.start()
    print("is running", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await broker.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
